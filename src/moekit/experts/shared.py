"""Shared experts: always-on FFNs added to the routed output (DeepSeek-V3, Qwen2-MoE, Llama 4).

Legend: T tokens, D model dim, F hidden dim of the shared FFN (n shared experts times their width).

n shared experts of width F_s are one dense FFN of width ``n*F_s``, as DeepSeek-V3 builds them:
the sum of n FFNs on the same input is one FFN whose hidden units are theirs side by side. It uses
the routed experts' activation and biases. With ``gate=True`` its output is scaled per token by
``sigmoid(x . w_gate)`` (Qwen2-MoE's ``shared_expert_gate``).

Replicated like any dense layer: under expert parallelism these are not expert parameters (they
live outside ``moe.experts``), so every rank holds them whole and averages their gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.experts.bank import GATED, activate, affine, check_activation


class SharedExperts(nn.Module):
    """One dense FFN D -> F -> D applied to every token, optionally gated.

    Args:
        dim: D.
        hidden_dim: F (n shared experts of width F_s: F = n*F_s).
        activation, bias, activation_kwargs: as the routed ``Experts`` (the same maths).
        gate: scale the output by ``sigmoid(x @ w_gate)``, ``w_gate`` [D].

    Parameters: ``w1`` [D, F], ``b1`` [F], ``w2`` [F, D], ``b2`` [D], ``w3`` [D, F] (gated activations),
    ``b3`` [F] (clamped SwiGLU with bias), ``w_gate`` [D]; the ones that do not apply are None.
    """

    w1: nn.Parameter
    w2: nn.Parameter
    b1: nn.Parameter | None
    b2: nn.Parameter | None
    w3: nn.Parameter | None
    b3: nn.Parameter | None
    w_gate: nn.Parameter | None

    def __init__(self, dim: int, hidden_dim: int, activation: str = "relu", bias: bool = True, gate: bool = False,
                 activation_kwargs: dict | None = None, device=None, dtype=None):
        super().__init__()
        self.settings = check_activation(activation, activation_kwargs)
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shared {name}={value!r} must be a positive int")
        self.dim, self.hidden_dim, self.activation, self.bias = dim, hidden_dim, activation, bias
        kw = {"device": device, "dtype": dtype}
        gated = activation in GATED
        shapes = {"w1": (dim, hidden_dim), "b1": (hidden_dim,) if bias else None, "w2": (hidden_dim, dim),
                  "b2": (dim,) if bias else None, "w3": (dim, hidden_dim) if gated else None,
                  "b3": (hidden_dim,) if bias and activation == "clamped_swiglu" else None,
                  "w_gate": (dim,) if gate else None}
        for name, shape in shapes.items():
            self.register_parameter(name, None if shape is None else nn.Parameter(torch.empty(shape, **kw)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Like ``nn.Linear`` layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        if self.w1.is_meta:
            return
        fan_in = {"w1": self.dim, "b1": self.dim, "w2": self.hidden_dim, "b2": self.hidden_dim, "w3": self.dim,
                  "b3": self.dim, "w_gate": self.dim}
        with torch.no_grad():
            for name, p in self.named_parameters():
                bound = 1.0 / math.sqrt(fan_in[name])
                p.uniform_(-bound, bound)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [T, D]."""
        def cast(w: torch.Tensor | None) -> torch.Tensor | None:
            return None if w is None else w.to(x_TD.dtype)

        w1, w2 = self.w1.to(x_TD.dtype), self.w2.to(x_TD.dtype)
        up = None if self.w3 is None else affine(x_TD, self.w3.to(x_TD.dtype), cast(self.b3))
        y = affine(activate(affine(x_TD, w1, cast(self.b1)), up, self.activation, self.settings), w2, cast(self.b2))
        if self.w_gate is not None:
            y = y * torch.sigmoid(x_TD @ self.w_gate.to(x_TD.dtype))[:, None]
        return y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation}, bias={self.bias}, "
                f"gate={self.w_gate is not None}")
