"""How a batch of tokens is split over processes, seen by the code that needs the whole batch.

Legend: T tokens (of this shard), W shards.

The balancing statistics (importance, load, counts), the per-token means inside some losses and
the capacity step's claim order are defined on the whole batch. A router or layer that computes
them on its own tokens calls ``shards.sum`` on every sum over tokens and ``shards.gather`` where
it needs the other shards' rows. On one device the batch is one shard and both are identities;
``moekit.parallel`` swaps in an object that does the same with collectives, so the single-device
code never mentions process groups.
"""

from __future__ import annotations

from typing import Protocol

import torch


class BatchShards(Protocol):
    """The shards of one batch, in shard (rank) order.

    ``sum(x)``: elementwise sum of ``x`` over all shards; differentiable in ``x``.
    ``sum_many(*xs)``: ``tuple(sum(x) for x in xs)`` at the cost of one ``sum`` (one collective).
    ``gather(x_T)``: (the rows of ``x_T`` [T, ...] of every shard concatenated in shard order, the
    index of this shard's first row in it); not differentiable.
    ``rows(n, device)``: (the number of rows of the whole batch, the index of this shard's first
    row), given this shard's ``n`` rows (``device``: where the collective's tensors live).
    ``count``: the number of shards.
    """

    count: int

    def sum(self, x: torch.Tensor) -> torch.Tensor: ...

    def sum_many(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def gather(self, x_T: torch.Tensor) -> tuple[torch.Tensor, int]: ...

    def rows(self, n: int, device: torch.device) -> tuple[int, int]: ...


class LocalShards:
    """A batch held whole by one process."""

    count = 1

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def sum_many(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return xs

    def gather(self, x_T: torch.Tensor) -> tuple[torch.Tensor, int]:
        return x_T, 0

    def rows(self, n: int, device: torch.device) -> tuple[int, int]:
        return n, 0

    def __repr__(self) -> str:
        return "LocalShards()"


LOCAL_SHARDS = LocalShards()


def randn_rows(like_T: torch.Tensor, shards: BatchShards = LOCAL_SHARDS,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """``torch.randn_like(like_T)`` for this shard's rows of one draw over the whole batch.

    Router noise is drawn per token. Were each shard to draw for its own rows, processes seeded
    alike would give row i of every shard the same noise; drawing the whole batch's [T_all, ...]
    table and keeping this shard's rows gives every token its own noise, the very noise one
    process would draw for the whole batch (so results do not depend on how the batch is split).
    The price is a draw W times larger, small beside the router's matmul when W < D.

    ``rows``: ``shards.rows(T, device)`` when the caller knows it already (one collective fewer).
    """
    if shards.count == 1:
        return torch.randn_like(like_T)
    total, start = rows if rows is not None else shards.rows(like_T.shape[0], like_T.device)
    table = torch.randn_like(like_T.new_empty((total, *like_T.shape[1:])))
    return table[start:start + like_T.shape[0]]
