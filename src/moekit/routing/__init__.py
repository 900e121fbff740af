"""Routers: who goes where, and the balancing losses. One router per module, registered by name."""

from moekit.routing.base import build_router, register_router, routers
from moekit.routing.batchwise import BatchwiseRouter
from moekit.routing.noisy_topk import NoisyTopKRouter
from moekit.routing.switch import SwitchRouter
from moekit.routing.topk import TopKRouter
from moekit.routing.vmoe import VMoERouter

__all__ = [
    "BatchwiseRouter",
    "NoisyTopKRouter",
    "SwitchRouter",
    "TopKRouter",
    "VMoERouter",
    "build_router",
    "register_router",
    "routers",
]
