"""Hugging Face transformers interoperability (the optional extra ``moekit[hf]``).

- ``from_hf(block)``: a moekit module computing exactly what a transformers sparse-MoE block
  computes, with the block's call and return type; ``to_hf(module, block)`` writes its weights back.
- ``replace_moe_blocks(model)`` / ``restore_moe_blocks(model)`` / ``restored(model)``: every sparse
  MoE block of a model swapped for moekit's and back (for ``save_pretrained``); with
  ``routing_stats=False`` (also ``from_hf``'s) built to serve, without statistics in eval mode.
- ``experts_implementation="moekit"``: moekit's expert compute inside an unmodified model
  (registered on import; ``register_experts_backend``).
- ``upcycle_model(model, num_experts, k)``: sparse upcycling of a dense Llama / Qwen3 causal LM.

Importing this package checks that transformers is installed in a supported version
(``moekit.hf._compat``); ``import moekit`` alone never imports transformers.
"""

from moekit.hf._compat import TESTED_VERSION, UnsupportedTransformersError, require_transformers, supported_range

require_transformers()

from moekit.hf.block import MoEBlock  # noqa: E402
from moekit.hf.convert import from_hf, replace_moe_blocks, restore_moe_blocks, restored, to_hf  # noqa: E402
from moekit.hf.experts_backend import register_experts_backend  # noqa: E402
from moekit.hf.families import supported_blocks  # noqa: E402
from moekit.hf.upcycle import UpcycledMLP, moe_aux_loss, upcycle_model  # noqa: E402

register_experts_backend()

__all__ = [
    "TESTED_VERSION",
    "MoEBlock",
    "UnsupportedTransformersError",
    "UpcycledMLP",
    "from_hf",
    "moe_aux_loss",
    "register_experts_backend",
    "replace_moe_blocks",
    "restore_moe_blocks",
    "restored",
    "supported_blocks",
    "supported_range",
    "to_hf",
    "upcycle_model",
]
