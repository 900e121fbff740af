"""The paths a GPU takes, on each device at hand: bfloat16 experts through torch's grouped GEMM
against one matmul per expert, and a transformers Mixtral block against its moekit replacement.

Every test runs on the CPU here, which checks the same code, and on CUDA where a GPU is
(``benchmarks/gpu_check.sh`` runs them there; elsewhere the CUDA cases skip).
"""

import copy

import pytest
import torch

import moekit

torch.set_num_threads(1)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]
BF16 = {"rtol": 2e-2, "atol": 2e-2}  # two bfloat16 computations of the same sums, in different orders


def _grouped_mm_runs(device: str) -> None:
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch's CUDA grouped GEMM needs compute capability 9.0 (Hopper) or later")


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_equals_one_matmul_per_expert_in_bfloat16(device):
    # 16 experts, 12 tokens, k = 2: some experts get no row, and their weight gradient must be zero.
    _grouped_mm_runs(device)
    torch.manual_seed(0)
    kw = {"router": "topk", "activation": "swiglu", "bias": False, "device": device, "dtype": torch.bfloat16}
    grouped = moekit.MoE(64, 16, 2, 128, expert_backend="grouped_mm", **kw).train()
    loop = moekit.MoE(64, 16, 2, 128, expert_backend="loop", **kw).train()
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(12, 64, device=device, dtype=torch.bfloat16)
    grads = []
    for moe in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        out = moe(xi)
        (out.y.float().square().sum() + out.aux_loss).backward()
        grads.append((out.y, xi.grad, moe.experts.w1.grad, moe.experts.w2.grad, moe.experts.w3.grad))
    for name, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), *grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **BF16, msg=name)
    idle = torch.ones(16, dtype=torch.bool)
    idle[grouped.decide(x, None)[0].reshape(-1).cpu()] = False
    assert idle.any()  # the case covers experts without rows
    assert grouped.experts.w1.grad[idle.to(device)].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_mixtral_block_and_its_moekit_replacement_agree_in_bfloat16(device):
    pytest.importorskip("transformers")
    from moekit.bench.hf import mixtral_candidates

    moe, blocks = mixtral_candidates(64, 128, 8, 2, 24, torch.bfloat16)
    block = copy.deepcopy(blocks["hf_eager"]).to(device)
    moe = moe.to(device)
    x = torch.randn(24, 64, device=device, dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = moe(xa).y
    yb = block(xb[None])
    yb = (yb[0] if isinstance(yb, tuple) else yb)[0]
    torch.testing.assert_close(ya.float(), yb.float(), **BF16)
    ya.float().square().sum().backward()
    yb.float().square().sum().backward()
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), **BF16)
