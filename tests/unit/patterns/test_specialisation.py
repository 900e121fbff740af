"""On synthetic data with K known patterns, SPMoE's heads each take one pattern and none starves."""

import torch

from moekit.metrics.generation import refs_covered
from moekit.patterns.data import Vocab, encode_pairs, normalize, split_examples, synthetic_examples
from moekit.patterns.train import assignments, build_network, decode, make_config, make_optimizer, purity, train_step

K = 3


def test_every_pattern_head_specialises_and_none_starves():
    torch.manual_seed(0)
    cfg = make_config(["spmoe", "beam"], K, "synthetic", "synthetic", seed=0, beam=1, steps=500)
    train, test = split_examples(synthetic_examples(400, K, seed=0))
    vocab = Vocab.build([e.source for e in train] + [t for e in train for t in e.targets], 100)
    pairs = encode_pairs(train, vocab, 12, 12)
    net = build_network("spmoe", cfg, vocab)
    opt, sched = make_optimizer(net, cfg.sizes)
    shares = []
    for step in range(cfg.sizes.steps):
        _, assign = train_step(net, opt, sched, pairs, vocab, cfg.sizes, 0, step, "cpu")
        shares.append(torch.bincount(torch.tensor(assign), minlength=K).float() / len(assign))
    # No pattern starves: over the last 100 steps each one trains a fair share of the pairs.
    late = torch.stack(shares[-100:]).mean(0)
    assert bool((late > 0.2).all()), late
    # Each head's pairs follow one known pattern, and the heads take different patterns.
    assigned = assignments(net, pairs, vocab, "cpu")
    p = purity(assigned, pairs.labels[: len(assigned)], K)
    assert p["purity"] >= 0.9, p
    assert sorted(p["mapping"]) == list(range(K)), p
    # At test time the K outputs cover nearly all K references exactly.
    outs, _ = decode("spmoe", net, [e.source for e in test], vocab, cfg, "cpu")
    refs = [[normalize(t) for t in e.targets] for e in test]
    assert refs_covered(outs, refs, tokenize="none", min_bleu=100.0) >= 0.8


def test_purity_by_majority_mapping():
    p = purity([0, 0, 0, 1, 1, 2], [1, 1, 0, 2, 2, 0], 4)
    assert p["mapping"] == [1, 2, 0, None]
    assert p["per_pattern"] == [2 / 3, 1.0, 1.0, None]
    assert p["purity"] == 5 / 6
