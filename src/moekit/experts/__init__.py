"""The expert bank: E FFNs in stacked weight tensors, and the one place their compute is decided.

``Experts`` (``experts.bank``) is what a layer holds and what dispatchers call, with the rows of
each expert contiguous; ``experts.grouped`` holds the padded batched-matmul kernels it may use.
"""

from moekit.experts.bank import (
    ACTIVATIONS,
    BACKENDS,
    CLAMPED_SWIGLU_DEFAULTS,
    GATED,
    Experts,
    check_activation,
    choose_compute,
    clamped_swiglu,
    grouped_mm_supported,
)
from moekit.experts.shared import SharedExperts

__all__ = ["ACTIVATIONS", "BACKENDS", "CLAMPED_SWIGLU_DEFAULTS", "GATED", "Experts", "SharedExperts",
           "check_activation", "choose_compute", "clamped_swiglu", "grouped_mm_supported"]
