"""moekit.upcycle: at initialisation the upcycled MoE is the dense FFN, in outputs and in gradients.

With E identical experts and combine weights summing to 1, ``sum_j w_j FFN(x) = FFN(x)``; each
expert's weight gradient is the dense gradient restricted to the token-slots routed to it, weighted
by their gates, so the experts' gradients sum to the dense one; and the router's gradient is 0
(``sum_j dL/dw_j dw_j/dlogit = (g . FFN(x)) d(sum_j w_j)/dlogit = 0``).
"""

import math

import pytest
import torch
from torch import nn

import moekit
from moekit.experts import Experts, SharedExperts
from moekit.upcycle import dense_weights

torch.set_num_threads(1)
D, F, E = 12, 20, 4


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


def shared(activation, bias, dtype):
    return _randomised(SharedExperts(D, F, activation, bias=bias, dtype=dtype))


FFNS = {
    "relu+bias": lambda dtype: shared("relu", True, dtype),
    "gelu+bias": lambda dtype: shared("gelu", True, dtype),
    "swiglu": lambda dtype: shared("swiglu", False, dtype),
    "clamped_swiglu+bias": lambda dtype: shared("clamped_swiglu", True, dtype),
    "sequential": lambda dtype: _randomised(nn.Sequential(nn.Linear(D, F), nn.GELU(), nn.Dropout(0.0),
                                                          nn.Linear(F, D)).to(dtype)),
    "one-expert bank": lambda dtype: _randomised(Experts(1, D, F, "silu", dtype=dtype)),
}
ROUTERS = {
    "topk": dict(router="topk"),
    "sigmoid-normalised": dict(router="topk", router_kwargs=dict(score="sigmoid", normalize=True)),
    "noisy_topk": dict(router="noisy_topk"),  # noisy in training, still normalised
}


def _dense_grads(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """The dense FFN's gradients in moekit's layout (``dense_weights`` of a module holding grads)."""
    grads = {name: p.grad for name, p in mlp.named_parameters()}
    with torch.no_grad():
        saved = {name: p.detach().clone() for name, p in mlp.named_parameters()}
        for name, p in mlp.named_parameters():
            p.copy_(grads[name])
        as_moekit = dense_weights(mlp)  # views of the parameters, now holding the gradients
        grads_moekit = {k: getattr(as_moekit, k).clone() for k in ("w1", "b1", "w2", "b2", "w3", "b3")
                        if getattr(as_moekit, k) is not None}
        for name, p in mlp.named_parameters():
            p.copy_(saved[name])
    return grads_moekit


def _dense(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mlp, Experts):  # a bank is called on rows grouped by expert: its one expert's rows
        return mlp.expert_forward(0, x.reshape(-1, D)).reshape(x.shape)
    return mlp(x)


def _check_equal_at_init(mlp: nn.Module, moe: moekit.MoE, dtype, rel: float) -> None:
    x = torch.randn(2, 5, D, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding: no output, no gradient
    g = torch.randn(2, 5, D, dtype=dtype) * mask[..., None]
    want = _dense(mlp, x)
    (want * g).sum().backward()
    dense_x_grad = x.grad.clone()
    x.grad = None
    out = moe(x, mask=mask)
    scale = want.abs().max().item()
    torch.testing.assert_close(out.y[mask], want[mask], rtol=rel, atol=rel * scale)
    assert torch.all(out.y[~mask] == 0)
    (out.y * g).sum().backward()
    torch.testing.assert_close(x.grad, dense_x_grad, rtol=rel, atol=rel * dense_x_grad.abs().max().item())
    for name, dense_grad in _dense_grads(mlp).items():
        summed = getattr(moe.experts, name).grad.sum(0)
        torch.testing.assert_close(summed, dense_grad, rtol=rel, atol=rel * dense_grad.abs().max().item())
    w_gate_grad = moe.router.w_gate.grad
    assert w_gate_grad.abs().max() <= 10 * rel * moe.experts.w1.grad.abs().max()  # ~0: identical experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("ffn", list(FFNS))
def test_upcycled_moe_is_the_dense_ffn_at_initialisation(ffn, router, dtype):
    mlp = FFNS[ffn](dtype)
    moe = moekit.upcycle(mlp, E, 2, w_importance=0.0, w_load=0.0, **ROUTERS[router]).train()
    assert moe.experts.w1.dtype == dtype and moe.num_experts == E and moe.k == 2
    # Routers compute in float32: the k gates sum to 1 to float32 rounding, whatever the dtype.
    _check_equal_at_init(mlp, moe, dtype, rel=1e-6)


def test_with_one_expert_per_token_it_is_exact_in_float64():
    mlp = shared("swiglu", True, torch.float64)
    moe = moekit.upcycle(mlp, E, 1)
    _check_equal_at_init(mlp, moe, torch.float64, rel=1e-12)  # one gate, softmax over one logit: 1.0


def test_transformers_gated_mlp():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=D, intermediate_size=F, num_attention_heads=2)
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = _randomised(LlamaMLP(config))
    moe = moekit.upcycle(mlp, E, 2)
    assert moe.experts.activation == "swiglu" and moe.experts.b1 is None
    torch.testing.assert_close(moe.experts.w3[2], mlp.up_proj.weight.t(), rtol=0, atol=0)
    _check_equal_at_init(mlp, moe, torch.float32, rel=1e-6)
    with_bias = _randomised(LlamaMLP(transformers.LlamaConfig(hidden_size=D, intermediate_size=F, num_attention_heads=2,
                                                                   mlp_bias=True)))
    with pytest.raises(ValueError, match="LlamaMLP.up_proj has a bias"):
        moekit.upcycle(with_bias, E, 2)
    gelu = LlamaMLP(transformers.LlamaConfig(hidden_size=D, intermediate_size=F, num_attention_heads=2,
                                                  hidden_act="gelu"))
    with pytest.raises(ValueError, match="LlamaMLP: a gated MLP needs a SiLU gate"):
        moekit.upcycle(gelu, E, 2)


def test_noise_makes_experts_differ_by_its_relative_std():
    mlp = shared("relu", True, torch.float32)
    gen = torch.Generator().manual_seed(3)
    moe = moekit.upcycle(mlp, 8, 2, noise=0.1, generator=gen)
    w1 = mlp.w1.detach()
    deltas = (moe.experts.w1.detach() - w1) / w1.std()
    # 8 * 12 * 20 = 1920 draws of N(0, 0.1^2): their std is within a few percent of 0.1.
    assert abs(deltas.std().item() - 0.1) < 0.01 and abs(deltas.mean().item()) < 0.01
    assert not torch.allclose(moe.experts.w1[0], moe.experts.w1[1])
    assert torch.equal(moe.experts.b1, mlp.b1.detach().expand(8, F))  # biases are copied exactly
    again = moekit.upcycle(mlp, 8, 2, noise=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.experts.w2, moe.experts.w2)


def test_the_router_is_new_and_learns_once_experts_differ():
    mlp = shared("gelu", True, torch.float32)
    moe = moekit.upcycle(mlp, E, 2, w_importance=0.0, w_load=0.0)
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    x = torch.randn(32, D)
    target = torch.randn(32, D)
    for _ in range(3):
        loss = (moe(x).y - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # After a few steps the experts differ, so the choice among them matters to the loss.
    assert not torch.allclose(moe.experts.w1[0], moe.experts.w1[1])
    assert moe.router.w_gate.grad.abs().max() > 1e-5


def test_bad_arguments_are_named():
    mlp = shared("relu", True, torch.float32)
    for noise in (-0.1, math.nan, True):
        with pytest.raises(ValueError, match="noise=.* must be a finite number >= 0"):
            moekit.upcycle(mlp, E, 2, noise=noise)
    with pytest.raises(TypeError, match=r"upcycle takes \['activation', 'hidden_dim'\] from the dense FFN"):
        moekit.upcycle(mlp, E, 2, activation="gelu", hidden_dim=8)
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        moekit.upcycle(mlp, E, 5)
    with pytest.raises(TypeError, match="cannot upcycle a Linear"):
        moekit.upcycle(nn.Linear(D, D), E, 2)
    with pytest.raises(ValueError, match="a gated SharedExperts"):
        moekit.upcycle(SharedExperts(D, F, gate=True), E, 2)
    with pytest.raises(ValueError, match="an Experts bank of 3 experts"):
        moekit.upcycle(Experts(3, D, F), E, 2)
    with pytest.raises(TypeError, match=r"must be Linear, activation, Linear; got \['Linear', 'Linear'\]"):
        moekit.upcycle(nn.Sequential(nn.Linear(D, F), nn.Linear(F, D)), E, 2)
    with pytest.raises(ValueError, match="the FFN: its activation Tanh\\(\\) is none of moekit's"):
        moekit.upcycle(nn.Sequential(nn.Linear(D, F), nn.Tanh(), nn.Linear(F, D)), E, 2)
