"""On synthetic data with K known patterns, SPMoE's heads each take one pattern and none starves."""

import torch

from moekit.data.pairs import encode_pairs, normalize, pair_vocab, split_examples, synthetic_examples
from moekit.jobs.patterns.config import make_config
from moekit.jobs.patterns.job import assignments, decode, train_network
from moekit.metrics.generation import refs_covered
from moekit.metrics.purity import purity
from moekit.train.session import Session

K = 3


def test_every_pattern_head_specialises_and_none_starves(tmp_path):
    torch.manual_seed(0)
    cfg = make_config(["spmoe"], K, "synthetic", "synthetic", seed=0, beam=1, steps=500)
    train, test = split_examples(synthetic_examples(400, K, seed=0))
    vocab = pair_vocab(train, 100)
    pairs = encode_pairs(train, vocab, 12, 12)
    net, state = train_network("spmoe", cfg, Session(tmp_path), pairs, vocab, torch.device("cpu"), quiet=True)
    # No pattern starves: over the last 100 steps each one trains a fair share of the pairs.
    late = torch.tensor(state.history["assign"][-100:]).mean(0)
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
