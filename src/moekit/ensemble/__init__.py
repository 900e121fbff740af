"""Efficient Ensembles of Experts (E^3): the tiling step, pure loss functions and the init from a V-MoE.

No new layer: an E^3 model is a V-MoE whose MoE layers use the partitioned router
(``moekit.routing.ensemble.PartitionedRouter``, re-exported here) and whose activations are tiled into
M members right before the first MoE block.
"""

from moekit.ensemble.init import e3_state_from_vmoe, init_e3_from_vmoe, split_router_weight
from moekit.ensemble.losses import (
    ensemble_cross_entropy,
    ensemble_log_probs,
    ensemble_nll,
    ensemble_probs,
    member_logits,
)
from moekit.ensemble.tiling import members_innermost, members_outermost, partitioned_moe, tile_examples
from moekit.routing.ensemble import PartitionedRouter, check_ensemble_size

__all__ = [
    "PartitionedRouter",
    "check_ensemble_size",
    "e3_state_from_vmoe",
    "ensemble_cross_entropy",
    "ensemble_log_probs",
    "ensemble_nll",
    "ensemble_probs",
    "init_e3_from_vmoe",
    "member_logits",
    "members_innermost",
    "members_outermost",
    "partitioned_moe",
    "split_router_weight",
    "tile_examples",
]
