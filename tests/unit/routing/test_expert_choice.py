"""Expert-choice routing: equal counts, padding never taken, hand-derived choices, non-causality."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.reference import reference_expert_choice_routing
from moekit.routing.expert_choice import expert_choice_m


def test_m_is_ceil_k_t_over_e_capped_at_t():
    assert expert_choice_m(10, 4, 2) == 5  # ceil(20 / 4)
    assert expert_choice_m(7, 4, 2) == 4  # ceil(14 / 4) = ceil(3.5)
    assert expert_choice_m(3, 2, 2) == 3  # ceil(6 / 2) = 3 = T
    assert expert_choice_m(3, 4, 4) == 3  # ceil(12 / 4) = 3 = T: every expert takes every token
    assert expert_choice_m(0, 4, 2) == 0


def test_each_expert_takes_its_best_tokens_by_hand():
    # Two experts, logits [l, -l] per token, so softmax scores s0 = sigmoid(2l), s1 = 1 - s0.
    # l = [2, 1, -1, 0.5]: s0 ranks tokens 0 > 1 > 3 > 2, s1 ranks 2 > 3 > 1 > 0. k=1: m = ceil(4/2) = 2.
    r = moekit.ExpertChoiceRouter(1, 2, k=1)
    with torch.no_grad():
        r.w_gate.copy_(torch.tensor([[1.0, -1.0]]))
    x = torch.tensor([[2.0], [1.0], [-1.0], [0.5]])
    routing = r(x)
    assert routing.indices.tolist() == [[0], [0], [1], [1]]
    s0 = torch.sigmoid(2 * x[:, 0])
    torch.testing.assert_close(routing.weights[:, 0], torch.stack([s0[0], s0[1], 1 - s0[2], 1 - s0[3]]))
    assert routing.stats.counts.tolist() == [2, 2]
    # k=2: m = 4, both experts take every token, in index order.
    r.k = 2
    assert r(x).indices.tolist() == [[0, 1]] * 4


@settings(max_examples=30, deadline=None)
@given(num_tokens=st.integers(0, 30), num_experts=st.integers(1, 6), k=st.integers(1, 6), seed=st.integers(0, 999),
       pad_fraction=st.floats(0, 0.6))
def test_every_expert_computes_the_same_count_and_padding_is_never_taken(num_tokens, num_experts, k, seed,
                                                                          pad_fraction):
    k = min(k, num_experts)
    gen = torch.Generator().manual_seed(seed)
    r = moekit.ExpertChoiceRouter(5, num_experts, k, init_std=1.0)
    x = torch.randn(num_tokens, 5, generator=gen)
    mask = torch.rand(num_tokens, generator=gen) >= pad_fraction
    routing = r(x, mask)
    num_real = int(mask.sum())
    m = min(num_real, math.ceil(k * num_real / num_experts))
    assert routing.stats.counts.tolist() == [m] * num_experts
    assert (routing.indices[~mask] == -1).all() and (routing.weights[~mask] == 0).all()
    ref_indices, ref_weights, _, _ = reference_expert_choice_routing(r, x, mask)
    assert routing.indices.tolist() == ref_indices.tolist()
    torch.testing.assert_close(routing.weights, ref_weights.reshape(routing.weights.shape))


def test_tokens_get_zero_to_e_experts_and_mean_k():
    torch.manual_seed(0)
    r = moekit.ExpertChoiceRouter(6, 4, k=2, init_std=2.0)
    routing = r(torch.randn(40, 6))
    per_token = (routing.indices >= 0).sum(-1)
    assert per_token.float().mean() == 2.0  # 4 experts x 20 tokens / 40 tokens
    assert per_token.min() == 0 or per_token.max() > 2  # uneven across tokens, as the paper allows


def test_equal_scores_go_to_the_earlier_token():
    # Identical tokens score alike everywhere; m = ceil(4/2) = 2: both experts take tokens 0 and 1.
    r = moekit.ExpertChoiceRouter(3, 2, k=1)
    routing = r(torch.ones(4, 3))
    assert routing.indices.tolist() == [[0, 1], [0, 1], [-1, -1], [-1, -1]]
    assert routing.stats.counts.tolist() == [2, 2]


def test_not_causal_a_later_token_changes_an_earlier_tokens_routing():
    # Documented: expert choice must not be used for autoregressive models. Two experts, logits
    # [l, -l]. Alone, tokens l = 2, -2 go to experts 0 and 1 (m = 1). Two later tokens that prefer
    # expert 0 even more (l = 3, 2.5) take its m = 2 places, and token 0 moves to expert 1, whose
    # best two are now tokens 1 (s1 = sigmoid(4)) and 0 (sigmoid(-4) > sigmoid(-5) > sigmoid(-6)).
    r = moekit.ExpertChoiceRouter(1, 2, k=1)
    with torch.no_grad():
        r.w_gate.copy_(torch.tensor([[1.0, -1.0]]))
    early = torch.tensor([[2.0], [-2.0]])
    assert r(early).indices.tolist() == [[0], [1]]
    routing = r(torch.cat([early, torch.tensor([[3.0], [2.5]])]))
    assert routing.indices.tolist() == [[1], [1], [0], [0]]


def test_gradients_reach_the_gate_through_the_weights():
    torch.manual_seed(0)
    r = moekit.ExpertChoiceRouter(5, 3, 2)
    routing = r(torch.randn(8, 5))
    (grad,) = torch.autograd.grad(routing.weights.sum(), [r.w_gate])
    assert grad.abs().sum() > 0


def test_layer_builds_it_by_name_and_rejects_bad_k():
    moe = moekit.MoE(6, 4, 2, 8, router="expert_choice")
    assert isinstance(moe.router, moekit.ExpertChoiceRouter)
    with pytest.raises(ValueError, match="k=5 exceeds num_experts=4"):
        moekit.MoE(6, 4, 5, 8, router="expert_choice")
