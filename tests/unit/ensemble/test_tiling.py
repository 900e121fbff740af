"""Tiling examples into members, and the member-innermost token layout."""

import torch

from moekit.ensemble import (
    members_innermost,
    members_outermost,
    tile_examples,
)


def test_tiling_repeats_each_example_adjacently():
    x = torch.tensor([[10.0], [20.0], [30.0]])
    assert tile_examples(x, 2)[:, 0].tolist() == [10, 10, 20, 20, 30, 30]
    assert tile_examples(x, 1) is x


def test_members_innermost_puts_member_m_at_tokens_t_mod_m():
    B, M, S, D = 3, 2, 5, 4
    rows = torch.arange(B * M).float()  # row b*M + m
    x_RSD = rows[:, None, None].expand(B * M, S, D).clone()
    flat_TD = members_innermost(x_RSD, M).reshape(-1, D)
    member_T = flat_TD[:, 0].long() % M
    assert torch.equal(member_T, torch.arange(B * S * M) % M)
    torch.testing.assert_close(members_outermost(members_innermost(x_RSD, M)), x_RSD)
