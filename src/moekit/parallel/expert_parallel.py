"""Expert parallelism for MoE layers, data parallelism for everything else (Shazeer et al. 2017 §3.1).

Legend: E experts of a layer, W ranks, L = E/W experts per rank.

Each rank keeps one copy of every dense layer and router (data parallel) and one block of L
experts (expert parallel). Every rank feeds its own batch; the experts see the tokens of all W
batches, so an expert's batch is W times what one replica alone would give it (k*b*d/n in the
paper's words). The layer's outputs, aux loss and stats are those of the local layer on the
concatenation of the W batches in rank order.

Gradients. Each rank's objective is its own loss (its batch's task loss plus the shared aux loss),
and the model is trained on the mean of the W objectives, as in plain data parallelism. After
``backward``, ``sync_gradients`` averages the gradients of the replicated parameters over the ranks;
an expert's gradient already holds every rank's contribution (the reverse all-to-all brought it
home), so it is divided by W. With equal batch sizes per rank the result is the single-process
gradient of the mean loss over the union of the batches.

We use this explicit call rather than DistributedDataParallel: DDP would need the expert
parameters excluded and rescaled by hand anyway, would wrap the model (renaming every
state-dict key, so checkpoints would differ from single-process ones), and would need
``find_unused_parameters`` for routers whose noise weights are unused in some steps. One flat
all-reduce per dtype after ``backward`` is simple and equally fast at these sizes.

That is today's layout, ``parallelize(model)``: experts sharded over every rank, everything else
replicated. ``parallelize(model, ep_size=P, fsdp=...)`` builds the ("dp", "ep") mesh layout
instead (``moekit.parallel.fsdp``): expert parallelism inside groups of P ranks, FSDP2 or
``replicate`` for the data parallelism, gradients reduced during ``backward``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch.all_to_all import AllToAllDispatcher
from moekit.layer import MoE
from moekit.parallel.groups import ProcessGroupShards, check_same_config
from moekit.parallel.mesh import (
    MeshLayout,
    build_mesh,
    device_type_of,
    find_layout,
    is_reduced_in_backward,
    set_layout,
)

EXPERT_WEIGHTS = ("w1", "b1", "w2", "b2", "w3", "b3")
_SAME = object()  # apply_expert_parallel's batch_group default: the expert-parallel group


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialized process group: call "
                           "moekit.parallel.init_distributed(device) (under torchrun) first")


def apply_expert_parallel(moe: MoE, group=None, batch_group=_SAME) -> MoE:
    """Shard ``moe``'s experts over ``group``: rank r keeps experts [r*L, (r+1)*L), L = E/W.

    The expert weights are sliced in place to the local block, the dispatcher becomes an
    all-to-all one, and the router and the layer see the whole (sharded) batch for their
    statistics and capacity: the batches of the ranks of ``batch_group`` (by default ``group``;
    None: the default group, as the ("dp", "ep") mesh layout uses it, the all-to-all then running
    inside ``group`` only). Raises ``ValueError`` when E is not divisible by W.
    """
    _require_initialized()
    if not isinstance(moe, MoE):
        raise TypeError(f"apply_expert_parallel expects a moekit.MoE, got {type(moe).__name__}")
    if isinstance(moe.dispatcher, AllToAllDispatcher):
        raise ValueError("this MoE layer is already expert-parallel")
    if not hasattr(moe.router, "shards"):
        raise TypeError(f"router {type(moe.router).__name__} has no `shards` attribute, so its balancing "
                        "statistics would cover one rank's tokens only (see moekit.shards)")
    dispatcher = AllToAllDispatcher(moe.num_experts, group)  # checks E % W
    lo, hi = dispatcher.first_expert, dispatcher.first_expert + dispatcher.local_experts
    experts = moe.experts
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name, None)
        if weight is not None:
            local = nn.Parameter(weight.detach()[lo:hi].clone(), requires_grad=weight.requires_grad)
            setattr(experts, name, local)
    experts.num_experts = hi - lo
    moe.dispatcher = dispatcher
    moe.shards = ProcessGroupShards(group if batch_group is _SAME else batch_group)
    setattr(moe.router, "shards", moe.shards)  # noqa: B010 - any router module with a `shards` attribute
    return moe


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every expert-parallel MoE layer in ``model``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, MoE) and isinstance(m.dispatcher, AllToAllDispatcher)]


def all_to_all_of(layer: MoE) -> AllToAllDispatcher:
    """The all-to-all dispatcher of an expert-parallel layer (``TypeError`` for a local one)."""
    if not isinstance(layer.dispatcher, AllToAllDispatcher):
        raise TypeError(f"layer {layer!r} is not expert-parallel")
    return layer.dispatcher


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the sharded expert weights."""
    names: set[str] = set()
    for layer_name, layer in expert_parallel_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        names.update(prefix + n for n, _ in layer.experts.named_parameters())
    return names


def _src_rank(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def parallelize(model: nn.Module, ep_size: int | None = None, fsdp: bool = False, *, group=None,
                extra_config: dict | None = None, units=None) -> nn.Module:
    """Expert parallelism for every MoE layer of ``model`` (``HierarchicalMoE`` included), data
    parallelism for the rest (the whole model, when it has no MoE layer). Returns ``model``,
    changed in place; its layout is ``moekit.parallel.layout_of(model)``, its ("dp", "ep") device
    mesh ``moekit.parallel.mesh_of(model)``.

    Today's layout (``ep_size`` and ``units`` None, ``fsdp=False``): the experts are sharded over
    every rank of ``group`` (E % W == 0), everything else is replicated, and ``sync_gradients(model)``
    must be called after each ``backward``. The mesh is (1, W) (none when ``group`` is a sub-group).

    1. Checks that every rank built the same model (and the same ``extra_config``, e.g. a job's
       settings): a ``ValueError`` naming the first difference otherwise.
    2. Broadcasts every parameter and buffer from the group's first rank, so the replicas start
       equal and the experts are those of one model (layers on the meta device are skipped: load
       a checkpoint after).
    3. Shards each MoE layer's experts (``apply_expert_parallel``).

    The mesh layout (``ep_size`` given, or ``fsdp=True``, or ``units``; the whole world, ``group``
    None): W/ep_size replicas of an expert-parallel group of ``ep_size`` ranks, experts sharded
    inside each group (E % ep_size == 0) and replicated across groups; with ``fsdp=True`` the dense
    parameters are sharded over all W ranks and each expert block over its replicas (FSDP2), with
    ``fsdp=False`` they are replicated (``replicate``). Gradients are reduced during ``backward``:
    ``sync_gradients`` does nothing on such a model. ``units``: submodules (e.g. transformer blocks)
    that get their own FSDP unit, for memory and overlap; each MoE layer's expert bank always has
    one. Parameters become DTensors; see ``moekit.parallel.fsdp``.

    Build the optimizer after this call: the parameters are replaced by their local slices.
    A model is parallelized once (``ValueError`` otherwise).
    """
    _require_initialized()
    if find_layout(model) is not None:
        raise ValueError("this model is already parallelized")
    if ep_size is not None or fsdp or units is not None:
        if group is not None and group is not dist.group.WORLD:
            raise ValueError("parallelize(ep_size=..., fsdp=..., units=...) lays out every rank of the default "
                             "group: leave group=None")
        from moekit.parallel.fsdp import parallelize_on_mesh

        return parallelize_on_mesh(model, ep_size, fsdp, extra_config, units)
    check_same_config(model, group, extra_config)
    src = _src_rank(group)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_meta:
                dist.broadcast(tensor, src, group=group)
    # A model without MoE layers is left data-parallel only: a job comparing MoE models with
    # dense baselines runs them all the same way.
    for layer in [m for m in model.modules() if isinstance(m, MoE)]:
        apply_expert_parallel(layer, group)
    world = dist.get_world_size(group)
    mesh = None
    if group is None or group is dist.group.WORLD:
        mesh = build_mesh(world, device_type_of(model))
    set_layout(model, MeshLayout(mesh, 1, world, False, False))
    return model


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    expert_names = expert_parameter_names(model)
    replicated: list[nn.Parameter] = []
    experts: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (experts if name in expert_names else replicated).append(p)
    return replicated, experts


def sync_gradients(model: nn.Module, group=None) -> None:
    """Average the replicated parameters' gradients over ``group``; divide the experts' by W.

    A parameter that has a gradient on some rank gets one on every rank (zeros stand in for the
    missing ones); a parameter without a gradient anywhere keeps ``grad = None``, as an optimizer
    that skips unused parameters expects.

    Does nothing on a model of the mesh layout (``parallelize(model, ep_size=..., fsdp=...)``),
    whose gradients ``backward`` has reduced already: a loop may call it whatever the layout.
    """
    _require_initialized()
    if is_reduced_in_backward(model):
        return  # FSDP2 / replicate reduced every gradient during backward
    world = dist.get_world_size(group)
    replicated, experts = _split_parameters(model)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in replicated:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, params in by_dtype.items():
        # One flat buffer per dtype: the gradients, then one has-a-gradient flag per parameter.
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
                         + [torch.tensor([p.grad is not None for p in params], dtype=dtype, device=params[0].device)])
        dist.all_reduce(flat, group=group)
        flat /= world
        grads, flags = flat[: -len(params)], flat[-len(params):]
        for p, g, flag in zip(params, grads.split([p.numel() for p in params]), flags.tolist(), strict=True):
            p.grad = g.view_as(p).clone() if flag > 0 else None
    for p in experts:
        if p.grad is not None:
            p.grad /= world


def grad_norm(model: nn.Module, group=None) -> torch.Tensor:
    """The L2 norm of all gradients of the whole (sharded) model, on every rank; call after
    ``sync_gradients``. On the mesh layout: over every shard of the mesh (``group`` unused)."""
    _require_initialized()
    if is_reduced_in_backward(model):
        from moekit.parallel.fsdp import mesh_grad_norm

        return mesh_grad_norm(model)
    replicated, experts = _split_parameters(model)
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in experts:
        if p.grad is not None:
            total += p.grad.double().pow(2).sum()
    dist.all_reduce(total, group=group)
    for p in replicated:  # the same on every rank: counted once
        if p.grad is not None:
            total += p.grad.double().pow(2).sum()
    return total.sqrt().float()


def clip_grad_norm_(model: nn.Module, max_norm: float, group=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a parallelized model (any layout); returns the norm before clipping."""
    if not max_norm > 0 or math.isinf(max_norm):
        raise ValueError(f"max_norm={max_norm} must be a positive finite number")
    norm = grad_norm(model, group)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if is_reduced_in_backward(model):
        from moekit.parallel.fsdp import scale_grads_

        scale_grads_(model, scale)  # each rank scales its own shards
        return norm
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm
