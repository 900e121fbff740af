"""Capacity and batch-prioritised routing on hand-made examples."""

import pytest
import torch

from moekit.dispatch import capacity_keep, combine, expert_capacity, sort_by_expert


def test_expert_capacity_formula():
    assert expert_capacity(10, 2, 1.0, 4) == 5  # ceil(20 / 4)
    assert expert_capacity(10, 1, 1.05, 4) == 3  # ceil(2.625)
    assert expert_capacity(10, 1, 1.05, 4, multiple=4) == 4
    assert expert_capacity(100, 1, 1.5, 8, multiple=4) == 20  # ceil(18.75) = 19 -> 20
    with pytest.raises(ValueError, match="capacity_factor=0"):
        expert_capacity(10, 1, 0, 4)


def test_first_choices_claim_places_before_second_choices():
    # 3 tokens, k = 2, capacity 2. Expert 0 is the first choice of tokens 1 and 2 and the second
    # choice of token 0: the two first choices win even though token 0 comes first.
    idx = torch.tensor([[1, 0], [0, 1], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    keep = capacity_keep(idx, w, num_experts=2, capacity=2)
    assert keep.tolist() == [[True, False], [True, True], [True, False]]


def test_batch_prioritised_routing_keeps_confident_tokens():
    # Top-1, 4 tokens all to expert 0, capacity 2: in token order tokens 0, 1 keep their place;
    # with BPR the two with the highest gate (tokens 3 and 1) do.
    idx = torch.zeros(4, 1, dtype=torch.long)
    w = torch.tensor([[0.3], [0.8], [0.5], [0.9]])
    assert capacity_keep(idx, w, 2, 2).flatten().tolist() == [True, True, False, False]
    assert capacity_keep(idx, w, 2, 2, batch_prioritized=True).flatten().tolist() == [False, True, False, True]


def test_empty_slots_are_never_kept_nor_take_a_place():
    idx = torch.tensor([[-1], [0], [0]])
    keep = capacity_keep(idx, torch.ones(3, 1), 1, 2)
    assert keep.flatten().tolist() == [False, True, True]


def test_sort_and_combine_round_trip():
    idx = torch.tensor([[2, 0], [-1, 2], [1, -1]])
    perm = sort_by_expert(idx, 3)
    assert perm.counts == [1, 1, 2]
    assert perm.token_ids_N.tolist() == [0, 2, 0, 1]  # stable: token order inside each expert
    h = torch.arange(4, dtype=torch.float32)[:, None] + 1  # slot values 1..4 in sorted order
    w = torch.tensor([[0.5, 2.0], [9.0, 3.0], [1.0, 9.0]])
    y = combine(h, perm, w, 3)
    # token 0: expert 2 (sorted slot 2 -> 3) * 0.5 + expert 0 (slot 0 -> 1) * 2.0 = 3.5
    # token 1: expert 2 (slot 3 -> 4) * 3.0 = 12;  token 2: expert 1 (slot 1 -> 2) * 1.0 = 2
    assert y.flatten().tolist() == [3.5, 12.0, 2.0]
