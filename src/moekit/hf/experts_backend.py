"""``experts_implementation="moekit"``: moekit's expert compute inside an unmodified transformers model.

Legend: T tokens, N routed token-slots (grouped by expert), D model dim, F expert hidden dim,
E experts, K experts per token.

transformers 5 routes the experts of most MoE models (those whose experts class carries its
``@use_experts_implementation`` decorator: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS)
through a registry of functions ``forward(experts, hidden_states [T, D], top_k_index [T, K],
top_k_weights [T, K]) -> [T, D]``, chosen by the model's ``experts_implementation`` (``eager``,
``batched_mm``, ``grouped_mm``, ...). ``register_experts_backend()`` adds moekit's under the name
"moekit": the model's own router decides, and moekit sorts the slots by expert (stable, so results
do not depend on ties), computes each expert's contiguous segment with its expert bank (loop,
padded batched matmuls or grouped GEMM, ``moekit.experts.choose_compute``) and combines them.

The expert weights are the model's own parameters, seen through views in moekit's layout (no
copy, so gradients flow into them): the bank is called with ``torch.func.functional_call``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from moekit.dispatch.sort import combine, sort_by_expert
from moekit.experts import Experts
from moekit.hf._compat import require_attribute
from moekit.upcycle import activation_name

NAME = "moekit"
_GPT_OSS_EXPERTS = "transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts"
# One bank per experts module, on the meta device: it holds the compute settings, never weights.
_BANKS: weakref.WeakKeyDictionary[nn.Module, Experts] = weakref.WeakKeyDictionary()


def _split(t: torch.Tensor, concatenated: bool, dim: int) -> tuple[torch.Tensor, ...]:
    """(gate, up) halves of a fused gate/up tensor along ``dim``: first/second half, or even/odd entries."""
    if concatenated:
        return t.chunk(2, dim=dim)
    index = [slice(None)] * t.dim()
    gate_index, up_index = list(index), list(index)
    gate_index[dim], up_index[dim] = slice(0, None, 2), slice(1, None, 2)
    return t[tuple(gate_index)], t[tuple(up_index)]


def _in_out(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, I, O] (moekit's orientation) from transformers' [E, O, I], or as is when already transposed."""
    return w if transposed else w.transpose(1, 2)


def _activation(experts: Any) -> tuple[str, dict[str, float]]:
    """moekit's activation (and settings) for this experts module; ``NotImplementedError`` if none fits."""
    where = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError(f"{where}: a norm after each expert is not one of moekit's expert computations")
    if not getattr(experts, "has_gate", True):
        return activation_name(experts.act_fn, where), {}
    cls = type(experts)
    if f"{cls.__module__}.{cls.__qualname__}" == _GPT_OSS_EXPERTS:
        return "clamped_swiglu", {"alpha": float(experts.alpha), "limit": float(experts.limit)}
    default_gate = require_attribute("transformers.integrations.moe", "_default_apply_gate")
    if getattr(cls, "_apply_gate", default_gate) is not default_gate:
        raise NotImplementedError(f"{where} has its own gating function; moekit computes SwiGLU and GPT-OSS's "
                                  "clamped SwiGLU")
    if activation_name(experts.act_fn, where) != "silu":
        raise NotImplementedError(f"{where}: gated experts with a non-SiLU gate are not moekit's SwiGLU")
    return "swiglu", {}


def expert_views(experts: Any) -> dict[str, torch.Tensor]:
    """The module's expert weights as moekit's w1, w3 [E, D, F], w2 [E, F, D] (and biases), as views."""
    transposed = getattr(experts, "is_transposed", False)
    concatenated = getattr(experts, "is_concatenated", True)
    has_bias = getattr(experts, "has_bias", False)
    views: dict[str, torch.Tensor] = {}
    if getattr(experts, "has_gate", True):
        gate, up = _split(experts.gate_up_proj, concatenated, dim=2 if transposed else 1)
        views["w1"], views["w3"] = _in_out(gate, transposed), _in_out(up, transposed)
        if has_bias:
            views["b1"], views["b3"] = _split(experts.gate_up_proj_bias, concatenated, dim=1)
    else:
        views["w1"] = _in_out(experts.up_proj, transposed)
        if has_bias:
            views["b1"] = experts.up_proj_bias
    views["w2"] = _in_out(experts.down_proj, transposed)
    if has_bias:
        views["b2"] = experts.down_proj_bias
    return views


def _bank(experts: nn.Module) -> Experts:
    cached = _BANKS.get(experts)
    if cached is not None:
        return cached
    activation, settings = _activation(experts)
    views = expert_views(experts)
    if "b3" in views and activation != "clamped_swiglu":
        raise NotImplementedError(f"{type(experts).__name__}: a bias on the up projection is only in moekit's "
                                  "clamped SwiGLU")
    num_experts, dim, hidden = views["w1"].shape
    bank = Experts(num_experts, dim, hidden, activation, bias="b1" in views, activation_kwargs=settings or None,
                   device="meta")
    _BANKS[experts] = bank
    return bank


def moekit_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts interface: [T, D] tokens, [T, K] expert ids and weights -> [T, D]."""
    bank = _bank(self)
    if getattr(self, "_is_expert_parallel", False):
        # Slots routed to another rank's experts carry ids >= E (and weight 0): moekit's empty slot.
        top_k_index = torch.where(top_k_index >= bank.num_experts, -1, top_k_index)
    perm = sort_by_expert(top_k_index, bank.num_experts)
    # index_select, not x[ids]: its backward is an index_add, cheaper than advanced indexing's.
    x_ND = hidden_states.index_select(0, perm.token_ids_N)
    h_ND = functional_call(bank, expert_views(self), (x_ND, perm.counts))
    return combine(h_ND, perm, top_k_weights, hidden_states.shape[0]).to(hidden_states.dtype)


def register_experts_backend(name: str = NAME) -> None:
    """Register moekit's expert compute with transformers as ``experts_implementation=name``.

    Done when ``moekit.hf`` is imported; models then accept ``experts_implementation="moekit"``
    (``from_pretrained(..., experts_implementation="moekit")`` or ``model.set_experts_implementation``).
    """
    interface = require_attribute("transformers.integrations.moe", "ExpertsInterface")
    interface.register(name, moekit_experts_forward)
