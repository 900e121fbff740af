"""The baselines of SPMoE: the hard mixture hMoEup (one pass per expert token) and the single model."""

import pytest
import torch

from moekit.data.pairs import encode_pairs, make_batch, pair_vocab, synthetic_examples
from moekit.models.hard_mixture import HardMixture, SingleModel
from moekit.models.seq2seq import Seq2Seq, Seq2SeqConfig, sequence_nll
from moekit.models.spmoe import SPMoE, SPMoEConfig

K = 3


def _setup(dropout=0.0, head="adapter", use_gate=True, seed=0, vocab_extra=()):
    torch.manual_seed(seed)
    ex = synthetic_examples(12, K, seed=seed)
    vocab = pair_vocab(ex, 64, extra=vocab_extra)
    pairs = encode_pairs(ex, vocab, 10, 10)
    bb = Seq2Seq(Seq2SeqConfig(len(vocab), dim=16, heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=32,
                               dropout=dropout))
    model = SPMoE(bb, SPMoEConfig(patterns=K, head=head, use_gate=use_gate))
    return model, vocab, make_batch(pairs, list(range(12)), vocab)


def test_hard_mixture_responsibilities_equal_one_pass_per_expert_token():
    extra = [f"<expert_{i}>" for i in range(K)]
    model, vocab, batch = _setup(dropout=0.3, vocab_extra=extra)
    hm = HardMixture(model.backbone, [vocab.id(t) for t in extra]).train()
    nll = hm.responsibilities(batch)
    assert hm.training
    hm.eval()
    for k in range(K):
        tgt_in = batch.tgt_in.clone()
        tgt_in[:, 0] = vocab.id(extra[k])
        expect = sequence_nll(hm.backbone(batch.src, tgt_in), batch.tgt_out, 0)
        torch.testing.assert_close(nll[:, k], expect, rtol=1e-4, atol=1e-4)
    out = hm.train().loss(batch)
    assert torch.equal(out.assignment, nll.argmin(1))
    gens = hm.generate(batch.src[:3], vocab.eos_id, 5)
    assert len(gens) == 3 and all(len(g) == K for g in gens)
    with pytest.raises(ValueError, match="distinct"):
        HardMixture(model.backbone, [4, 4])


def test_single_model_k_outputs_by_beam_and_by_sampling():
    model, vocab, batch = _setup()
    single = SingleModel(model.backbone)
    beams = single.generate(batch.src[:3], K, vocab.bos_id, vocab.eos_id, 5, mode="beam", beam=4)
    assert all(len(o) == K and len({tuple(s) for s in o}) == K for o in beams)
    g = torch.Generator().manual_seed(0)
    samples = single.generate(batch.src[:3], K, vocab.bos_id, vocab.eos_id, 5, mode="sampling", generator=g)
    assert all(len(o) == K for o in samples)
    with pytest.raises(ValueError, match="mode='topk'"):
        single.generate(batch.src[:3], K, vocab.bos_id, vocab.eos_id, 5, mode="topk")
