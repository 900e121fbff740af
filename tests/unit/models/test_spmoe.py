"""SPMoE: pattern heads, responsibilities without dropout, the balanced gate, generation."""

import math

import pytest
import torch

from moekit.data.pairs import encode_pairs, make_batch, pair_vocab, synthetic_examples
from moekit.models.seq2seq import Seq2Seq, Seq2SeqConfig, sequence_nll
from moekit.models.spmoe import PatternHeads, SPMoE, SPMoEConfig, capacity_assign, gate_losses
from moekit.routing.losses import cv_squared

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


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="patterns=0"):
        SPMoEConfig(patterns=0)
    with pytest.raises(ValueError, match="head='wide'"):
        SPMoEConfig(head="wide")
    with pytest.raises(ValueError, match="adapter_hidden=0"):
        SPMoEConfig(head="mlp", adapter_hidden=0)


@pytest.mark.parametrize("head", ["adapter", "full", "mlp"])
def test_heads_route_each_row_through_its_own_pattern(head):
    model, _, batch = _setup(head=head)
    bb = model.backbone
    h = bb.decode(batch.tgt_in, bb.encode(batch.src), batch.src != 0)
    pattern = torch.tensor([0, 2, 1, 1, 0, 2, 0, 0, 1, 2, 2, 1])
    logits = model.heads(h, pattern)
    for b in range(12):
        torch.testing.assert_close(logits[b], model.heads.logits(h[b : b + 1], int(pattern[b]))[0])
    nll = model.heads.nll_all(h, batch.tgt_out, 0)
    for k in range(K):
        torch.testing.assert_close(nll[:, k], sequence_nll(model.heads.logits(h, k), batch.tgt_out, 0))
    # The heads start different (otherwise hard EM could not break the tie between them).
    assert not torch.allclose(nll[:, 0], nll[:, 1])


@pytest.mark.parametrize("head", ["adapter", "full"])
def test_heads_start_near_the_shared_projection(head):
    # Alike at the start, so that no pattern loses every pair before training begins.
    model, vocab, _ = _setup(head=head)
    h = torch.randn(64, 16)
    shared = model.backbone.project(h).detach()
    for k in range(K):
        diff = (model.heads.logits(h, k) - shared).detach()
        assert 0 < float(diff.norm()) < 0.5 * float(shared.norm())
    out = 16 if head == "adapter" else len(vocab)
    assert isinstance(model.heads, PatternHeads) and model.heads.weight_KDO.shape == (K, 16, out)


def test_responsibilities_are_computed_without_dropout_and_restore_training_mode():
    model, _, batch = _setup(dropout=0.5)
    model.train()
    a, _, _ = model.responsibilities(batch)
    b, _, _ = model.responsibilities(batch)
    assert model.training and model.backbone.training
    torch.testing.assert_close(a, b)  # no random dropout mask: identical
    model.eval()
    c, _, _ = model.responsibilities(batch)
    torch.testing.assert_close(a, c)  # equals the dropout-free forward
    assert not a.requires_grad


def test_the_m_step_trains_with_dropout_and_only_the_winning_pattern():
    model, _, batch = _setup(dropout=0.5, use_gate=False)
    model.train()
    out1, out2 = model.loss(batch), model.loss(batch)
    assert not torch.equal(out1.nll, out2.nll)  # the M-step forward does use dropout
    # Without a gate the winner is the lowest dropout-free loss (hard EM, uniform prior).
    assert torch.equal(out1.assignment, out1.nll_all.argmin(1))
    model.zero_grad()
    out1.loss.backward()
    used = set(out1.assignment.tolist())
    for k in range(K):
        g = model.heads.weight_KDO.grad[k]
        assert (g.abs().sum() > 0) == (k in used), k


def test_gate_losses_by_hand():
    # Clean logits 0 (uniform gate): importance = B/K for every pattern -> CV^2 = 0.
    clean = torch.zeros(4, 2, requires_grad=True)
    std = torch.ones(4, 2)
    clean3, std3 = clean[:3], std[:3]
    noisy = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    losses = gate_losses(clean, std, noisy, torch.tensor([0, 0, 1, 1]))
    assert float(losses["importance"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["assign"].detach()) == pytest.approx(math.log(2))
    # Smooth load with k = 1 (Shazeer eq. 9): a pattern on top compares its clean logit (0) with the
    # other noisy logit (0): Phi(0) = 0.5; a pattern below compares with the top noisy logit (1):
    # Phi(-1). Rows 0,1 give [0.5, Phi(-1)], rows 2,3 [Phi(-1), 0.5]: equal loads, CV^2 = 0.
    assert float(losses["load"].detach()) == pytest.approx(0.0, abs=1e-6)
    uneven = gate_losses(clean3, std3, noisy[:3], torch.tensor([0, 0, 1]))  # loads 1 + Phi(-1), 0.5 + 2 Phi(-1)
    phi = 0.5 * (1 + math.erf(-1 / math.sqrt(2)))
    l0, l1 = 1 + phi, 0.5 + 2 * phi
    mean = (l0 + l1) / 2
    assert float(uneven["load"].detach()) == pytest.approx(((l0 - mean) ** 2 + (l1 - mean) ** 2) / 2 / mean**2)
    skew = gate_losses(torch.tensor([[3.0, 0.0]] * 4), None, torch.tensor([[3.0, 0.0]] * 4), torch.zeros(4).long())
    # No noise: the load is the hard count [4, 0] -> CV^2 = var/mean^2 = 4/4 = 1.
    assert float(skew["load"]) == pytest.approx(1.0, rel=1e-6)
    imp = torch.softmax(torch.tensor([3.0, 0.0]), 0) * 4
    assert float(skew["importance"]) == pytest.approx(float(cv_squared(imp)), rel=1e-6)
    losses["importance"].backward()  # gradients flow to the gate's clean logits
    assert clean.grad is not None


def test_gate_starts_uniform_and_joins_the_likelihood_in_the_assignment():
    model, _, batch = _setup()
    model.cfg.capacity_factor = None  # two pairs: a capacity would force them apart
    nll = torch.tensor([[5.0, 5.1, 9.0], [5.0, 5.1, 9.0]])
    feat = torch.zeros(2, 32)
    model.eval()  # no noise: the gate is uniform at initialisation, so the lowest loss wins
    a, _ = model.assign(nll, feat)
    assert a.tolist() == [0, 0]
    with torch.no_grad():
        model.gate.w_gate.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))  # the gate now prefers pattern 1
    a, _ = model.assign(nll, feat)
    assert a.tolist() == [1, 1]  # 0.1 nats of likelihood lose against 1 nat of gate


def test_generate_returns_k_outputs_and_a_prior():
    model, vocab, batch = _setup()
    outs = model.generate(batch.src[:4], vocab.bos_id, vocab.eos_id, 6)
    assert len(outs) == 4 and all(len(o) == K for o in outs)
    assert all(len(seq) <= 6 for o in outs for seq in o)
    prior = model.prior_log_probs(batch.src[:4])
    torch.testing.assert_close(prior.exp().sum(1), torch.ones(4))
    beam_outs = model.generate(batch.src[:4], vocab.bos_id, vocab.eos_id, 6, beam=3)
    assert len(beam_outs) == 4 and all(len(o) == K for o in beam_outs)


def test_capacity_assignment_by_hand():
    # Every pair prefers pattern 0; margins 3, 1, 2, 0.5. Capacity 2: the two most decided pairs
    # (0 and 2) keep pattern 0, the others take their next best, pattern 1.
    score = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    assert capacity_assign(score, 2).tolist() == [0, 1, 0, 1]
    # Enough room: the plain argmax.
    mixed = torch.tensor([[0.0, 1.0, 0.2], [2.0, 0.0, 0.1], [0.0, 0.1, 3.0]])
    assert capacity_assign(mixed, 3).tolist() == mixed.argmax(1).tolist()
    with pytest.raises(ValueError, match="capacity=1 for 2 patterns cannot hold 4 pairs"):
        capacity_assign(score, 1)


def test_capacity_keeps_a_skewed_batch_balanced():
    model, _, batch = _setup(use_gate=True)
    model.cfg.capacity_factor = 1.0
    nll = torch.zeros(12, K)
    nll[:, 1] = -5.0  # every pair fits pattern 1 far better
    a, _ = model.assign(nll, torch.zeros(12, 32))
    assert torch.bincount(a, minlength=K).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="capacity_factor=0.5"):
        SPMoEConfig(capacity_factor=0.5)


def test_mlp_heads_are_residual_adapters_before_the_shared_projection():
    torch.manual_seed(0)
    ex = synthetic_examples(12, K, seed=0)
    vocab = pair_vocab(ex, 64)
    bb = Seq2Seq(Seq2SeqConfig(len(vocab), dim=16, heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=32))
    model = SPMoE(bb, SPMoEConfig(patterns=K, head="mlp", adapter_hidden=24))
    heads = model.heads
    assert heads.w1_KDF.shape == (K, 16, 24) and heads.w2_KFD.shape == (K, 24, 16)
    assert not hasattr(heads, "weight_KDO")
    h = torch.randn(5, 7, 16)
    for k in range(K):
        by_hand = bb.project(h + torch.nn.functional.gelu(h @ heads.w1_KDF[k] + heads.b1_KF[k]) @ heads.w2_KFD[k]
                             + heads.b2_KD[k])
        torch.testing.assert_close(heads.logits(h, k), by_hand)
    # Alike at the start (the shared path plus a small residual), but not tied.
    shared = bb.project(h).detach()
    diffs = [(heads.logits(h, k) - shared).detach() for k in range(K)]
    assert all(0 < float(d.norm()) < 0.5 * float(shared.norm()) for d in diffs)
    assert float((diffs[0] - diffs[1]).norm()) > 0
    # The backbone's projection is shared, not copied: the heads own only their adapters.
    own = {name for name, _ in heads.named_parameters()}
    assert own == {"w1_KDF", "b1_KF", "w2_KFD", "b2_KD"}


def test_the_adapter_and_full_heads_are_unchanged_by_the_mlp_option():
    # The same seed builds the same adapter weights as before the "mlp" kind existed: the linear
    # heads draw their noise first and nothing else.
    torch.manual_seed(3)
    ex = synthetic_examples(12, K, seed=0)
    vocab = pair_vocab(ex, 64)
    bb = Seq2Seq(Seq2SeqConfig(len(vocab), dim=16, heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=32))
    state = torch.random.get_rng_state()
    heads = PatternHeads(bb, K, "adapter", 0.1)
    torch.random.set_rng_state(state)
    expected = torch.eye(16) + 0.1 * torch.randn(K, 16, 16)
    torch.testing.assert_close(heads.weight_KDO.detach(), expected, rtol=0, atol=0)
