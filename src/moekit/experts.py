"""A bank of E feed-forward experts in stacked weight tensors, computed per contiguous segment.

Legend: N routed token-slots (grouped by expert), D model dim, F expert hidden dim, E experts.

Expert e computes ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` (SwiGLU: ``silu(x @ w1[e] + b1[e]) *
(x @ w3[e]) @ w2[e] + b2[e]``). Keeping all experts in one tensor per weight lets the layer be
built on the meta device and sharded by slicing the E axis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu}


class Experts(nn.Module):
    """E independent FFNs D -> F -> D.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: F.
        activation: "relu", "gelu", "silu" or "swiglu" (adds ``w3`` [E, D, F]).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "relu",
                 device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation = activation
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **kw))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim, **kw))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **kw)) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised like an ``nn.Linear`` pair: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        if self.w1.is_meta:
            return
        with torch.no_grad():
            for w, fan_in in ((self.w1, self.dim), (self.w2, self.hidden_dim), (self.w3, self.dim)):
                if w is not None:
                    bound = 1.0 / math.sqrt(fan_in)
                    w.uniform_(-bound, bound)
            self.b1.uniform_(-1.0 / math.sqrt(self.dim), 1.0 / math.sqrt(self.dim))
            self.b2.uniform_(-1.0 / math.sqrt(self.hidden_dim), 1.0 / math.sqrt(self.hidden_dim))

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on [N, D] tokens (the readable definition; used by the reference)."""
        h = x_ND @ self.w1[e] + self.b1[e]
        h = F.silu(h) * (x_ND @ self.w3[e]) if self.w3 is not None else ACTIVATIONS[self.activation](h)
        return h @ self.w2[e] + self.b2[e]

    def forward(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply expert e to the e-th contiguous segment of ``x_ND`` (sizes ``counts``). Returns [N, D]."""
        if len(counts) != self.num_experts:
            raise ValueError(f"counts has {len(counts)} entries for {self.num_experts} experts")
        act = ACTIVATIONS[self.activation]
        # unbind, not w1[e]: indexing a stacked parameter inside autograd makes each expert's
        # backward allocate a full [E, D, F] gradient; unbind's backward stacks them once.
        w1, b1, w2, b2 = (p.to(x_ND.dtype).unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        w3 = self.w3.to(x_ND.dtype).unbind(0) if self.w3 is not None else None
        outs = []
        for e, x_e in enumerate(x_ND.split(counts)):
            if counts[e] == 0:
                continue
            h = torch.addmm(b1[e], x_e, w1[e])
            h = F.silu(h) * (x_e @ w3[e]) if w3 is not None else act(h)
            outs.append(torch.addmm(b2[e], h, w2[e]))
        if not outs:
            return x_ND.new_zeros(0, self.dim)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}")
