"""moekit: sparse mixture-of-experts layers, models and tools for PyTorch."""

from moekit import ensemble, reference
from moekit.balance import update_expert_bias
from moekit.experts import Experts
from moekit.layer import HierarchicalMoE, MoE
from moekit.routing import (
    BatchwiseRouter,
    ExpertChoiceRouter,
    NoisyTopKRouter,
    SwitchRouter,
    TopKRouter,
    VMoERouter,
    build_router,
    register_router,
    routers,
)
from moekit.routing.hierarchical import HierarchicalRouter
from moekit.soft_moe import SoftMoE
from moekit.types import MoEOutput, Routing, RoutingStats

__version__ = "0.1.0"

__all__ = [
    "BatchwiseRouter",
    "ExpertChoiceRouter",
    "Experts",
    "HierarchicalMoE",
    "HierarchicalRouter",
    "MoE",
    "MoEOutput",
    "NoisyTopKRouter",
    "Routing",
    "RoutingStats",
    "SoftMoE",
    "SwitchRouter",
    "TopKRouter",
    "VMoERouter",
    "__version__",
    "build_router",
    "ensemble",
    "reference",
    "register_router",
    "routers",
    "update_expert_bias",
]
