"""Routers: who goes where, and the balancing losses. One router per module, registered by name;
``Router`` (``routing.base``) holds what they share."""

from moekit.routing.base import LocalRouting, Router, build_router, register_router, routers
from moekit.routing.batchwise import BatchwiseRouter
from moekit.routing.ensemble import PartitionedRouter, check_ensemble_size
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.hierarchical import HierarchicalRouter
from moekit.routing.noisy_topk import NoisyTopKRouter
from moekit.routing.switch import SwitchRouter
from moekit.routing.topk import TopKRouter
from moekit.routing.vmoe import VMoERouter

__all__ = [
    "BatchwiseRouter",
    "ExpertChoiceRouter",
    "HierarchicalRouter",
    "LocalRouting",
    "NoisyTopKRouter",
    "PartitionedRouter",
    "Router",
    "SwitchRouter",
    "TopKRouter",
    "VMoERouter",
    "build_router",
    "check_ensemble_size",
    "register_router",
    "routers",
]
