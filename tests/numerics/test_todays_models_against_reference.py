"""The routers and layer options of today's MoE models against the naive reference: outputs, aux loss,
counts and every gradient, in float32 and float64, on 3-D inputs with padding masks.

Two comparisons: (1) each router's decision re-derived token by token (``reference_topk_routing``,
``reference_expert_choice_routing``), routers computing in float32; (2) the layer (capacity,
dispatch, experts, shared experts, input gating) against ``reference_moe`` with the router's
decision, to the precision of the layer's dtype; (3) the whole chain re-derived at once.
"""

import pytest
import torch

import moekit
from moekit.reference import reference_moe, reference_routing

DIM, E, HIDDEN = 7, 8, 9

TOPK_VARIANTS = {
    "default": {},
    "softmax-unnormalised": dict(normalize=False),  # Qwen2-MoE, OLMoE
    "sigmoid-normalised-scaled": dict(score="sigmoid", scale=2.5),
    "sigmoid-unnormalised": dict(score="sigmoid", normalize=False),  # Llama 4
    "deepseek-v3": dict(score="sigmoid", scale=2.5, num_groups=4, topk_groups=2, expert_bias=True),
    "softmax-groups-bias": dict(num_groups=2, topk_groups=1, expert_bias=True),
    "groups-of-one": dict(score="sigmoid", num_groups=8, topk_groups=3),
    "gpt-oss": dict(logit_bias=True),
    "everything": dict(score="sigmoid", normalize=False, scale=0.5, num_groups=2, topk_groups=1, expert_bias=True,
                       logit_bias=True),
}


def _randomise_router(moe: moekit.MoE, seed: int = 0) -> moekit.MoE:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in moe.router.named_buffers():
            if name == "expert_bias":  # large enough to change selections
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return moe


def _inputs(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, DIM, generator=gen).to(dtype).requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, :1] = False
    return x, mask


def _grads(moe, x, mask, fn):
    torch.manual_seed(5)  # the same noise draw for a noisy router on both paths
    out = fn(moe, x, mask)
    g = torch.linspace(-1, 1, out.y.numel(), dtype=out.y.dtype).reshape(out.y.shape)
    loss = (out.y * g).sum() + out.aux_loss
    params = [p for p in moe.parameters() if p.requires_grad]
    return out, torch.autograd.grad(loss, [x, *params], allow_unused=True)


def assert_same(moe, x, mask, routing="router", tol=None):
    if tol is None:
        tol = {"rtol": 1e-4, "atol": 1e-5} if x.dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    fast, g_fast = _grads(moe, x, mask, lambda m, a, b: m(a, b))
    ref, g_ref = _grads(moe, x, mask, lambda m, a, b: reference_moe(m, a, b, routing=routing))
    torch.testing.assert_close(fast.y, ref.y, **tol)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss.to(fast.aux_loss.dtype), rtol=1e-5, atol=1e-6)
    assert fast.stats.counts.tolist() == ref.stats.counts.tolist()
    assert fast.stats.dropped == ref.stats.dropped
    assert (fast.y[~mask] == 0).all()
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_fast, g_ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")
    return fast


# --- (1) routers re-derived -------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("variant", sorted(TOPK_VARIANTS))
def test_topk_variant_decisions_match_the_token_by_token_reference(variant, training):
    moe = _randomise_router(moekit.MoE(DIM, E, 2, HIDDEN, router="topk", router_kwargs=TOPK_VARIANTS[variant]))
    x, mask = _inputs(torch.float32)
    x_TD, mask_T = x.reshape(-1, DIM), mask.reshape(-1)
    router = moe.router.train(training)
    routing = router(x_TD, mask_T)
    indices, weights, aux, stats = reference_routing(moe, x_TD, mask_T)
    assert routing.indices.tolist() == indices.tolist()
    torch.testing.assert_close(routing.weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.aux_loss, aux, rtol=1e-5, atol=1e-6)
    assert routing.stats.counts.tolist() == stats.counts.tolist()
    torch.testing.assert_close(routing.stats.importance, stats.importance, rtol=1e-5, atol=1e-6)
    # Gradients of the weights and the aux loss, to the gate, its bias and the input.
    g = torch.linspace(-1, 2, weights.numel()).reshape(weights.shape)
    params = [x, *router.parameters()]
    fast = torch.autograd.grad((routing.weights * g).sum() + routing.aux_loss, params)
    ref = torch.autograd.grad((weights * g).sum() + aux, params)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_variants_decide_differently():
    # Guard: the options above must actually change routing, or comparing them tests nothing.
    x, _ = _inputs(torch.float32)
    decisions = {}
    for variant, kwargs in TOPK_VARIANTS.items():
        moe = _randomise_router(moekit.MoE(DIM, E, 2, HIDDEN, router="topk", router_kwargs=kwargs))
        r = moe.router(x.reshape(-1, DIM))
        decisions[variant] = (r.indices.tolist(), [round(w, 5) for w in r.weights.reshape(-1).tolist()])
    assert len({str(v) for v in decisions.values()}) == len(TOPK_VARIANTS)


@pytest.mark.parametrize("masked", [False, True])
def test_expert_choice_decisions_match_the_reference(masked):
    moe = _randomise_router(moekit.MoE(DIM, E, 2, HIDDEN, router="expert_choice", w_importance=0.1))
    x, mask = _inputs(torch.float32)
    mask = mask if masked else torch.ones_like(mask)
    routing = moe.router(x.reshape(-1, DIM), mask.reshape(-1))
    indices, weights, aux, stats = reference_routing(moe, x.reshape(-1, DIM), mask.reshape(-1))
    assert routing.indices.tolist() == indices.tolist()
    torch.testing.assert_close(routing.weights, weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.aux_loss, aux, rtol=1e-5, atol=1e-6)
    assert routing.stats.counts.tolist() == stats.counts.tolist() == [routing.stats.counts[0].item()] * E


# --- (2) the layer, with the router's decision ----------------------------------------------------------
LAYERS = {
    # name: (layer kwargs, capacity settings that make sense for it)
    **{f"topk-{v}": (dict(router="topk", router_kwargs=kw), ["dropless", "capacity", "bpr"])
       for v, kw in TOPK_VARIANTS.items() if v in ("softmax-unnormalised", "deepseek-v3", "gpt-oss", "everything")},
    "expert-choice": (dict(router="expert_choice"), ["dropless"]),
    "shared": (dict(router="topk", shared_experts=2, shared_hidden_dim=3), ["dropless", "capacity"]),
    "shared-gated-swiglu": (dict(router="topk", shared_experts=1, shared_gate=True, activation="swiglu",
                                 bias=False), ["dropless", "capacity"]),
    "no-bias-relu": (dict(router="noisy_topk", bias=False), ["dropless", "capacity"]),
    "no-bias-gelu": (dict(router="topk", bias=False, activation="gelu"), ["dropless"]),
    "clamped-swiglu": (dict(router="topk", activation="clamped_swiglu",
                            activation_kwargs=dict(alpha=1.702, limit=0.4)), ["dropless", "capacity"]),
    "clamped-swiglu-no-bias": (dict(router="topk", activation="clamped_swiglu", bias=False,
                                    activation_kwargs=dict(limit=0.4)), ["dropless"]),
    "gate-input": (dict(router="topk", gate_input=True, activation="swiglu", bias=False,
                        router_kwargs=dict(score="sigmoid", normalize=False)), ["dropless", "capacity"]),
    "gate-input-k1-shared": (dict(router="topk", k=1, gate_input=True, shared_experts=1,
                                  router_kwargs=dict(score="sigmoid", normalize=False)), ["dropless"]),
    "sequence-capacity": (dict(router="switch", k=1, sequence_capacity=1), ["dropless", "bpr"]),
    "sequence-capacity-k2": (dict(router="topk", sequence_capacity=2), ["dropless", "bpr"]),
}
CAPACITY = {"dropless": dict(), "capacity": dict(capacity_factor=0.75), "bpr": dict(capacity_factor=0.75,
                                                                                      batch_prioritized=True)}
LAYER_RUNS = [(name, cap) for name, (_, caps) in LAYERS.items() for cap in caps]


def build(name: str, cap: str, dtype, backend: str) -> moekit.MoE:
    kwargs, _ = LAYERS[name]
    kwargs = {"k": 2, **kwargs, **CAPACITY[cap]}
    if "sequence_capacity" in kwargs:
        kwargs.pop("capacity_factor", None)
    torch.manual_seed(0)
    moe = moekit.MoE(DIM, E, hidden_dim=HIDDEN, dtype=dtype, expert_backend=backend, **kwargs)
    return _randomise_router(moe).train()


@pytest.mark.parametrize("backend", ["loop", "bmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,cap", LAYER_RUNS, ids=[f"{n}-{c}" for n, c in LAYER_RUNS])
def test_layer_matches_reference(name, cap, dtype, backend):
    moe = build(name, cap, dtype, backend)
    x, mask = _inputs(dtype)
    out = assert_same(moe, x, mask)
    if cap != "dropless" or "sequence_capacity" in LAYERS[name][0]:
        assert out.stats.dropped > 0  # the capacity must bite, or this tests nothing


@pytest.mark.parametrize("name", ["clamped-swiglu", "no-bias-relu", "shared-gated-swiglu", "gate-input"])
def test_grouped_mm_backend_matches_reference_on_cpu(name):
    # torch's grouped GEMM runs on CPU in float32 when rows are 16-byte aligned (dims multiple of 4).
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    kwargs, _ = LAYERS[name]
    torch.manual_seed(0)
    moe = _randomise_router(moekit.MoE(8, E, **{"k": 2, **kwargs}, hidden_dim=12, expert_backend="grouped_mm"))
    x = torch.randn(2, 7, 8, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    assert_same(moe.train(), x, mask)


def test_clamps_are_active_in_the_clamped_swiglu_cases():
    moe = build("clamped-swiglu", "dropless", torch.float64, "loop")
    x, _ = _inputs(torch.float64)
    h = x.reshape(-1, DIM) @ moe.experts.w1[0] + moe.experts.b1[0]
    up = x.reshape(-1, DIM) @ moe.experts.w3[0] + moe.experts.b3[0]
    assert (h > 0.4).any() and (up > 0.4).any() and (up < -0.4).any()


# --- (3) the whole chain re-derived ---------------------------------------------------------------------
CHAIN = ["topk-deepseek-v3", "topk-everything", "expert-choice", "gate-input", "sequence-capacity-k2",
         "shared-gated-swiglu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CHAIN)
def test_whole_chain_with_rederived_routing(name, dtype):
    # The routing weights are float32 whatever the layer's dtype: float32 tolerances throughout.
    moe = build(name, LAYERS[name][1][-1], dtype, "loop")
    x, mask = _inputs(dtype)
    assert_same(moe, x, mask, routing="reference", tol={"rtol": 1e-4, "atol": 1e-5})
