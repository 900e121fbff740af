"""moekit: sparse mixture-of-experts layers, models and tools for PyTorch.

``moekit.hf`` (transformers interop, the optional extra ``moekit[hf]``) is imported on first use,
so that ``import moekit`` never imports transformers.
"""

import importlib
from typing import Any

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
from moekit.safetensors_io import export_checkpoint, load_safetensors, save_safetensors
from moekit.soft_moe import SoftMoE
from moekit.types import MoEOutput, Routing, RoutingStats
from moekit.upcycle import upcycle

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
    "export_checkpoint",
    "hf",
    "load_safetensors",
    "reference",
    "register_router",
    "routers",
    "save_safetensors",
    "update_expert_bias",
    "upcycle",
]


def __getattr__(name: str) -> Any:
    # ``moekit.hf`` on first use: it imports (and checks) transformers.
    if name == "hf":
        return importlib.import_module("moekit.hf")
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
