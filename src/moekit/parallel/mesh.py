"""The ("dp", "ep") device mesh of a run: expert parallelism inside groups, data parallelism across them.

Legend: W ranks, P = ep_size ranks per expert-parallel group, R = W/P groups (the "dp" size),
E experts of a layer, L = E/P experts per rank.

The W ranks form a 2-D mesh of shape (R, P) named ("dp", "ep"); rank r sits at (r // P, r % P).
Along "ep" the P consecutive ranks of one group hold one copy of every expert between them (rank
(d, e) the block [e*L, (e+1)*L)) and exchange tokens all-to-all; consecutive ranks are those of
one node under torchrun, so the all-to-all stays on the fast links when P divides the GPUs per
node. Along "dp" the R ranks (d, e), d = 0..R-1, hold the same expert block and are data-parallel
replicas of it. The dense parameters are replicated (or, with FSDP, sharded) over all W ranks.

``parallelize`` records the layout on the model; ``layout_of(model)`` and ``mesh_of(model)`` read it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "ep")
_LAYOUT_ATTR = "_moekit_layout"


class MeshLayout(NamedTuple):
    """How a parallelized model is laid out over the ranks.

    Attributes:
        mesh: the 2-D ``DeviceMesh`` of shape (dp, ep) named ("dp", "ep"); None only for a model
            parallelized over a sub-group with today's layout (``parallelize(model, group=g)``).
        dp: R, the replicas of each expert block.
        ep: P, the ranks one layer's experts are sharded over.
        fsdp: True when the dense parameters are sharded over all ranks and each expert block over
            "dp" (``torch.distributed.fsdp.fully_shard``); False when they are replicated.
        reduces_in_backward: True when the gradients are reduced during ``backward`` (FSDP2's
            reduce-scatter, or ``replicate``'s all-reduce); False for today's layout, where
            ``sync_gradients`` must be called after ``backward``.
    """

    mesh: DeviceMesh | None
    dp: int
    ep: int
    fsdp: bool
    reduces_in_backward: bool


def check_ep_size(ep_size: int | None, world_size: int) -> int:
    """``ep_size`` (None: the whole world), checked to divide ``world_size``; else ``ValueError``/``TypeError``."""
    if ep_size is None:
        return world_size
    if isinstance(ep_size, bool) or not isinstance(ep_size, int):
        raise TypeError(f"ep_size={ep_size!r} must be an int (a process group goes in group=)")
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must be a positive divisor of the world size {world_size}")
    return ep_size


def build_mesh(ep_size: int | None = None, device_type: str = "cpu") -> DeviceMesh:
    """The ("dp", "ep") mesh of shape (W/ep_size, ep_size) over every rank of the default group.

    Every rank calls this (it creates the process groups of both dimensions).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("a device mesh needs an initialized process group: call "
                           "moekit.parallel.init_distributed(device) (under torchrun) first")
    world = dist.get_world_size()
    ep = check_ep_size(ep_size, world)
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=MESH_DIMS)


def device_type_of(model: nn.Module) -> str:
    """Where ``model`` computes: its first real tensor's device type; for a model built on the meta
    device, the process group's (cuda for NCCL, cpu otherwise)."""
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_meta:
            return t.device.type
    return "cuda" if "nccl" in str(dist.get_backend()).lower() else "cpu"


def set_layout(model: nn.Module, layout: MeshLayout) -> None:
    # A plain attribute: nn.Module keeps it out of state_dict() and parameters().
    setattr(model, _LAYOUT_ATTR, layout)


def find_layout(model: nn.Module) -> MeshLayout | None:
    """The ``MeshLayout`` that ``moekit.parallel.parallelize`` gave ``model``, or None."""
    return getattr(model, _LAYOUT_ATTR, None)


def layout_of(model: nn.Module) -> MeshLayout:
    """The ``MeshLayout`` that ``moekit.parallel.parallelize`` gave ``model``; ``ValueError`` if none."""
    layout = find_layout(model)
    if layout is None:
        raise ValueError(f"{type(model).__name__} was not parallelized: call moekit.parallel.parallelize(model, ...)")
    return layout


def mesh_of(model: nn.Module) -> DeviceMesh:
    """The ("dp", "ep") ``DeviceMesh`` of a parallelized ``model`` (``mesh["ep"]``: its expert-parallel
    group, ``mesh["dp"]``: the replicas of its expert block)."""
    layout = layout_of(model)
    if layout.mesh is None:
        raise ValueError("this model was parallelized over a sub-group (group=...), which has no device mesh; "
                         "parallelize over the whole world to get one")
    return layout.mesh


def is_reduced_in_backward(model: nn.Module) -> bool:
    """True for a model whose gradients ``backward`` reduces itself (FSDP2 / ``replicate``)."""
    layout = find_layout(model)
    return layout is not None and layout.reduces_in_backward
