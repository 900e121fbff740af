"""Checkpoints of expert-parallel models that load on any world size, and single-process state dicts.

Legend: E experts of a layer, W ranks, L = E/W experts per rank.

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
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moekit.parallel.expert_parallel import EXPERT_WEIGHTS, expert_parallel_layers, expert_parameter_names


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes' a single process whenever none is initialized; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _as_global(local: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """This rank's block as a DTensor sharded on dim 0: DCP then records the global [E, ...] shape
    and this rank's offset in it (rank r's block starts at r*L, as ``apply_expert_parallel`` cut it)."""
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False)


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, group=None) -> dict:
    """The nested dict DCP saves and loads: ``{"model": ..., "optim": ...}`` keyed by parameter name,
    expert weights (and their optimizer moments) as DTensors when the model is expert-parallel.

    An optimizer with no state yet gets zero state (a step with zero gradients and lr 0), so a
    fresh optimizer can be loaded into.
    """
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    names = expert_parameter_names(model)
    if names:
        device_type = next(model.parameters()).device.type
        mesh = DeviceMesh.from_group(group or dist.group.WORLD, device_type)
        shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
        for name in names:
            state["model"][name] = _as_global(state["model"][name], mesh)
        if optimizer is not None:
            # New dicts: the optimizer's own state must keep its plain tensors.
            state["optim"] = {**state["optim"], "state": {
                name: {key: _as_global(value, mesh) if _is_expert_moment(value, shapes.get(name)) else value
                       for key, value in param_state.items()}
                for name, param_state in state["optim"]["state"].items()}}
    return state


def _is_expert_moment(value, expert_shape: torch.Size | None) -> bool:
    """Optimizer state shaped like an expert weight is sharded with it; scalars (``step``) are shared."""
    return expert_shape is not None and isinstance(value, torch.Tensor) and value.shape == expert_shape


def _to_local(value):
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _to_local(v) for k, v in value.items()}
    return value


def save_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     group=None) -> None:
    """Write ``model`` (and ``optimizer``) to the directory ``path``; every rank of ``group`` calls this."""
    with _quiet_single_process():
        dcp.save(checkpoint_state(model, optimizer, group), checkpoint_id=os.fspath(path), process_group=group,
                 no_dist=not _distributed())


def load_distributed(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     group=None) -> None:
    """Load a checkpoint written by ``save_distributed`` on any number of ranks into ``model`` (and
    ``optimizer``), each rank reading its own expert block. Every rank of ``group`` calls this."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no distributed checkpoint directory at {os.fspath(path)!r}")
    state = checkpoint_state(model, optimizer, group)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=os.fspath(path), process_group=group, no_dist=not _distributed())
    state = _to_local(state)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def full_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each expert weight gathered to its full [E, ...] shape, on every rank:
    the state dict of the equivalent single-process model. As in ``state_dict()``, the other
    tensors share storage with the model's."""
    state = model.state_dict()
    for name in sorted(expert_parameter_names(model)):  # same order on every rank
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        state[name] = torch.cat(parts)
    return state


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict (full expert weights) into an expert-parallel ``model``:
    each rank keeps its own block of experts. Works on an ordinary model too."""
    state = dict(full)
    for layer_name, layer in expert_parallel_layers(model):
        lo = layer.dispatcher.first_expert
        hi = lo + layer.dispatcher.local_experts
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for weight in EXPERT_WEIGHTS:
            key = prefix + weight
            if key in state:
                if state[key].shape[0] != layer.num_experts:
                    raise ValueError(f"{key} has {state[key].shape[0]} experts, the layer has {layer.num_experts}")
                state[key] = state[key][lo:hi]
    model.load_state_dict(state)


def _expert_blocks(model: nn.Module) -> dict[int, tuple[str, int, int, int]]:
    """id(expert parameter) -> (name, first local expert, end of the local block, E)."""
    blocks = {}
    for layer_name, layer in expert_parallel_layers(model):
        lo = layer.dispatcher.first_expert
        hi = lo + layer.dispatcher.local_experts
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name, p in layer.experts.named_parameters():
            blocks[id(p)] = (prefix + name, lo, hi, layer.num_experts)
    return blocks


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # The order of the integer keys of ``optimizer.state_dict()``.
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, group=None) -> dict:
    """``optimizer.state_dict()`` with the state of each expert weight shaped like it (Adam's
    moments, say) gathered to the full [E, ...] shape, on every rank: the state dict of the same
    optimizer on the equivalent single-process model. Every rank of ``group`` calls this."""
    full = optimizer.state_dict()
    full["state"] = dict(full["state"])
    blocks = _expert_blocks(model)
    world = dist.get_world_size(group) if blocks else 1
    for index, p in enumerate(_optimizer_params(optimizer)):
        if id(p) not in blocks:
            continue
        name = blocks[id(p)][0]
        local = full["state"].get(index)
        # An expert block that never had a gradient has no state; the ranks must agree on that
        # before gathering, or the collectives below would pair up wrongly.
        have = torch.tensor([local is not None], dtype=torch.int64, device=p.device)
        dist.all_reduce(have, group=group)
        if int(have) == 0:
            continue
        if int(have) != world:
            raise RuntimeError(f"optimizer state of {name} exists on {int(have)} of {world} ranks; "
                               "cannot gather it into one state dict")
        gathered = dict(local)
        for key in sorted(local):
            value = local[key]
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == p.shape:
                parts = [torch.empty_like(value) for _ in range(world)]
                dist.all_gather(parts, value.contiguous(), group=group)
                gathered[key] = torch.cat(parts)
        full["state"][index] = gathered
    return full


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a single-process optimizer state dict into the optimizer of an expert-parallel ``model``:
    each rank keeps its own block of every expert weight's state. Works on an ordinary model too."""
    state = {**full, "state": dict(full["state"])}
    blocks = _expert_blocks(model)
    for index, p in enumerate(_optimizer_params(optimizer)):
        if id(p) not in blocks or index not in state["state"]:
            continue
        name, lo, hi, num_experts = blocks[id(p)]
        param_state = dict(state["state"][index])
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[1:] == p.shape[1:]:
                if value.shape[0] != num_experts:
                    raise ValueError(f"optimizer state {key!r} of {name} has {value.shape[0]} experts, "
                                     f"the layer has {num_experts}")
                param_state[key] = value[lo:hi].clone()
        state["state"][index] = param_state
    optimizer.load_state_dict(state)
