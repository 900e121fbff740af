"""Checkpoints of parallelized models that load on any layout, and single-process state dicts.

Legend: E experts of a layer, W ranks, P ranks of an expert-parallel group, L = E/P experts per rank.

``save_distributed`` writes with ``torch.distributed.checkpoint`` (DCP): every rank writes its
own experts, one copy of the replicated tensors is kept, and the metadata records each expert
weight as a global [E, ...] tensor sharded on its first dimension. ``load_distributed`` asks for
whatever block the loading rank owns, so a checkpoint saved on W ranks loads on W' ranks (W' = 1:
a plain single-process model), and a single-process checkpoint loads into an expert-parallel one.
DCP reads the ``.metadata`` file of a checkpoint with ``pickle.load``: load only checkpoints you
trust.

``full_state_dict`` / ``load_full_state_dict`` (and ``full_optimizer_state_dict`` /
``load_full_optimizer_state_dict``) convert to and from an ordinary ``state_dict`` with full expert
tensors, for ``torch.save`` files (loadable with ``weights_only=True``, which is why the command-line
jobs use them) and models that never run distributed.

Every layout of ``moekit.parallel.parallelize`` is covered. On the ("dp", "ep") mesh layout the
parameters and their optimizer state are DTensors: a dense one sharded over the W ranks (FSDP) or
replicated on them; an expert block [L, ...] sharded over (FSDP) or replicated on the R ranks
holding it. Both formats above are the layout-free ones: ``full_tensor`` joins a DTensor's pieces,
the expert blocks are then joined over the "ep" group, and loading cuts the same pieces back out
(``distribute_tensor`` without communication). So a checkpoint saved on any layout loads on any
other, one process included. A DCP checkpoint of an FSDP model briefly holds each rank's whole
expert block ([L, ...]) while it is written or read: what 4-way expert parallelism holds anyway.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, NamedTuple, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moekit.parallel.expert_parallel import all_to_all_of, expert_parallel_layers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process whenever none is initialized; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


class _Block(NamedTuple):
    """An expert weight of an expert-parallel layer: this rank holds experts [lo, hi) of E."""

    name: str
    lo: int
    hi: int
    num_experts: int
    group: Any  # the expert-parallel process group (None: the default group)


def _expert_blocks(model: nn.Module) -> dict[int, _Block]:
    """id(expert parameter) -> its ``_Block``."""
    blocks = {}
    for layer_name, layer in expert_parallel_layers(model):
        dispatcher = all_to_all_of(layer)
        lo = dispatcher.first_expert
        hi = lo + dispatcher.local_experts
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, p in layer.experts.named_parameters():
            blocks[id(p)] = _Block(prefix + name, lo, hi, layer.num_experts, dispatcher.group)
    return blocks


def _blocks_by_name(model: nn.Module) -> dict[str, _Block]:
    return {b.name: b for b in _expert_blocks(model).values()}


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole tensor (a collective over its mesh); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _join_blocks(block: torch.Tensor, group) -> torch.Tensor:
    """Every rank's expert block of ``group``, concatenated in rank order: the [E, ...] tensor."""
    block = block.contiguous()
    parts = [torch.empty_like(block) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, block, group=group)
    return torch.cat(parts)


def _like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``target``: this rank's piece of it when ``target`` is a
    DTensor (cut locally, every rank holding ``value``), else ``value`` itself."""
    if not isinstance(target, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def _keeps(to_rank0: bool) -> bool:
    return not to_rank0 or not _distributed() or dist.get_rank() == 0


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, group=None) -> dict:
    """The nested dict DCP saves and loads: ``{"model": ..., "optim": ...}`` keyed by parameter name,
    expert weights (and their optimizer moments) as DTensors of the whole [E, ...] tensor when the
    model is expert-parallel, FSDP's DTensors as they are.

    An optimizer with no state yet gets zero state (a step with zero gradients and lr 0), so a
    fresh optimizer can be loaded into.
    """
    return _checkpoint_state(model, optimizer)[0]


def _checkpoint_state(model: nn.Module, optimizer) -> tuple[dict, list[tuple[str, ...]]]:
    """``checkpoint_state`` and the paths of the expert entries it made global (to undo on load)."""
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    blocks = _blocks_by_name(model)
    if not blocks:
        return state, []
    device_type = next(model.parameters()).device.type
    meshes: dict[int, DeviceMesh] = {}

    def as_global(value: torch.Tensor, block: _Block) -> DTensor:
        # This rank's [L, ...] block as a DTensor sharded on dim 0 over the "ep" group: DCP then
        # records the global [E, ...] shape and the block's offset (lo). The replicas of a block
        # ("dp") write the same item, which DCP keeps once.
        group = cast(dist.ProcessGroup, block.group or dist.group.WORLD)
        mesh = meshes.setdefault(id(group), DeviceMesh.from_group(group, device_type))
        return DTensor.from_local(_whole(value), mesh, [Shard(0)], run_check=False)

    paths: list[tuple[str, ...]] = []
    for name in sorted(blocks):  # the same order on every rank: _whole may be a collective
        state["model"][name] = as_global(state["model"][name], blocks[name])
        paths.append(("model", name))
    if optimizer is not None:
        shapes = {n: p.shape for n, p in model.named_parameters() if n in blocks}
        # New dicts: the optimizer's own state must keep its tensors.
        optim_state = {**state["optim"], "state": dict(state["optim"]["state"])}
        for name in sorted(set(blocks) & set(optim_state["state"])):
            param_state = dict(optim_state["state"][name])
            for key in sorted(param_state):
                value = param_state[key]
                # State shaped like the expert weight is sharded with it; scalars (``step``) are shared.
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == shapes[name]:
                    param_state[key] = as_global(value, blocks[name])
                    paths.append(("optim", name, key))
            optim_state["state"][name] = param_state
        state["optim"] = optim_state
    return state, paths


def _restore_layout(model: nn.Module, state: dict, paths: list[tuple[str, ...]]) -> None:
    """Undo ``_checkpoint_state``'s global expert entries in place: each back to this rank's block,
    laid out as the parameter is (its FSDP shard, when it is one)."""
    params = dict(model.named_parameters())
    for path in paths:
        if path[0] == "model":
            holder, key, name = state["model"], path[1], path[1]
        else:
            holder, key, name = state["optim"]["state"][path[1]], path[2], path[1]
        holder[key] = _like(params[name], holder[key].to_local())


def save_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     group=None) -> None:
    """Write ``model`` (and ``optimizer``) to the directory ``path``; every rank of ``group`` calls this."""
    with _quiet_single_process():
        dcp.save(checkpoint_state(model, optimizer, group), checkpoint_id=os.fspath(path), process_group=group,
                 no_dist=not _distributed())


def load_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     group=None) -> None:
    """Load a checkpoint written by ``save_distributed`` on any layout into ``model`` (and
    ``optimizer``), each rank reading its own pieces. Every rank of ``group`` calls this."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no distributed checkpoint directory at {os.fspath(path)!r}")
    state, paths = _checkpoint_state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=os.fspath(path), process_group=group, no_dist=not _distributed())
    _restore_layout(model, state, paths)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def full_state_dict(model: nn.Module, group=None, *, to_rank0: bool = False) -> dict[str, torch.Tensor] | None:
    """``model.state_dict()`` with each expert weight gathered to its full [E, ...] shape and each
    DTensor (FSDP's shards) to its whole tensor: the state dict of the equivalent single-process
    model. Every rank calls this. With ``to_rank0`` only rank 0 keeps the result (the others get
    None and never hold more than one whole tensor at a time); otherwise every rank gets it. As in
    ``state_dict()``, tensors that needed no gathering share storage with the model's.

    ``group`` is unused (each layer gathers over its own expert-parallel group); kept for callers.
    """
    blocks = _blocks_by_name(model)
    keep = _keeps(to_rank0)
    full = {}
    for name, value in model.state_dict().items():  # the same order on every rank
        value = _whole(value)
        if name in blocks:
            value = _join_blocks(value, blocks[name].group)
        if keep:
            full[name] = value
    return full if keep else None


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict (full expert weights) into a parallelized ``model``, any
    layout: each rank keeps its own pieces. Works on an ordinary model too."""
    state = dict(full)
    for key, block in _blocks_by_name(model).items():
        if key in state:
            if state[key].shape[0] != block.num_experts:
                raise ValueError(f"{key} has {state[key].shape[0]} experts, the layer has {block.num_experts}")
            state[key] = state[key][block.lo:block.hi]
    own = model.state_dict()
    model.load_state_dict({k: _like(own[k], v) if k in own else v for k, v in state.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # The order of the integer keys of ``optimizer.state_dict()``.
    return [p for group in optimizer.param_groups for p in group["params"]]


def _agree_on_state(model: nn.Module, params: list[torch.Tensor], states: dict, gathered: list[bool],
                    group) -> list[bool]:
    """Which of the parameters to be ``gathered`` have optimizer state on every rank (one all-reduce);
    ``RuntimeError`` for one that has state on some ranks only, since the collectives of the
    gather would then pair up wrongly."""
    if not any(gathered):
        return [False] * len(params)
    have = torch.tensor([index in states for index in range(len(params))], dtype=torch.int64,
                        device=params[0].device)
    dist.all_reduce(have, group=group)
    world = dist.get_world_size(group)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, count, needed in zip(params, have.tolist(), gathered, strict=True):
        if needed and 0 < count < world:
            raise RuntimeError(f"optimizer state of {names.get(id(p), 'a parameter')} exists on {count} of "
                               f"{world} ranks; cannot gather it into one state dict")
    return [count == world for count in have.tolist()]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, group=None, *,
                              to_rank0: bool = False) -> dict | None:
    """``optimizer.state_dict()`` with the state of each expert weight shaped like it (Adam's
    moments, say) gathered to the full [E, ...] shape, and each DTensor to its whole tensor: the
    state dict of the same optimizer on the equivalent single-process model. Every rank of
    ``group`` (the whole world on the mesh layout) calls this; ``to_rank0`` as in ``full_state_dict``."""
    full = optimizer.state_dict()
    full["state"] = dict(full["state"])
    blocks = _expert_blocks(model)
    params = _optimizer_params(optimizer)
    gathered = [id(p) in blocks or isinstance(p, DTensor) for p in params]
    present = _agree_on_state(model, params, full["state"], gathered, group)
    keep = _keeps(to_rank0)
    for index, p in enumerate(params):
        if not (gathered[index] and present[index]):
            continue
        local = full["state"][index]
        whole = dict(local)
        for key in sorted(local):  # the same order on every rank
            value = local[key]
            if not isinstance(value, torch.Tensor):
                continue
            value = _whole(value)
            if id(p) in blocks and value.dim() > 0 and value.shape == p.shape:
                value = _join_blocks(value, blocks[id(p)].group)
            whole[key] = value
        if keep:
            full["state"][index] = whole
    return full if keep else None


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a single-process optimizer state dict into the optimizer of a parallelized ``model``, any
    layout: each rank keeps its own pieces of every state tensor. Works on an ordinary model too."""
    state = {**full, "state": dict(full["state"])}
    blocks = _expert_blocks(model)
    for index, p in enumerate(_optimizer_params(optimizer)):
        block = blocks.get(id(p))
        if index not in state["state"] or (block is None and not isinstance(p, DTensor)):
            continue
        param_state = dict(state["state"][index])
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if block is not None and value.shape[1:] == p.shape[1:]:
                if value.shape[0] != block.num_experts:
                    raise ValueError(f"optimizer state {key!r} of {block.name} has {value.shape[0]} experts, "
                                     f"the layer has {block.num_experts}")
                value = value[block.lo:block.hi].clone()
            if value.shape == p.shape:
                value = _like(p, value)
            param_state[key] = value
        state["state"][index] = param_state
    optimizer.load_state_dict(state)
