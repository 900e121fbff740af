"""Expert parallelism inside the "ep" groups of a ("dp", "ep") mesh, composed with FSDP2 or ``replicate``.

Legend: W ranks, P = ep_size, R = W/P replicas of each expert block, E experts of a layer,
L = E/P experts per rank.

What ``parallelize(model, ep_size=P, fsdp=...)`` builds (see ``moekit.parallel.mesh`` for the mesh):

- Every MoE layer keeps the experts [e*L, (e+1)*L) on rank (d, e) and exchanges tokens all-to-all
  inside its "ep" group (P = 1: no all-to-all, every rank holds every expert). Its router and
  capacity statistics still cover the whole global batch, all W ranks (``ProcessGroupShards`` over
  the world): balancing losses, counts and router noise are those of one process on the union of
  the W batches, whatever the layout.
- Gradient reduction is torch's, during ``backward``: with ``fsdp=True``, ``fully_shard`` (FSDP2)
  shards every dense parameter over the W ranks and each expert block over its R replicas, and
  reduce-scatters their gradients as each unit's backward ends; with ``fsdp=False``, ``replicate``
  (FSDP2's data-parallel mode) keeps them whole and all-reduces. ``sync_gradients`` is not needed
  (it does nothing on such a model).
- Units, each gathered (FSDP) and reduced with one collective at a time: every MoE layer's expert
  bank, the modules passed as ``units`` (e.g. the blocks of a transformer), and the root with
  everything left. A unit's gradients are reduced as soon as its backward is done, while the
  backward of the units before it runs: the overlap DDP gets from its buckets (on GPUs, where the
  reductions run on their own stream; gloo's block the backward).

Gradient scale. Each rank's objective is the mean loss over its own rows; the model is trained on
the mean over the W ranks. A dense gradient is therefore the mean over W (FSDP's default). An
expert block on rank (d, e) receives, through the reverse all-to-all, the gradients of all P ranks
of its group; summing over the R replicas gives all W ranks' contributions, so the expert units
divide the sum by W, not by R: FSDP's mean over the R replicas, divided by P. With equal rows per
rank every gradient then equals the single-process gradient of the mean loss over the union of
the batches.
"""

from __future__ import annotations

import functools
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from moekit.layer import MoE
from moekit.parallel.groups import ProcessGroupShards, check_same_config
from moekit.parallel.mesh import MeshLayout, build_mesh, check_ep_size, device_type_of, layout_of, set_layout


def _wrappers():
    """(fully_shard, replicate): imported on first use (about a second per process)."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise RuntimeError(f"parallelize(ep_size=..., fsdp=...) needs FSDP2's fully_shard and replicate "
                           f"(torch.distributed._composable.replicate_with_fsdp, as in torch 2.13; this is torch "
                           f"{torch.__version__}): {e}") from e
    return fully_shard, replicate


def _check_model(layers: list[MoE], ep: int) -> None:
    for layer in layers:
        if layer.num_experts % ep:
            raise ValueError(f"num_experts={layer.num_experts} is not divisible by ep_size={ep}")
        if not hasattr(layer.router, "shards"):
            raise TypeError(f"router {type(layer.router).__name__} has no `shards` attribute, so its balancing "
                            "statistics would cover one rank's tokens only (see moekit.shards)")


def _ordered_units(model: nn.Module, layers: list[MoE], units) -> list[nn.Module]:
    """The expert banks and ``units``, deepest first (FSDP wraps bottom-up); ``ValueError`` for a stranger."""
    names = {id(m): name for name, m in model.named_modules()}
    extra = list(units or ())
    banks = {id(layer.experts) for layer in layers}
    for unit in extra:
        if not isinstance(unit, nn.Module) or id(unit) not in names:
            raise ValueError(f"units holds {type(unit).__name__}, which is not a submodule of the model")
        if unit is model or id(unit) in banks:
            what = "the model itself" if unit is model else f"the expert bank {names[id(unit)]!r}"
            raise ValueError(f"units holds {what}, which is a unit already")
    chosen = [layer.experts for layer in layers] + extra
    if len({id(m) for m in chosen}) != len(chosen):
        raise ValueError("units holds the same module twice")
    return sorted(chosen, key=lambda m: -names[id(m)].count("."))


def parallelize_on_mesh(model: nn.Module, ep_size: int | None, fsdp: bool, extra_config: dict | None,
                        units) -> nn.Module:
    """The mesh layout of ``moekit.parallel.parallelize`` (see the module docstring); ``model`` in place."""
    from moekit.parallel.expert_parallel import apply_expert_parallel

    world = dist.get_world_size()
    ep = check_ep_size(ep_size, world)
    if not isinstance(fsdp, bool):
        raise TypeError(f"fsdp={fsdp!r} must be a bool")
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    _check_model(layers, ep)
    ordered = _ordered_units(model, layers, units)  # checked before anything changes
    fully_shard, replicate = _wrappers()
    check_same_config(model, None, {**(extra_config or {}), "moekit.ep_size": ep, "moekit.fsdp": fsdp})
    with torch.no_grad():  # the replicas start equal, and the experts are those of one model
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta:
                dist.broadcast(tensor, 0)
    device_type = device_type_of(model)
    mesh = build_mesh(ep, device_type)
    for layer in layers:
        if ep > 1:
            apply_expert_parallel(layer, mesh["ep"].get_group(), batch_group=None)
        else:  # every rank holds every expert: local dispatch, statistics still over the world
            layer.shards = ProcessGroupShards(None)
            setattr(layer.router, "shards", layer.shards)  # noqa: B010 - any router module with `shards`
    world_mesh = DeviceMesh.from_group(cast(dist.ProcessGroup, dist.group.WORLD), device_type)
    wrap = fully_shard if fsdp else replicate
    banks = {id(layer.experts) for layer in layers}
    for unit in ordered:
        if id(unit) in banks:
            _wrap_expert_bank(wrap, unit, mesh["dp"], ep)
        else:
            wrap(unit, mesh=world_mesh)
    wrap(model, mesh=world_mesh)
    set_layout(model, MeshLayout(mesh, world // ep, ep, fsdp, True))
    return model


def _wrap_expert_bank(wrap, experts: nn.Module, dp_mesh: DeviceMesh, ep: int) -> None:
    from torch.distributed.fsdp import register_fsdp_forward_method

    unit = wrap(experts, mesh=dp_mesh)
    # The local dispatcher enters the bank through forward_tokens, not forward: FSDP must gather
    # the bank's parameters around that call too.
    register_fsdp_forward_method(unit, "forward_tokens")
    if ep > 1:
        # FSDP averages over the R replicas; the sum over them / W is that mean / P (module
        # docstring). Not set_gradient_divide_factor(W): gloo lacks the PREMUL_SUM it asks for,
        # and with the sum-then-divide fallback torch 2.13 divides twice on a group of one rank.
        unit.set_all_reduce_hook(functools.partial(_divide_, divisor=float(ep)))


def _divide_(reduced: torch.Tensor, divisor: float) -> None:
    reduced.div_(divisor)


def _counted_here(t: torch.Tensor) -> bool:
    """Whether this rank's piece of ``t`` enters a sum over all ranks: one copy of every element.

    A DTensor's pieces differ along its Shard dimensions and repeat along its Replicate ones, so
    the replica at coordinate 0 of every Replicate dimension counts. An expert block's mesh is its
    "dp" group; the blocks of the other "ep" ranks are other experts, so they count too. A plain
    tensor is taken to be the same on every rank: rank 0 counts it.
    """
    if not isinstance(t, DTensor):
        return dist.get_rank() == 0
    mesh = t.device_mesh
    return all(mesh.get_local_rank(i) == 0 for i, p in enumerate(t.placements) if isinstance(p, Replicate))


def mesh_grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (every shard, every expert), on every rank: one all-reduce."""
    layout_of(model)
    first = next(model.parameters(), None)
    device = torch.device("cpu") if first is None else first.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in [p.grad for p in model.parameters() if p.grad is not None]:
        if _counted_here(g):
            local = g.to_local() if isinstance(g, DTensor) else g
            total += local.double().pow(2).sum()
    dist.all_reduce(total)
    return total.sqrt().float()


def scale_grads_(model: nn.Module, scale: torch.Tensor) -> None:
    """Multiply every gradient (this rank's piece of it) by the scalar tensor ``scale``."""
    for p in model.parameters():
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            local.mul_(scale.to(local.dtype))
