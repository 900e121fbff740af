"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Legend: B sequences, S tokens per sequence, D model dim, F expert hidden dim, E experts,
P slots per expert, N = E*P slots.

Per sequence X [S, D] and learned slot parameters Phi [D, N]:

    logits  = X Phi                      [S, N]
    D       = softmax over the S tokens   (each slot is a convex mix of the sequence's tokens)
    slots   = D^T X                       [N, D]; expert i computes its P slots
    C       = softmax over the N slots    (each token's output is a convex mix of the slot outputs)
    Y       = C expert(slots)             [S, D]

Nothing is dropped and no token is left out, so there is no balancing loss (``aux_loss`` is 0),
and every expert computes the same P slots per sequence. Every token's output depends on every
token of its sequence: Soft MoE is **not causal** (no autoregressive decoding), but sequences do
not interact. Padding tokens (mask False) take no part: they get no dispatch weight, and their
output is 0. With ``normalize=True`` (the paper's choice for large D) the tokens and the columns of
Phi are l2-normalised and the logits scaled by a learned scalar, initialised to 1.

Statistics (``MoEOutput.stats``): ``counts`` [E] the slots each expert computed (B*P, equal for all);
``load`` the same as float; ``importance`` [E] the combine weight each expert's slots receive,
summed over the real tokens (it sums to the number of real tokens); ``losses`` the CV^2 of both,
reported only; ``dropped`` 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import Experts
from moekit.routing.losses import cv_squared
from moekit.types import MoEOutput, RoutingStats


class SoftMoE(nn.Module):
    """A Soft MoE layer over sequences.

    Args:
        dim: D.
        num_experts: E.
        slots_per_expert: P (>= 1).
        hidden_dim: F, each expert's hidden width (default 4*dim).
        activation, bias, expert_backend, activation_kwargs: the experts' (``moekit.experts.Experts``);
            GELU by default, as in the ViT MLP that Soft MoE replaces.
        normalize: l2-normalise tokens and slot parameters, with a learned logit scale.

    Parameters: ``phi`` [D, E*P] (LeCun normal: std 1/sqrt(D)), ``scale`` [] with ``normalize``, and
    the experts ``experts.w1`` ... (slot n belongs to expert ``n // P``).

    Shapes: ``forward(x [B, S, D], mask [B, S] bool or None) -> MoEOutput(y [B, S, D], aux_loss [], stats)``.
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, hidden_dim: int | None = None,
                 activation: str = "gelu", bias: bool = True, normalize: bool = False, expert_backend: str = "auto",
                 activation_kwargs: dict | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts), ("slots_per_expert", slots_per_expert)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self.dim, self.num_experts, self.slots_per_expert = dim, num_experts, slots_per_expert
        self.num_slots = num_experts * slots_per_expert
        kw = {"device": device, "dtype": dtype}
        self.phi = nn.Parameter(torch.empty(dim, self.num_slots, **kw))
        self.scale = nn.Parameter(torch.ones((), **kw)) if normalize else None
        self.experts = Experts(num_experts, dim, 4 * dim if hidden_dim is None else hidden_dim, activation,
                               expert_backend, bias=bias, activation_kwargs=activation_kwargs, **kw)
        if not self.phi.is_meta:
            nn.init.normal_(self.phi, std=1.0 / math.sqrt(dim))

    def logits(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """[B, S, N] float32 ``X Phi`` (normalised and scaled with ``normalize``)."""
        x_BSD, phi_DN = x_BSD.float(), self.phi.float()
        if self.scale is None:
            return x_BSD @ phi_DN
        return F.normalize(x_BSD, dim=-1) @ (self.scale.float() * F.normalize(phi_DN, dim=0))

    def _check(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"SoftMoE input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SoftMoE input must have shape [B, S, {self.dim}], got {tuple(x.shape)}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool):
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask is not None and mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} must be [B, S] = {tuple(x.shape[:2])}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MoEOutput:
        self._check(x, mask)
        B, S, D = x.shape
        E, P, N = self.num_experts, self.slots_per_expert, self.num_slots
        # The weights in float32 outside autocast, as a router's (softmaxes over many entries).
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits_BSN = self.logits(x)
            combine_BSN = torch.softmax(logits_BSN, dim=-1)
            if mask is not None:
                # The smallest float, not -inf: a sequence of padding alone then gets finite (and
                # then zeroed) weights instead of NaN, which would poison every gradient.
                logits_BSN = logits_BSN.masked_fill(~mask[..., None], torch.finfo(logits_BSN.dtype).min)
            dispatch_BSN = torch.softmax(logits_BSN, dim=1)
            if mask is not None:
                dispatch_BSN = dispatch_BSN * mask[..., None]
        slots_BND = torch.einsum("bsn,bsd->bnd", dispatch_BSN.to(x.dtype), x)
        # Expert e's rows are its P slots of every sequence, contiguous: [E, B, P, D].
        rows = slots_BND.view(B, E, P, D).transpose(0, 1).reshape(E * B * P, D)
        out_BND = self.experts(rows, [B * P] * E).view(E, B, P, D).transpose(0, 1).reshape(B, N, D)
        y_BSD = torch.einsum("bsn,bnd->bsd", combine_BSN.to(x.dtype), out_BND)
        if mask is not None:
            y_BSD = y_BSD * mask[..., None].to(y_BSD.dtype)
            combine_BSN = combine_BSN * mask[..., None]
        importance_E = combine_BSN.sum((0, 1)).view(E, P).sum(-1)
        counts_E = torch.full((E,), B * P, dtype=torch.long, device=x.device)
        load_E = counts_E.to(importance_E.dtype)
        stats = RoutingStats(importance_E, load_E, counts_E, 0,
                             {"importance": cv_squared(importance_E), "load": cv_squared(load_E)})
        return MoEOutput(y_BSD, importance_E.new_zeros(()), stats)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"normalize={self.scale is not None}")
