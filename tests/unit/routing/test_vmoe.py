"""The V-MoE router: hand-derived gates, the 1/E noise, the load estimator, capacity rounded to 4."""

import math

import pytest
import torch

import moekit
from moekit.reference import reference_moe
from moekit.routing.vmoe import VMoERouter

torch.set_num_threads(1)


def test_gates_are_the_full_softmax_not_renormalised():
    # Logits [0, ln 2, ln 5] -> softmax [1, 2, 5] / 8 = [0.125, 0.25, 0.625].
    # k = 2 keeps experts 2 and 1 with gates 0.625 and 0.25 (sum 0.875: not renormalised to 1).
    # Importance (whole clean softmax, two identical tokens) = [0.25, 0.5, 1.25]; mean 2/3,
    # population variance ((0.25-2/3)^2 + (0.5-2/3)^2 + (1.25-2/3)^2)/3 = 0.1806, CV^2 = 0.40625.
    router = VMoERouter(dim=1, num_experts=3, k=2).eval()
    with torch.no_grad():
        router.w_gate.copy_(torch.tensor([[0.0, math.log(2), math.log(5)]]))
    r = router(torch.ones(2, 1))
    assert r.indices.tolist() == [[2, 1], [2, 1]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.625, 0.25]] * 2))
    torch.testing.assert_close(r.stats.importance, torch.tensor([0.25, 0.5, 1.25]))
    torch.testing.assert_close(r.stats.losses["importance"], torch.tensor(0.40625))
    # Without noise the load is the hard count: expert 0 never chosen.
    torch.testing.assert_close(r.stats.load, torch.tensor([0.0, 2.0, 2.0]))
    expected_aux = 0.005 * 0.40625 + 0.005 * float(moekit.routing.losses.cv_squared(torch.tensor([0.0, 2.0, 2.0])))
    torch.testing.assert_close(r.aux_loss, torch.tensor(expected_aux))


def test_default_noise_std_is_one_over_e():
    # E = 2, clean logits [0, 0.5]: expert 1 wins iff 0.5 + n1 > n0 with n ~ N(0, s^2) i.i.d.,
    # i.e. with probability Phi(0.5 / (sqrt(2) s)). With s = 1/E = 0.5: Phi(0.7071) = 0.7602.
    torch.manual_seed(0)
    router = VMoERouter(dim=1, num_experts=2, k=1).train()
    assert router.noise_std == 0.5
    with torch.no_grad():
        router.w_gate.copy_(torch.tensor([[0.0, 0.5]]))
    r = router(torch.ones(40000, 1))
    frac = (r.indices[:, 0] == 1).double().mean().item()
    assert abs(frac - 0.7602) < 0.01
    # In eval mode there is no noise: every token takes expert 1.
    assert (router.eval()(torch.ones(8, 1)).indices == 1).all()


def test_smooth_load_matches_monte_carlo_counts():
    # E[P(x, i)] over the noise is the probability that i is in the top k, so the mean smooth load
    # over many draws must match the mean hard count.
    torch.manual_seed(1)
    router = VMoERouter(dim=6, num_experts=4, k=2, init_std=0.1).train()
    x = torch.randn(64, 6)
    loads, counts = [], []
    with torch.no_grad():
        for _ in range(400):
            r = router(x)
            loads.append(r.stats.load)
            counts.append(r.stats.counts.double())
    torch.testing.assert_close(torch.stack(loads).mean(0).double(), torch.stack(counts).mean(0), atol=0.6, rtol=0.02)


def test_k1_gate_has_a_gradient():
    # With renormalised top-1 the gate would be constant 1; V-MoE keeps the softmax value.
    router = VMoERouter(dim=4, num_experts=4, k=1).eval()
    r = router(torch.randn(5, 4))
    r.weights.sum().backward()
    assert router.w_gate.grad.abs().sum() > 0


def test_capacity_rounded_up_to_a_multiple_of_four():
    # T = 10 tokens, k = 1, cf = 1, E = 4: ceil(10/4) = 3, rounded up to 4. Every token wants expert 0.
    moes = [moekit.MoE(4, 4, k=1, router="vmoe", capacity_factor=1.0, capacity_multiple=m).eval() for m in (1, 4)]
    x = torch.rand(10, 4) + 0.1
    for moe in moes:
        with torch.no_grad():
            moe.router.w_gate.copy_(torch.tensor([[5.0, 0, 0, 0]] * 4))
    assert [moe(x).stats.counts[0].item() for moe in moes] == [3, 4]
    assert [moe(x).stats.dropped for moe in moes] == [7, 6]


@pytest.mark.parametrize("k", [1, 2])
def test_layer_with_vmoe_router_matches_reference(k):
    torch.manual_seed(2)
    moe = moekit.MoE(8, 4, k=k, hidden_dim=16, router="vmoe", router_kwargs={"init_std": 1.0},
                     capacity_factor=1.05, capacity_multiple=4, batch_prioritized=True, activation="gelu").eval()
    x = torch.randn(3, 7, 8)
    out, ref = moe(x), reference_moe(moe, x)
    torch.testing.assert_close(out.y, ref.y, atol=1e-5, rtol=1e-5)
    assert out.stats.dropped == ref.stats.dropped


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        VMoERouter(4, 4, k=5)
    with pytest.raises(ValueError, match="capacity_multiple=0"):
        moekit.MoE(4, 4, router="vmoe", capacity_factor=1.0, capacity_multiple=0)
