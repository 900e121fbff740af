"""transformers' Mixtral block as a benchmark subject: the same weights under each of transformers'
CPU experts implementations, and as the ``moekit.MoE`` that ``moekit.hf.from_hf`` makes of it.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k.

Needs the optional extra (``pip install 'moekit[hf]'``); ``available()`` says whether it is there.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch
from torch import nn

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
# batched_mm gathers every slot's [3, F, D] expert weights: past this many bytes it is left out.
GATHER_BUDGET_BYTES = 2 * 2**30


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def mixtral_config(dim: int, hidden: int, experts: int, k: int, layers: int = 1, heads: int = 8, vocab: int = 1024,
                   positions: int = 4096):
    import transformers

    return transformers.MixtralConfig(
        hidden_size=dim, intermediate_size=hidden, num_local_experts=experts, num_experts_per_tok=k,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
        max_position_embeddings=positions, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def gather_bytes(tokens: int, dim: int, hidden: int, k: int, element_size: int = 4) -> int:
    """What batched_mm gathers: every slot's gate/up [2F, D] and down [D, F] weights."""
    return tokens * k * 3 * hidden * dim * element_size


def mixtral_candidates(dim: int, hidden: int, experts: int, k: int, tokens: int, dtype: torch.dtype,
                       seed: int = 0) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(the ``moekit.MoE`` of a random Mixtral block, {"hf_<implementation>": the block under it})."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    import moekit.hf

    torch.manual_seed(seed)
    base = MixtralSparseMoeBlock(mixtral_config(dim, hidden, experts, k)).to(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    blocks: dict[str, nn.Module] = {}
    for name in IMPLEMENTATIONS:
        if name == "batched_mm" and gather_bytes(tokens, dim, hidden, k, base.experts.down_proj.element_size()) \
                > GATHER_BUDGET_BYTES:
            continue
        block = copy.deepcopy(base)
        bank: Any = block.experts
        bank.config._experts_implementation_internal = name  # what from_pretrained(experts_implementation=) sets
        blocks[f"hf_{name}"] = block
    return moekit.hf.from_hf(base).moe, blocks
