"""Scale out over torch.distributed: expert parallelism mixed with data parallelism (hand-written, or
FSDP2 / ``replicate`` on a ("dp", "ep") device mesh), and checkpoints that move between layouts.
Layers stay single-device code; this package swaps their dispatcher, slices their experts and
points their statistics at the whole sharded batch. ``ParallelTraining`` (``moekit.parallel.training``)
is what a training loop calls.
"""

from moekit.parallel.expert_parallel import (
    apply_expert_parallel,
    clip_grad_norm_,
    expert_parallel_layers,
    expert_parameter_names,
    grad_norm,
    parallelize,
    sync_gradients,
)
from moekit.parallel.groups import (
    DistInfo,
    ProcessGroupShards,
    check_same_config,
    counting_collectives,
    init_distributed,
)
from moekit.parallel.launch import spawn_local
from moekit.parallel.mesh import MeshLayout, build_mesh, layout_of, mesh_of
from moekit.parallel.training import ParallelTraining

__all__ = [
    "DistInfo",
    "MeshLayout",
    "ParallelTraining",
    "ProcessGroupShards",
    "apply_expert_parallel",
    "build_mesh",
    "check_same_config",
    "checkpoint_state",
    "clip_grad_norm_",
    "counting_collectives",
    "expert_parallel_layers",
    "expert_parameter_names",
    "full_optimizer_state_dict",
    "full_state_dict",
    "grad_norm",
    "init_distributed",
    "layout_of",
    "load_distributed",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "mesh_of",
    "parallelize",
    "save_distributed",
    "spawn_local",
    "sync_gradients",
]

# The checkpoint helpers import torch.distributed.checkpoint, about a second per process; every
# rank of every launch would pay it, so they load on first use.
_CHECKPOINT_NAMES = ("checkpoint_state", "full_optimizer_state_dict", "full_state_dict", "load_distributed",
                     "load_full_optimizer_state_dict", "load_full_state_dict", "save_distributed")


def __getattr__(name: str):
    if name in _CHECKPOINT_NAMES:
        from moekit.parallel import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'moekit.parallel' has no attribute {name!r}")
