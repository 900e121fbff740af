"""Soft MoE: the reference, batch independence, token-permutation equivariance, padding, gradients."""

import pytest
import torch

import moekit
from moekit.reference import reference_soft_moe


def _layer(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return moekit.SoftMoE(6, 3, **{"slots_per_expert": 2, "hidden_dim": 5, "dtype": dtype, **kwargs})


def _inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 6, generator=gen).to(dtype).requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2] = False  # a sequence of padding alone
    return x, mask


def _grads(layer, x, mask, fn):
    out = fn(layer, x, mask)
    g = torch.linspace(-1, 1, out.y.numel(), dtype=out.y.dtype).reshape(out.y.shape)
    params = list(layer.parameters())
    return out, torch.autograd.grad((out.y * g).sum(), [x, *params])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_outputs_stats_and_every_gradient(dtype, masked, normalize):
    layer = _layer(dtype, normalize=normalize, activation="swiglu" if normalize else "gelu")
    x, mask = _inputs(dtype)
    mask = mask if masked else None
    fast, g_fast = _grads(layer, x, mask, lambda m, a, b: m(a, b))
    ref, g_ref = _grads(layer, x, mask, reference_soft_moe)
    # The dispatch and combine weights are float32 in both; float32 tolerances for the comparison.
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(fast.y, ref.y, **tol)
    torch.testing.assert_close(fast.stats.importance, ref.stats.importance, rtol=1e-5, atol=1e-6)
    assert fast.stats.counts.tolist() == ref.stats.counts.tolist() == [3 * 2] * 3
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")
        if name != "x":
            assert a.abs().sum() > 0, f"{name} gets no gradient"


def test_every_parameter_gets_a_gradient():
    layer = _layer(torch.float32, normalize=True)
    x = torch.randn(2, 4, 6)
    layer(x).y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sequences_do_not_interact():
    layer = _layer()
    x, _ = _inputs()
    whole = layer(x).y
    for b in range(x.shape[0]):
        torch.testing.assert_close(layer(x[b : b + 1]).y[0], whole[b])


def test_permuting_tokens_permutes_the_outputs():
    layer = _layer()
    x, _ = _inputs()
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(layer(x[:, perm]).y, layer(x).y[:, perm])


def test_padding_takes_no_part_and_outputs_zero():
    layer = _layer()
    x, mask = _inputs()
    out = layer(x, mask)
    assert (out.y[~mask] == 0).all() and torch.isfinite(out.y).all()
    # The real tokens' outputs are those of the sequence without its padding.
    torch.testing.assert_close(out.y[0, :3], layer(x[:1, :3]).y[0])
    out.y.sum().backward()
    assert (x.grad[~mask] == 0).all() and torch.isfinite(x.grad).all()
    # Importance sums to the number of real tokens (each token's combine weights sum to 1).
    assert out.stats.importance.sum().item() == pytest.approx(int(mask.sum()))


def test_no_dropping_no_aux_loss_and_balanced_counts():
    layer = _layer(torch.float32)
    out = layer(torch.randn(4, 7, 6))
    assert out.aux_loss.item() == 0 and out.stats.dropped == 0
    assert out.stats.counts.tolist() == [4 * 2] * 3 and out.stats.losses["load"].item() == 0


def test_one_expert_one_slot_of_a_one_token_sequence_is_the_expert():
    # Dispatch and combine are softmaxes over one entry: both are 1, so y = FFN(x).
    layer = moekit.SoftMoE(4, 1, 1, hidden_dim=3, activation="relu", dtype=torch.float64)
    x = torch.randn(5, 1, 4, dtype=torch.float64)
    e = layer.experts
    expected = torch.relu(x @ e.w1[0] + e.b1[0]) @ e.w2[0] + e.b2[0]
    torch.testing.assert_close(layer(x).y, expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"slots_per_expert": 0}, "slots_per_expert=0"), ({"num_experts": 0}, "num_experts=0"),
     ({"activation": "tanh"}, "activation='tanh'")],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moekit.SoftMoE(**{"dim": 4, "num_experts": 2, **kwargs})


def test_bad_inputs_name_the_value():
    layer = moekit.SoftMoE(4, 2)
    with pytest.raises(ValueError, match=r"shape \[B, S, 4\], got \(3, 4\)"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"mask shape \(2, 2\)"):
        layer(torch.randn(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 3, 4, dtype=torch.long))
