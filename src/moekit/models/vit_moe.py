"""A small Vision Transformer whose MLPs become sparse MoEs (V-MoE), optionally an E^3 ensemble, or Soft MoEs.

Legend: B images, M ensemble members, R = B*M rows after tiling, S tokens per image (patches, plus
the class token), D model dim, F MLP hidden dim, E experts, K experts per token, C classes.

The V-MoE routes tokens to experts (top-K of a softmax, ``router="vmoe"``) or lets the experts
choose their tokens (``router="expert_choice"``, Zhou et al. 2022): each expert takes the
``ceil(K*T/E)`` tokens of the batch it scores highest. Expert choice is not causal, which an image
classifier can afford, but a prediction then depends on the other images of its batch.

Placement follows V-MoE: "every_2" turns the MLP of every odd block (1, 3, 5, ...; 0-based) into an
MoE, "last_n" only the last n of those. With ``ensemble_size`` M the activations are tiled into M
members right before the first MoE block, which routes each member within its own E/M experts;
the model then returns ``[B*M, C]`` logits, row ``b*M + m`` being member m on image b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moekit.ensemble import (
    PartitionedRouter,
    ensemble_cross_entropy,
    ensemble_probs,
    member_logits,
    partitioned_moe,
    tile_examples,
)
from moekit.layer import MoE
from moekit.soft_moe import SoftMoE
from moekit.types import RoutingStats

POOLS = ("cls", "mean")
LAYOUTS = ("every_2", "last_n")
ROUTERS = ("vmoe", "expert_choice")


@dataclass(frozen=True)
class ViTConfig:
    """The transformer backbone."""

    image_size: tuple[int, int] = (28, 28)
    patch_size: int = 7
    channels: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 128
    pool: str = "cls"
    """"cls": a learned class token is read out; "mean": the mean of the patch tokens (no class token)."""

    def __post_init__(self) -> None:
        height, width = self.image_size
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide image_size={tuple(self.image_size)}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {POOLS}")


@dataclass(frozen=True)
class VMoEConfig:
    """Which MLPs become MoEs, and how they route (defaults: V-MoE's)."""

    num_experts: int = 8
    k: int = 1
    layout: str = "last_n"
    last_n: int = 2
    """With layout "last_n": how many of the odd blocks, counted from the top, are MoE."""
    capacity_factor: float | None = 1.5
    """V-MoE: 1.05 in pre-training, 1.5 in fine-tuning; None for dropless."""
    capacity_multiple: int = 4
    batch_prioritized: bool = True
    w_importance: float = 0.005
    w_load: float = 0.005
    ensemble_size: int | None = None
    """None: a V-MoE (``vmoe`` router). M: an E^3 of M members (``PartitionedRouter``; M = 1 is allowed)."""
    soft: bool = False
    """True: Soft MoE blocks (``moekit.SoftMoE``, Puigcerver et al. 2023) instead of sparse ones; k, the
    capacity and the routing losses then do not apply."""
    slots_per_expert: int = 1
    """With ``soft``: P, the slots each expert computes per image (1 in the paper's largest models)."""
    router: str = "vmoe"
    """"vmoe": tokens choose their top-K experts; "expert_choice": each expert takes its ceil(K*T/E)
    best tokens of the batch (K is then the mean number of experts per token). Expert choice balances
    the load by construction: it has no capacity step (nothing is dropped) and no balancing loss."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS}")
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} is not one of {ROUTERS}")
        if self.router != "vmoe" and (self.soft or self.ensemble_size is not None):
            raise ValueError(f"router={self.router!r} with soft={self.soft}, ensemble_size={self.ensemble_size}: "
                             "Soft MoE has no router, and E^3 partitions V-MoE's top-K router")
        if self.soft and self.ensemble_size is not None:
            raise ValueError(f"soft=True with ensemble_size={self.ensemble_size}: E^3 partitions a sparse router")
        if isinstance(self.slots_per_expert, bool) or not isinstance(self.slots_per_expert, int) \
                or self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert={self.slots_per_expert!r} must be an int >= 1")


def moe_block_indices(depth: int, layout: str, last_n: int) -> list[int]:
    """0-based indices of the blocks whose MLP is an MoE."""
    odd = list(range(1, depth, 2))
    if layout == "every_2":
        return odd
    if not 1 <= last_n <= len(odd):
        raise ValueError(f"last_n={last_n} must be in [1, {len(odd)}] for depth={depth} ({len(odd)} odd blocks)")
    return odd[-last_n:]


class ViTOutput(NamedTuple):
    """``logits`` [B*M, C] (M = 1 without ensemble), ``aux_loss`` scalar, ``stats`` one per MoE block."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: list[RoutingStats]


class Attention(nn.Module):
    """Multi-head self-attention over [R, S, D].

    Written as two matmuls rather than ``scaled_dot_product_attention``: FlopCounterMode has no
    formula for the CPU fused kernel and would count attention as free.
    """

    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x_RSD: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x_RSD).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).flatten(-2))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (mlp dense or MoE)."""

    def __init__(self, vit: ViTConfig, moe: VMoEConfig | None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(vit.dim, **kw)
        self.attn = Attention(vit.dim, vit.heads, **kw)
        self.norm2 = nn.LayerNorm(vit.dim, **kw)
        self.ensemble_size = 1
        if moe is None:
            self.mlp: nn.Module = nn.Sequential(nn.Linear(vit.dim, vit.mlp_dim, **kw), nn.GELU(),
                                                nn.Linear(vit.mlp_dim, vit.dim, **kw))
            self.is_moe = False
            return
        self.is_moe = True
        if moe.soft:  # Soft MoE mixes the tokens of each image: it takes [R, S, D] as it is
            self.mlp = SoftMoE(vit.dim, moe.num_experts, moe.slots_per_expert, vit.mlp_dim, activation="gelu", **kw)
            return
        if moe.router == "expert_choice":
            # Every expert computes exactly ceil(K*T/E) tokens: no capacity drops, no balancing loss.
            self.mlp = MoE(vit.dim, moe.num_experts, moe.k, vit.mlp_dim, router="expert_choice",
                           w_importance=0.0, w_load=0.0, activation="gelu", **kw)
            return
        common = {"w_importance": moe.w_importance, "w_load": moe.w_load, **kw}
        if moe.ensemble_size is None:
            router: str | nn.Module = "vmoe"
        else:
            router = PartitionedRouter(vit.dim, moe.num_experts, moe.k, moe.ensemble_size, **common)
            self.ensemble_size = moe.ensemble_size
        self.mlp = MoE(vit.dim, moe.num_experts, moe.k, vit.mlp_dim, router=router,
                       capacity_factor=moe.capacity_factor, capacity_multiple=moe.capacity_multiple,
                       batch_prioritized=moe.batch_prioritized, activation="gelu", **common)

    def forward(self, x_RSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, RoutingStats | None]:
        x_RSD = x_RSD + self.attn(self.norm1(x_RSD))
        h_RSD = self.norm2(x_RSD)
        if not self.is_moe:
            return x_RSD + self.mlp(h_RSD), None, None
        if isinstance(self.mlp, SoftMoE):
            out = self.mlp(h_RSD)
        else:
            out = partitioned_moe(self.mlp, h_RSD, self.ensemble_size)
        return x_RSD + out.y, out.aux_loss, out.stats


class ViTMoE(nn.Module):
    """A ViT (``moe=None``: dense), a V-MoE, an E^3 (``moe.ensemble_size`` = M) or a Soft MoE ViT (``moe.soft``).

    Shapes: ``images`` [B, channels, H, W] -> ``ViTOutput(logits [B*M, C], aux_loss, stats)``.
    ``loss`` and ``predict_probs`` handle the members (mean of member cross-entropies; mean of
    member probabilities).
    """

    def __init__(self, vit: ViTConfig, moe: VMoEConfig | None = None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.vit, self.moe_config = vit, moe
        self.moe_blocks = [] if moe is None else moe_block_indices(vit.depth, moe.layout, moe.last_n)
        self.ensemble_size = 1 if moe is None or moe.ensemble_size is None else moe.ensemble_size
        height, width = vit.image_size
        num_patches = (height // vit.patch_size) * (width // vit.patch_size)
        num_tokens = num_patches + (1 if vit.pool == "cls" else 0)
        self.patch_embed = nn.Conv2d(vit.channels, vit.dim, vit.patch_size, stride=vit.patch_size, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vit.dim, **kw)) if vit.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, vit.dim, **kw))
        self.blocks = nn.ModuleList(Block(vit, moe if i in self.moe_blocks else None, **kw)
                                    for i in range(vit.depth))
        self.norm = nn.LayerNorm(vit.dim, **kw)
        self.head = nn.Linear(vit.dim, vit.num_classes, **kw)
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> ViTOutput:
        pooled_RD, aux, stats = self.forward_features(images)
        return ViTOutput(self.head(pooled_RD), aux, stats)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[RoutingStats]]:
        """The pre-logits ``[B*M, D]`` (the pooled, normalised representation the head reads; row
        ``b*M + m`` is member m on image b), the routers' ``aux_loss`` and the ``stats`` of each MoE block."""
        expected = (self.vit.channels, *self.vit.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}], got {tuple(images.shape)}")
        x_BSD = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x_BSD = torch.cat([self.cls_token.expand(x_BSD.shape[0], -1, -1), x_BSD], dim=1)
        x = x_BSD + self.pos_embed
        aux = x.new_zeros((), dtype=torch.float32)
        stats: list[RoutingStats] = []
        for i, block in enumerate(self.blocks):
            if self.moe_blocks and i == self.moe_blocks[0]:
                # E^3: blocks before the first MoE run once per image; from here on, M copies.
                x = tile_examples(x, self.ensemble_size)
            x, block_aux, block_stats = block(x)
            if block_aux is not None:
                aux = aux + block_aux
                stats.append(block_stats)
        x = self.norm(x)
        pooled_RD = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return pooled_RD, aux, stats

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ViTOutput]:
        """Training loss: mean of the members' cross-entropies plus the routers' balancing losses."""
        out = self(images)
        return ensemble_cross_entropy(out.logits, labels, self.ensemble_size) + out.aux_loss, out

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C] the mean of the members' softmax probabilities (no gradient)."""
        return ensemble_probs(self(images).logits, self.ensemble_size)

    @torch.no_grad()
    def member_probs(self, images: torch.Tensor) -> torch.Tensor:
        """[B, M, C] each member's softmax probabilities (no gradient)."""
        return member_logits(self(images).logits, self.ensemble_size).float().softmax(dim=-1)

    @torch.no_grad()
    def member_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's softmax probabilities [B, M, C] and pre-logit features [B, M, D], from one
        forward pass (no gradient). E^3's few-shot probes read the members' features side by side."""
        pooled_RD, _, _ = self.forward_features(images)
        probs_BMC = member_logits(self.head(pooled_RD), self.ensemble_size).float().softmax(dim=-1)
        return probs_BMC, member_logits(pooled_RD, self.ensemble_size).float()
