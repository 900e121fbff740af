"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE whose every expert starts as a copy of a dense FFN.

Legend: D model dim, F hidden dim, E experts, K experts per token.

The router is new (initialised as any router of its kind), the experts are E copies of the dense
FFN. With combine weights that sum to 1 (the "topk" router's default softmax over the kept
logits, or any normalised router) the MoE then computes the dense FFN exactly:
``sum_j w_j FFN(x) = FFN(x)``, biases included, and its gradients are the dense ones shared among
the experts (summed over the experts they are the dense FFN's). The router's gradient is then 0:
the experts are identical, so which ones a token picks changes nothing until their different
gradients make them differ.

Accepted dense FFNs (``dense_weights``): moekit's own (``moekit.experts.SharedExperts`` without a
gate, or an ``Experts`` bank of one expert), ``nn.Sequential(nn.Linear, activation, nn.Linear)``
(ReLU, GELU or SiLU; dropout and identity layers are skipped), and a transformers-style gated MLP
with ``gate_proj``, ``up_proj`` and ``down_proj`` ``nn.Linear`` layers and a SiLU ``act_fn`` (Llama,
Qwen, Mistral: SwiGLU). This module does not import transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import Experts, SharedExperts
from moekit.layer import MoE

_PROBE = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "relu": F.relu,
                                                                  "gelu": F.gelu}
# Set by the dense FFN, not by the caller.
_FROM_FFN = ("dim", "hidden_dim", "activation", "activation_kwargs", "bias", "device", "dtype")


def activation_name(act: Any, where: str) -> str:
    """"silu", "relu" or "gelu" (exact erf GELU): which of moekit's activations ``act`` computes.

    Decided by evaluating it, so any module or function computing the same values qualifies
    (nn.SiLU, transformers' SiLUActivation, ...); ``ValueError`` naming ``where`` otherwise.
    """
    try:
        values = act(_PROBE)
    except Exception as e:  # noqa: BLE001 - any failure means "not one of ours"
        raise ValueError(f"{where}: cannot evaluate its activation {act!r}: {e}") from e
    for name, fn in _FUNCTIONS.items():
        if isinstance(values, torch.Tensor) and torch.allclose(values, fn(_PROBE), rtol=1e-9, atol=1e-12):
            return name
    raise ValueError(f"{where}: its activation {act!r} is none of moekit's {sorted(_FUNCTIONS)}")


class DenseFFN(NamedTuple):
    """A dense FFN's weights in moekit's layout (in x out) and its activation.

    ``activation(x @ w1 + b1 [, x @ w3 + b3]) @ w2 + b2``; absent tensors are None.
    """

    w1: torch.Tensor  # [D, F]
    b1: torch.Tensor | None  # [F]
    w2: torch.Tensor  # [F, D]
    b2: torch.Tensor | None  # [D]
    w3: torch.Tensor | None  # [D, F], gated activations
    b3: torch.Tensor | None  # [F], clamped SwiGLU with biases
    activation: str
    settings: dict[str, float]


def _linear(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = layer.weight.detach().t()
    return w, None if layer.bias is None else layer.bias.detach()


def _from_sequential(mlp: nn.Sequential) -> DenseFFN:
    layers = [m for m in mlp if not isinstance(m, nn.Dropout | nn.Identity)]
    if len(layers) != 3 or not isinstance(layers[0], nn.Linear) or not isinstance(layers[2], nn.Linear):
        kinds = [type(m).__name__ for m in mlp]
        raise TypeError(f"an nn.Sequential FFN must be Linear, activation, Linear; got {kinds}")
    (w1, b1), (w2, b2) = _linear(layers[0]), _linear(layers[2])
    return DenseFFN(w1, b1, w2, b2, None, None, activation_name(layers[1], "the FFN"), {})


def _from_gated(mlp: Any) -> DenseFFN:
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if activation_name(act, f"{type(mlp).__name__}") != "silu":
        raise ValueError(f"{type(mlp).__name__}: a gated MLP needs a SiLU gate (SwiGLU) to become moekit experts")
    (w1, b1), (w3, b3), (w2, b2) = _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj)
    if b3 is not None:
        raise ValueError(f"{type(mlp).__name__}.up_proj has a bias; moekit's SwiGLU experts have none on the up "
                         "projection")
    return DenseFFN(w1, b1, w2, b2, w3, None, "swiglu", {})


def _dense_ffn(ws: list[torch.Tensor | None], activation: str, settings: dict[str, float]) -> DenseFFN:
    w1, b1, w2, b2, w3, b3 = (None if w is None else w.detach() for w in ws)
    assert w1 is not None and w2 is not None  # every FFN of moekit has both projections
    return DenseFFN(w1, b1, w2, b2, w3, b3, activation, dict(settings))


def dense_weights(mlp: nn.Module) -> DenseFFN:
    """The weights of a dense FFN of a kind ``upcycle`` accepts (see the module docstring)."""
    if isinstance(mlp, SharedExperts):
        if mlp.w_gate is not None:
            raise ValueError("a gated SharedExperts (sigmoid(x . w) * FFN(x)) is not a plain FFN")
        return _dense_ffn([mlp.w1, mlp.b1, mlp.w2, mlp.b2, mlp.w3, mlp.b3], mlp.activation, mlp.settings)
    if isinstance(mlp, Experts):
        if mlp.num_experts != 1:
            raise ValueError(f"an Experts bank of {mlp.num_experts} experts is not one dense FFN")
        return _dense_ffn([None if w is None else w[0] for w in (mlp.w1, mlp.b1, mlp.w2, mlp.b2, mlp.w3, mlp.b3)],
                          mlp.activation, mlp.settings)
    if isinstance(mlp, nn.Sequential):
        return _from_sequential(mlp)
    if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")):
        return _from_gated(mlp)
    raise TypeError(f"cannot upcycle a {type(mlp).__name__}: expected moekit's SharedExperts or a one-expert Experts, "
                    "an nn.Sequential(Linear, activation, Linear), or a gated MLP with gate_proj/up_proj/down_proj")


def upcycle(mlp: nn.Module, num_experts: int, k: int, router: str | nn.Module = "topk", noise: float = 0.0,
            generator: torch.Generator | None = None, **moe_kwargs: Any) -> MoE:
    """A ``moekit.MoE`` of ``num_experts`` copies of the dense FFN ``mlp``, ``k`` per token, a new router.

    Args:
        mlp: the dense FFN (see ``dense_weights``); it is not modified.
        num_experts, k: E and the experts per token.
        router: the router, by name or as a module (initialised afresh, as in the paper). With
            ``noise=0`` and combine weights summing to 1 ("topk" by default) the MoE computes
            exactly ``mlp`` at initialisation.
        noise: each expert's weight matrices (not its biases) get independent Gaussian noise of
            standard deviation ``noise`` times the matrix's own standard deviation (0: exact copies).
        generator: the random generator of that noise.
        moe_kwargs: any other ``moekit.MoE`` argument (``w_importance``, ``router_kwargs``,
            ``capacity_factor``, ...); the sizes, activation, biases, device and dtype come from ``mlp``.
    """
    given = sorted(set(moe_kwargs) & set(_FROM_FFN))
    if given:
        raise TypeError(f"upcycle takes {given} from the dense FFN; do not pass them")
    if isinstance(noise, bool) or not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise={noise!r} must be a finite number >= 0")
    dense = dense_weights(mlp)
    dim, hidden = dense.w1.shape
    bias = dense.b1 is not None or dense.b2 is not None
    moe = MoE(dim, num_experts, k, hidden, router=router, activation=dense.activation,
              activation_kwargs=dense.settings or None, bias=bias, device=dense.w1.device, dtype=dense.w1.dtype,
              **moe_kwargs)
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2", "w3", "b3"):
            target = getattr(moe.experts, name)
            if target is None:
                continue
            value = getattr(dense, name)
            if value is None:  # a bias the FFN lacks where the bank has one (one of b1/b2): zero
                target.zero_()
                continue
            target.copy_(value.expand_as(target))
            if noise > 0 and name in ("w1", "w2", "w3"):
                std = float(value.float().std()) if value.numel() > 1 else float(value.abs().max())
                target.add_(torch.randn(target.shape, generator=generator, dtype=target.dtype).to(target.device)
                            * (noise * std))
    return moe
