"""The expert bank: E FFNs in stacked weight tensors, and the one place their compute is decided.

``Experts`` (``experts.bank``) is what a layer holds and what dispatchers call, with the rows of
each expert contiguous; ``experts.grouped`` holds the padded batched-matmul kernels it may use.
"""

from moekit.experts.bank import ACTIVATIONS, BACKENDS, Experts, choose_compute, grouped_mm_supported

__all__ = ["ACTIVATIONS", "BACKENDS", "Experts", "choose_compute", "grouped_mm_supported"]
