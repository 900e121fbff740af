"""Tiling of examples into ensemble members, and the member-innermost layout of the partitioned router.

Legend: B examples, M ensemble members, R = B*M rows (tiled examples), S tokens per row, D model dim.

E^3 repeats each example M times right before the first MoE block (the copies adjacent: row
``b*M + m`` is copy m of example b). Blocks before that point run once per example; that block and
every later one, the head included, run on all M copies.
"""

from __future__ import annotations

import torch

from moekit.types import MoEOutput


def tile_examples(x: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """[B, ...] -> [B*M, ...]: each example repeated M times, the copies adjacent (``repeat``, not ``tile``)."""
    return x.repeat_interleave(ensemble_size, dim=0) if ensemble_size > 1 else x


def members_innermost(x_R_D: torch.Tensor, ensemble_size: int) -> torch.Tensor:
    """[B*M, *S, D] -> [B, *S, M, D]: the flattened token t of the result belongs to member t % M."""
    if x_R_D.shape[0] % ensemble_size:
        raise ValueError(f"{x_R_D.shape[0]} rows is not a multiple of ensemble_size={ensemble_size}")
    return x_R_D.unflatten(0, (-1, ensemble_size)).movedim(1, -2)


def members_outermost(y_B_MD: torch.Tensor) -> torch.Tensor:
    """Inverse of ``members_innermost``: [B, *S, M, D] -> [B*M, *S, D]."""
    return y_B_MD.movedim(-2, 1).flatten(0, 1)


def partitioned_moe(moe, x_R_D: torch.Tensor, ensemble_size: int, mask: torch.Tensor | None = None) -> MoEOutput:
    """Run an MoE whose router is partitioned over M members on tiled rows ``[B*M, *S, D]``.

    The layer sees the tokens member-innermost (the router's contract) and the output comes back in
    the tiled row order. ``mask`` is [B*M, *S] bool, or None.
    """
    if ensemble_size == 1:
        return moe(x_R_D, mask)
    mask_in = None
    if mask is not None:
        mask_in = members_innermost(mask[..., None], ensemble_size)[..., 0]
    out = moe(members_innermost(x_R_D, ensemble_size), mask_in)
    return out._replace(y=members_outermost(out.y))
