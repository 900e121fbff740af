"""Scale out over torch.distributed: expert parallelism mixed with data parallelism, and checkpoints
that move between world sizes. Layers stay single-device code; this package swaps their
dispatcher, slices their experts and points their statistics at the whole sharded batch.
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

__all__ = [
    "DistInfo",
    "ProcessGroupShards",
    "apply_expert_parallel",
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
    "load_distributed",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
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
