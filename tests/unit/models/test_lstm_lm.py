"""The LSTM-MoE language model: compute matching, the paper's parameter counts, masking, gradients."""


import pytest
import torch

import moekit
from moekit.models.lstm_lm import (
    LSTMLM,
    MODEL_NAMES,
    LSTMLMConfig,
    body_params,
    measure_ops_per_timestep,
    ops_per_timestep,
    parse_model,
)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dim", [8, 12])
def test_ops_formula_matches_the_flop_counter(name, dim):
    # 256 experts at width 8 keep the check exact for the gate matmuls too (D*E is not small here).
    model = LSTMLM(LSTMLMConfig(name, vocab_size=30, dim=dim))
    assert measure_ops_per_timestep(model) == ops_per_timestep(model.cfg)


def test_models_are_compute_matched_at_the_papers_width():
    # Table 7: every model spends ~8.4M multiply-adds per time step (MoE-256: 8.6M, the gate).
    ops = {name: ops_per_timestep(LSTMLMConfig(name, vocab_size=10, dim=512)) for name in MODEL_NAMES}
    assert ops["lstm-4x"] == 32 * 512 * 512 == 8_388_608
    for name, value in ops.items():
        assert abs(value / ops["lstm-4x"] - 1) < 0.05, (name, value)


def test_dense_middle_blocks_cost_exactly_two_lstm_layers():
    # F = 2D and k = 4: one expert D->4F->D, or D->F->F->F->F->D, is 16 D^2 = two LSTMs of width D.
    for dim in (16, 24, 512):
        costs = {ops_per_timestep(LSTMLMConfig(n, 10, dim=dim)) for n in ("lstm-4x", "moe-1-wide", "moe-1-deep")}
        assert costs == {32 * dim * dim}


def test_parameter_counts_match_the_papers_table_7():
    # Parameters without embedding and softmax: 8.4M, 37.8M, 272.9M (the paper rounds; we add biases).
    expected = {"lstm-4x": 8.4e6, "moe-1-wide": 8.4e6, "moe-1-deep": 8.4e6, "moe-4": 8.4e6, "moe-32": 37.8e6,
                "moe-256": 272.9e6, "moe-256-h": 272.9e6}
    for name, paper in expected.items():
        with torch.device("meta"):  # no memory for 273M parameters
            model = LSTMLM(LSTMLMConfig(name, vocab_size=10, dim=512))
        assert body_params(model) == pytest.approx(paper, rel=0.01), name


def test_the_middle_block_of_each_model():
    cfg = dict(vocab_size=20, dim=8)
    assert isinstance(LSTMLM(LSTMLMConfig("moe-32", **cfg)).middle, moekit.MoE)
    h = LSTMLM(LSTMLMConfig("moe-16-h", **cfg)).middle
    assert isinstance(h, moekit.HierarchicalMoE)
    assert (h.num_groups, h.experts_per_group, h.router.k_primary, h.router.k_secondary) == (4, 4, 2, 2)
    deep = LSTMLM(LSTMLMConfig("moe-1-deep", **cfg)).middle
    assert [tuple(lin.weight.shape) for lin in deep.linears] == [(16, 8), (16, 16), (16, 16), (16, 16), (8, 16)]
    wide = LSTMLM(LSTMLMConfig("moe-1-wide", **cfg)).middle
    assert [tuple(lin.weight.shape) for lin in wide.linears] == [(64, 8), (8, 64)]
    assert len(LSTMLM(LSTMLMConfig("lstm-4x", **cfg)).middle) == 2


@pytest.mark.parametrize(
    "name, message",
    [("gru-2x", "unknown model 'gru-2x'"), ("moe-8-h", "square"), ("moe-1", "at least 2"), ("moe-x", "unknown")],
)
def test_bad_model_names_are_refused_by_name(name, message):
    with pytest.raises(ValueError, match=message):
        parse_model(name)


def test_k_larger_than_the_experts_is_refused():
    with pytest.raises(ValueError, match="k=4 exceeds the 2 experts of moe-2"):
        LSTMLM(LSTMLMConfig("moe-2", vocab_size=10, dim=8))
    with pytest.raises(ValueError, match="k=3 must be a square"):
        LSTMLM(LSTMLMConfig("moe-16-h", vocab_size=10, dim=8, k=3))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes_losses_and_gradients(name):
    model = LSTMLM(LSTMLMConfig(name, vocab_size=25, dim=8, dropout=0.1))
    ids_BS = torch.randint(0, 25, (3, 5))
    out = model(ids_BS)
    assert out.logits.shape == (3, 5, 25)
    dense = name in ("lstm-4x", "moe-1-wide", "moe-1-deep")
    assert (out.stats is None) == dense
    assert out.aux_loss.shape == () and (out.aux_loss.item() == 0.0) == dense
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and "w_noise" not in n]
    assert not missing
    if not dense:
        # The gate learns from the task loss (k >= 2 gives the softmax over the top k a gradient).
        assert model.middle.router.w_gate.grad.abs().sum() > 0
        assert out.stats.counts.sum().item() == 3 * 5 * 4  # dropless: k = 4 experts per token


def test_moe_sees_all_time_steps_at_once(monkeypatch):
    # The convolutional trick: one call of the MoE on [B*S, D], not one per time step.
    model = LSTMLM(LSTMLMConfig("moe-32", vocab_size=25, dim=8))
    shapes = []
    original = model.middle.router.forward
    monkeypatch.setattr(model.middle.router, "forward", lambda x, m=None: shapes.append(x.shape) or original(x, m))
    model(torch.randint(0, 25, (3, 7)))
    assert shapes == [(21, 8)]


@pytest.mark.parametrize("name", ["moe-32", "moe-16-h"])
def test_padding_changes_neither_real_outputs_nor_routing_stats(name):
    model = LSTMLM(LSTMLMConfig(name, vocab_size=25, dim=8)).eval()
    ids = torch.randint(0, 25, (2, 6))
    short = model(ids[:, :4])
    padded_ids = ids.clone()
    padded_ids[:, 4:] = 0
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False
    padded = model(padded_ids, mask)
    torch.testing.assert_close(padded.logits[:, :4], short.logits)
    torch.testing.assert_close(padded.stats.importance, short.stats.importance)
    torch.testing.assert_close(padded.stats.load, short.stats.load)
    assert torch.equal(padded.stats.counts, short.stats.counts)
