"""Every router x dispatcher against the naive per-token reference, outputs and all gradients."""

import pytest
import torch

import moekit
from moekit.reference import reference_moe

ROUTERS = ["noisy_topk", "topk", "switch", "batchwise", "vmoe"]
# (capacity_factor, batch_prioritized): dropless, capacity in token order, capacity with BPR.
DISPATCH = [(None, False), (0.75, False), (0.75, True)]


BACKENDS = ["loop", "bmm"]


def _make(router, cf, bpr, dtype, activation="relu", dim=7, num_experts=5, k=2, hidden=9, backend="auto"):
    moe = moekit.MoE(dim, num_experts, k=k, hidden_dim=hidden, router=router, capacity_factor=cf,
                     batch_prioritized=bpr, activation=activation, expert_backend=backend, dtype=dtype)
    with torch.no_grad():  # give the zero-initialised noisy gate a signal so routing is not all ties
        for name, p in moe.router.named_parameters():
            if name.startswith("w_"):
                p.normal_(0, 0.5)
    return moe


def _grads(moe, x, mask, fn, seed):
    torch.manual_seed(seed)
    out = fn(moe, x, mask)
    g = torch.linspace(-1, 1, out.y.numel(), dtype=out.y.dtype).reshape(out.y.shape)
    loss = (out.y * g).sum() + out.aux_loss
    params = [p for p in moe.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return out, grads


def _forward(moe, x, mask):
    return moe(x, mask=mask)


def _assert_same(moe, x, mask, seed=0):
    tol = {"rtol": 1e-4, "atol": 1e-5} if x.dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    fast, g_fast = _grads(moe, x, mask, _forward, seed)
    ref, g_ref = _grads(moe, x, mask, reference_moe, seed)
    torch.testing.assert_close(fast.y, ref.y, **tol)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    assert fast.stats.counts.tolist() == ref.stats.counts.tolist()
    assert fast.stats.dropped == ref.stats.dropped
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_fast, g_ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"gradient of {name}: {m}")
    return fast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cf,bpr", DISPATCH)
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_path_matches_reference(router, cf, bpr, dtype, backend):
    moe = _make(router, cf, bpr, dtype, backend=backend).train()
    x = torch.randn(3, 5, 7, dtype=dtype, requires_grad=True)  # 3-D input, odd sizes
    out = _assert_same(moe, x, None)
    assert out.y.shape == x.shape and out.y.dtype == dtype
    if cf is not None and router != "batchwise":
        assert out.stats.dropped > 0  # cf < 1 must actually drop something, or this tests nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cf,bpr", DISPATCH)
@pytest.mark.parametrize("router", ROUTERS)
def test_fast_path_matches_reference_with_mask_in_eval(router, cf, bpr, backend):
    moe = _make(router, cf, bpr, torch.float64, backend=backend).eval()
    x = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :2] = False
    out = _assert_same(moe, x, mask)
    assert (out.y[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu"])
def test_activations_match_reference(activation, backend):
    moe = _make("noisy_topk", None, False, torch.float64, activation=activation, backend=backend).train()
    if activation == "swiglu":
        assert moe.experts.w3.shape == (5, 7, 9)
    _assert_same(moe, torch.randn(11, 7, dtype=torch.float64, requires_grad=True), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hierarchical_matches_reference(backend):
    moe = moekit.HierarchicalMoE(6, num_groups=3, experts_per_group=4, hidden_dim=5, dtype=torch.float64,
                                 expert_backend=backend)
    with torch.no_grad():
        for p in moe.router.parameters():
            p.normal_(0, 0.5)
    moe.train()
    out = _assert_same(moe, torch.randn(13, 6, dtype=torch.float64, requires_grad=True), None)
    assert out.stats.importance.shape == (12,) and out.stats.load.shape == (12,)
    assert out.stats.counts.sum().item() == 13 * 4  # k_primary * k_secondary slots per token


def test_single_expert_equals_dense_ffn():
    torch.manual_seed(0)
    moe = moekit.MoE(8, 1, k=1, hidden_dim=16, dtype=torch.float64)
    fc1, fc2 = torch.nn.Linear(8, 16, dtype=torch.float64), torch.nn.Linear(16, 8, dtype=torch.float64)
    with torch.no_grad():
        fc1.weight.copy_(moe.experts.w1[0].t())
        fc1.bias.copy_(moe.experts.b1[0])
        fc2.weight.copy_(moe.experts.w2[0].t())
        fc2.bias.copy_(moe.experts.b2[0])
    x = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    out = moe.train()(x)
    dense = fc2(torch.relu(fc1(x)))
    torch.testing.assert_close(out.y, dense)
    assert out.aux_loss.item() == 0.0  # CV^2 of a single expert is 0
    gx_moe, gw_moe = torch.autograd.grad(out.y.square().sum(), [x, moe.experts.w1])
    gx_dense, gw_dense = torch.autograd.grad(dense.square().sum(), [x, fc1.weight])
    torch.testing.assert_close(gx_moe, gx_dense)
    torch.testing.assert_close(gw_moe[0], gw_dense.t())


def test_grouped_mm_backend_matches_reference_on_cpu():
    # torch's grouped GEMM runs on CPU in float32 when rows are 16-byte aligned (dims multiple of 4).
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    moe = _make("noisy_topk", None, False, torch.float32, dim=8, hidden=12, backend="grouped_mm").train()
    _assert_same(moe, torch.randn(13, 8, requires_grad=True), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_backend_matches_reference_in_bfloat16():
    from moekit.experts import choose_compute

    moe = moekit.MoE(64, 8, 2, 128, device="cuda", dtype=torch.bfloat16).train()
    x = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16)
    counts = [12] * 8
    expected = "grouped_mm" if torch.cuda.get_device_capability() >= (9, 0) else "bmm"
    assert choose_compute("auto", x, counts)[0] == expected
    torch.manual_seed(0)
    fast = moe(x).y
    torch.manual_seed(0)
    ref = reference_moe(moe, x).y
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("cf", [None, 1.0])
def test_bmm_over_several_expert_groups_matches_reference(activation, cf):
    # 24 experts and skewed routing: the padded layout splits them into groups of unequal caps.
    from moekit.experts import choose_compute

    torch.manual_seed(3)
    moe = _make("topk", cf, False, torch.float64, activation=activation, num_experts=24, k=3,
                backend="bmm").train()
    with torch.no_grad():
        moe.router.w_gate.mul_(3.0)
    x = torch.randn(4, 30, 7, dtype=torch.float64, requires_grad=True)
    counts = torch.bincount(moe.router(x.reshape(-1, 7)).indices.reshape(-1).clamp(min=0), minlength=24)
    _, plan = choose_compute("bmm", x, counts.tolist())
    assert len(plan.groups) >= 2 and len({g.cap for g in plan.groups}) >= 2
    _assert_same(moe, x, None)
