"""The demo's word-level language model: embedding -> MoE (with a residual) -> softmax.

Legend: B batch, S sequence length, D model dim, V vocabulary.

It sees one token at a time (no recurrence or attention), so it is a bigram-style model: its
point is to show routing, the balancing losses and the expert load in a real training run of a
minute on a laptop CPU. ``moekit.models.lstm_lm`` is the model for language-model quality.
"""

from __future__ import annotations

import torch
from torch import nn

import moekit
from moekit.types import RoutingStats


class DemoLM(nn.Module):
    """Embedding (D) -> MoE over the tokens, added to its input -> linear softmax over V words.

    Args:
        vocab_size: V.
        dim: D.
        num_experts, k, hidden_dim, router: the MoE layer's (``moekit.MoE``).
    """

    def __init__(self, vocab_size: int, dim: int, num_experts: int, k: int, hidden_dim: int, router: str,
                 device: torch.device | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, device=device)
        self.moe = moekit.MoE(dim, num_experts=num_experts, k=k, hidden_dim=hidden_dim, router=router, device=device)
        self.head = nn.Linear(dim, vocab_size, device=device)

    def forward(self, ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RoutingStats]:
        """[B, S] token ids -> (logits [B, S, V], the MoE's aux loss, its routing stats)."""
        h_BSD = self.embed(ids_BS)
        out = self.moe(h_BSD)
        return self.head(h_BSD + out.y), out.aux_loss, out.stats
