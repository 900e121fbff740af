"""The partitioned router of E^3 (Allingham et al., "Sparse MoEs meet Efficient Ensembles"), beside
the V-MoE router it is made of.

Legend: T tokens, N tokens per member (T = N*M), D model dim, E experts, P experts per member
(E = M*P), M ensemble members, K slots per token.

Token layout (**contract**): token ``t`` belongs to member ``t % M``. That is the flattened order
of ``[..., M, D]`` with the member axis innermost; ``moekit.ensemble.partitioned_moe`` turns the
tiled ``[B*M, S, D]`` activations of a model into that layout and back. The router sees only
``x_TD``, so the layout is the one thing it can rely on whatever the sequence length.

The E experts are split into M contiguous blocks of P. Member m has its own V-MoE router over its
block (own weights [D, P], own noise of std 1/P, own importance and load losses), so softmax and
top-K are taken within the block: the T x E gate matrix is block diagonal, and no copy of an
example ever reaches another member's experts.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from moekit.routing.base import LocalRouting, Router, check_router_args, register_router
from moekit.routing.vmoe import VMoERouter
from moekit.shards import BatchShards
from moekit.types import Routing, RoutingStats


def check_ensemble_size(num_experts: int, ensemble_size: int) -> int:
    """Return the experts per member; ``ValueError`` naming E and M when M does not divide E."""
    if isinstance(ensemble_size, bool) or not isinstance(ensemble_size, int) or ensemble_size < 1:
        raise ValueError(f"ensemble_size={ensemble_size!r} must be an int >= 1")
    if num_experts % ensemble_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ensemble_size={ensemble_size}: "
                         "E^3 gives each member an equal block of experts")
    return num_experts // ensemble_size


@register_router("e3")
class PartitionedRouter(Router):
    """M V-MoE routers, member m routing its tokens (``t % M == m``) within experts ``[m*P, (m+1)*P)``.

    Args:
        dim: D.
        num_experts: E, in total (divisible by ``ensemble_size``).
        k: experts per token, within the member's block (k <= E/M).
        ensemble_size: M.
        w_importance, w_load: loss coefficients of each member's router; ``aux_loss`` is the mean of
            the members' (so a 1-member router is exactly a V-MoE router).
        noise_std: each member's noise std; None means 1/P, V-MoE's 1/E on the member's P experts.
        init_std: std of the initial router weights.

    The member routers are ``self.members[m]`` (``VMoERouter``, ``w_gate`` [D, P]).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, ensemble_size: int = 2,
                 w_importance: float = 0.005, w_load: float = 0.005, noise_std: float | None = None,
                 init_std: float = 0.02, device=None, dtype=None):
        check_router_args(dim, num_experts, k)
        per_member = check_ensemble_size(num_experts, ensemble_size)
        if k > per_member:
            raise ValueError(f"k={k} exceeds the {per_member} experts of each member "
                             f"(num_experts={num_experts} / ensemble_size={ensemble_size})")
        # The members hold the loss coefficients; aux_loss is the mean of theirs.
        super().__init__(dim, num_experts, k, {})
        self.ensemble_size, self.experts_per_member = ensemble_size, per_member
        self.members = nn.ModuleList(
            VMoERouter(dim, per_member, k, w_importance, w_load, noise_std, init_std, device=device, dtype=dtype)
            for _ in range(ensemble_size))

    @property
    def shards(self) -> BatchShards:
        """The whole batch the members' balancing losses see (``moekit.shards``); set on every member."""
        return self.member_routers()[0].shards

    @shards.setter
    def shards(self, value: BatchShards) -> None:
        members = cast(nn.ModuleList | None, self._modules.get("members"))  # none yet while Router.__init__ runs
        for router in [] if members is None else members:
            cast(VMoERouter, router).shards = value

    @property
    def w_importance(self) -> float:
        return self.member_routers()[0].w_importance

    @property
    def w_load(self) -> float:
        return self.member_routers()[0].w_load

    def member_routers(self) -> list[VMoERouter]:
        """The members' routers, member m's routing experts [m*P, (m+1)*P)."""
        return [cast(VMoERouter, router) for router in self.members]

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        M, P = self.ensemble_size, self.experts_per_member
        num_tokens = x_TD.shape[0]
        if num_tokens % M:
            raise ValueError(f"{num_tokens} tokens is not a multiple of ensemble_size={M} "
                             "(token t belongs to member t % M)")
        x_NMD = x_TD.view(num_tokens // M, M, self.dim)
        mask_NM = None if mask_T is None else mask_T.view(num_tokens // M, M)
        # Every member draws noise for the same N rows of each shard: ask for the shard sizes once.
        routers = self.member_routers()
        if rows is None and self.training and self.shards.count > 1 and any(r.noise_std for r in routers):
            rows = self.shards.rows(num_tokens // M, x_TD.device)
        parts = [router.local_routing(x_NMD[:, m], None if mask_NM is None else mask_NM[:, m], rows)
                 for m, router in enumerate(routers)]
        # Member m's local expert j is global expert m*P + j; empty slots stay -1.
        indices_NMK = torch.stack([torch.where(r.indices >= 0, r.indices + m * P, -1) for m, r in enumerate(parts)], 1)
        weights_NMK = torch.stack([r.weights for r in parts], 1)
        K = indices_NMK.shape[-1]
        # The members' statistics, summed over the whole batch in one collective.
        sums = {f"{m}.{name}": value for m, part in enumerate(parts) for name, value in part.sums.items()}
        return LocalRouting(indices_NMK.reshape(num_tokens, K), weights_NMK.reshape(num_tokens, K), sums)

    def finish(self, local: LocalRouting, sums: dict[str, torch.Tensor]) -> Routing:
        parts = []
        for m, router in enumerate(self.member_routers()):
            mine = {name.split(".", 1)[1]: value for name, value in sums.items() if name.startswith(f"{m}.")}
            parts.append(router.finish(local, mine))  # only its stats and aux loss are read
        stats = RoutingStats(
            importance=torch.cat([r.stats.importance for r in parts]),
            load=torch.cat([r.stats.load for r in parts]),
            counts=torch.cat([r.stats.counts for r in parts]),
            dropped=0,
            losses={name: torch.stack([r.stats.losses[name] for r in parts]).mean() for name in parts[0].stats.losses},
        )
        aux = torch.stack([r.aux_loss for r in parts]).mean()
        return Routing(local.indices, local.weights, aux, stats)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ensemble_size={self.ensemble_size}"
