"""Two-level noisy top-k gating of the hierarchical MoE (Shazeer et al. 2017, appendix B).

Legend: T tokens, D model dim, G groups (a), B experts per group (b), E = G*B experts,
P primary slots per token (k_primary), S secondary slots per token within a group (k_secondary).

Expert (i, j) is flattened to index ``i*B + j``. Its gate is ``G_primary(x)_i * G_i(x)_j`` (eq. 12).
Importance is the sum of those products (eq. 13). The load is eq. 14,
``Load_H_ij = Load_primary_i * Load_i(X^(i))_j / |X^(i)|``: the product with the primary load is
what gives the primary gate a gradient from the load loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.routing.base import (
    LocalRouting,
    Router,
    check_coefficient,
    check_router_args,
    noisy_top_k,
    routing_from_sums,
    routing_sums,
    token_weights,
)
from moekit.routing.losses import hard_counts
from moekit.types import Routing


class HierarchicalRouter(Router):
    """A primary noisy top-k gate over G groups and one secondary noisy top-k gate per group.

    Secondary logits are computed for every group (a [T, G, B] einsum, the same cost as one flat
    gate over E experts) and gathered for the P chosen groups, so no token loop is needed.
    """

    def __init__(self, dim: int, num_groups: int, experts_per_group: int, k_primary: int = 2,
                 k_secondary: int = 2, noise_epsilon: float = 1e-2, w_importance: float = 0.1,
                 w_load: float = 0.1, device=None, dtype=None):
        check_router_args(dim, num_groups, k_primary)
        check_router_args(dim, experts_per_group, k_secondary)
        super().__init__(dim, num_groups * experts_per_group, k_primary * k_secondary,
                         {"importance": w_importance, "load": w_load})
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.k_primary, self.k_secondary = k_primary, k_secondary
        self.noise_epsilon = check_coefficient("noise_epsilon", noise_epsilon)
        kw = {"device": device, "dtype": dtype}
        self.w_gate = nn.Parameter(torch.zeros(dim, num_groups, **kw))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_groups, **kw))
        self.w_gate_secondary = nn.Parameter(torch.zeros(num_groups, dim, experts_per_group, **kw))
        self.w_noise_secondary = nn.Parameter(torch.zeros(num_groups, dim, experts_per_group, **kw))

    def _std(self, logits: torch.Tensor) -> torch.Tensor:
        return F.softplus(logits) + self.noise_epsilon

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        x_TD = x_TD.float()
        num_tokens, B, P = x_TD.shape[0], self.experts_per_group, self.k_primary
        clean_TG = x_TD @ self.w_gate.float()
        std_TG = self._std(x_TD @ self.w_noise.float()) if self.training else None  # noise only in training
        # Both levels draw noise for the same rows of each shard: ask for the shard sizes once.
        if rows is None and self.training and self.shards.count > 1:
            rows = self.shards.rows(num_tokens, x_TD.device)
        primary = noisy_top_k(clean_TG, std_TG, P, self.shards, rows)

        gather_TPB = primary.indices[..., None].expand(num_tokens, P, B)
        clean_TPB = torch.einsum("td,gdb->tgb", x_TD, self.w_gate_secondary.float()).gather(1, gather_TPB)
        std_TPB = None
        if self.training:
            raw_TGB = torch.einsum("td,gdb->tgb", x_TD, self.w_noise_secondary.float())
            std_TPB = self._std(raw_TGB.gather(1, gather_TPB))
        secondary = noisy_top_k(clean_TPB, std_TPB, self.k_secondary, self.shards, rows)

        indices_TK = (primary.indices[..., None] * B + secondary.indices).reshape(num_tokens, self.k)
        weights_TK = (primary.gates[..., None] * secondary.gates).reshape(num_tokens, self.k)
        weight_T = token_weights(mask_T)
        local = routing_sums(indices_TK, weights_TK, self.num_experts, weight_T)
        if primary.load_prob is not None or secondary.load_prob is not None:
            # Eq. 14 is not additive over tokens, but its three sums are: they travel with the
            # counts and the importance, in one collective.
            members, load_primary, load_secondary = self._smooth_load_sums(primary, secondary, weight_T, num_tokens)
            local.sums.update(members=members, load_primary=load_primary, load_secondary=load_secondary)
        return local

    def finish(self, local: LocalRouting, sums: dict[str, torch.Tensor]) -> Routing:
        load_E = None
        if "members" in sums:
            load_E = self._smooth_load(sums["members"], sums["load_primary"], sums["load_secondary"])
        return routing_from_sums(local.indices, local.weights, sums["counts"], sums["importance"], load_E, {},
                                 self.loss_weights)

    def _smooth_load_sums(self, primary, secondary, weight_T, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """This shard's sums of eq. 14: group members |X^(i)| [G], primary load [G], secondary load [G, B].

        A level without noise (k == its expert count) contributes its hard count.
        """
        G, B, P = self.num_groups, self.experts_per_group, self.k_primary
        w_T = torch.ones(num_tokens, device=primary.gates.device) if weight_T is None else weight_T
        routed_TP = torch.where(w_T[:, None] > 0, primary.indices, -1)
        members_G = hard_counts(routed_TP, G).float()  # |X^(i)|
        if primary.load_prob is not None:
            load_primary_G = (primary.load_prob * w_T[:, None]).sum(0)
        else:
            load_primary_G = members_G
        if secondary.load_prob is not None:
            prob_TPB = secondary.load_prob * w_T[:, None, None]
        else:
            prob_TPB = torch.zeros(num_tokens, P, B, device=w_T.device).scatter_(-1, secondary.indices, 1.0)
            prob_TPB = prob_TPB * w_T[:, None, None]
        load_secondary_GB = prob_TPB.new_zeros(G, B).index_add(0, primary.indices.reshape(-1), prob_TPB.reshape(-1, B))
        return members_G, load_primary_G, load_secondary_GB

    @staticmethod
    def _smooth_load(members_G: torch.Tensor, load_primary_G: torch.Tensor,
                     load_secondary_GB: torch.Tensor) -> torch.Tensor:
        """Eq. 14 from the whole batch's sums: ``Load_primary_i * Load_i(X^(i))_j / |X^(i)|``, flattened [E]."""
        load_GB = load_primary_G[:, None] * load_secondary_GB / members_G.clamp_min(1.0)[:, None]
        return load_GB.reshape(-1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_groups={self.num_groups}, experts_per_group={self.experts_per_group}, "
                f"k_primary={self.k_primary}, k_secondary={self.k_secondary}")
