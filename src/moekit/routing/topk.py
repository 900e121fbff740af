"""Token-choice top-k gating without noise, in the variants today's MoE models use.

Legend: T tokens, D model dim, E experts, K slots per token (top-k), G expert groups, C experts per group.

Every variant computes ``logits = x @ W_g (+ b)`` and keeps, for each token, the k experts with the
largest *selection* score; the *combine* weights of the kept experts come from the unbiased scores:

- ``score="softmax"`` (default): scores are the softmax over all E logits. With ``normalize=True``
  (default) the k kept weights are renormalised to sum 1, which equals a softmax over the k kept
  logits; that is how it is computed (top-k of the logits, then softmax over them), as Shazeer's
  gate without noise, Mixtral and GPT-OSS do. With ``normalize=False`` the weights are the softmax
  values themselves (Qwen2-MoE, OLMoE, Qwen3-MoE with ``norm_topk_prob=False``).
- ``score="sigmoid"``: each expert's score is ``sigmoid(logit)`` on its own (DeepSeek-V3, Llama 4);
  ``normalize=True`` divides the k kept scores by their sum.
- ``scale`` multiplies the combine weights (DeepSeek-V3's routed scaling factor, 2.5).
- ``num_groups``/``topk_groups`` (DeepSeek-V3's group-limited routing): the E experts form G
  contiguous groups of C = E/G; a group's score is the sum of its two largest selection scores
  (its largest alone when C = 1), and only the ``topk_groups`` best groups are eligible.
- ``expert_bias`` (auxiliary-loss-free balancing, Wang et al. 2024; DeepSeek-V3): a per-expert
  bias [E], a buffer named ``expert_bias``, added to the scores for the *selection only*; it never
  enters the combine weights, so it changes which experts compute but not how their outputs are
  weighed. ``moekit.update_expert_bias`` moves it after each optimizer step from the counts of
  the training forwards since its last call (``expert_load``).
- ``logit_bias``: a learned bias [E] added to the logits (GPT-OSS's router bias); it enters both
  the selection and the weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.routing.base import (
    LocalRouting,
    Router,
    mask_slots,
    noisy_top_k,
    register_router,
    routing_from_sums,
    routing_sums,
    token_weights,
)
from moekit.types import Routing

SCORES = ("softmax", "sigmoid")
# Added to the sum of the kept sigmoid scores, as DeepSeek-V3 does: a token whose k scores all
# underflow gets zero weights instead of 0/0.
NORMALIZE_EPS = 1e-20


def check_topk_options(num_experts: int, k: int, score: str, normalize: bool, scale: float, num_groups: int,
                       topk_groups: int | None) -> int:
    """Validate the variant's options; return ``topk_groups`` resolved (None: every group)."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is not one of {SCORES}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a finite number > 0")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r} must be an int >= 1")
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide num_experts={num_experts}")
    if topk_groups is None:
        topk_groups = num_groups
    if isinstance(topk_groups, bool) or not isinstance(topk_groups, int) or topk_groups < 1:
        raise ValueError(f"topk_groups={topk_groups!r} must be an int >= 1")
    if topk_groups > num_groups:
        raise ValueError(f"topk_groups={topk_groups} exceeds num_groups={num_groups}")
    eligible = topk_groups * (num_experts // num_groups)
    if k > eligible:
        raise ValueError(f"k={k} exceeds the {eligible} eligible experts (topk_groups={topk_groups} groups of "
                         f"{num_experts // num_groups})")
    return topk_groups


def limit_to_groups(choice_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Set the selection scores of every expert outside each token's ``topk_groups`` best groups to -inf.

    A group's score is the sum of its two largest selection scores (DeepSeek-V3; the largest alone
    for groups of one expert).
    """
    num_tokens, num_experts = choice_TE.shape
    per_group = num_experts // num_groups
    choice_TGC = choice_TE.view(num_tokens, num_groups, per_group)
    group_score_TG = choice_TGC.topk(min(2, per_group), dim=-1).values.sum(-1)
    best_TG = group_score_TG.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return choice_TGC.masked_fill(~keep_TG[..., None], float("-inf")).view(num_tokens, num_experts)


@register_router("topk")
class TopKRouter(Router):
    """Token-choice top-k gating without noise: ``G(x) = Softmax(KeepTopK(x W_g, k))`` by default.

    The balancing losses use the hard load, which has no gradient, so only the importance loss
    shapes the gate (set ``w_importance=w_load=0`` for a variant balanced by ``expert_bias``).
    Without noise a zero-initialised gate would send every token to the same k experts, so
    ``w_gate`` starts from N(0, init_std^2).

    Args:
        dim, num_experts, k: D, E and the experts per token.
        w_importance, w_load: coefficients of CV^2(importance) and CV^2(load) in ``aux_loss``.
        init_std: std of the initial ``w_gate`` [D, E].
        score: "softmax" (over all E) or "sigmoid" (per expert); see the module docstring.
        normalize: renormalise the k kept weights to sum 1 (transformers' ``norm_topk_prob``).
        scale: multiplies the combine weights (> 0).
        num_groups, topk_groups: group-limited selection; ``topk_groups`` None means every group.
        expert_bias: keep an [E] selection bias (a float32 buffer, saved in checkpoints; float32 so
            that steps of 1e-3 are not lost to rounding in a low-precision model).
        logit_bias: learn an [E] bias ``logit_bias`` on the logits (zero-initialised).

    The default options give exactly the router moekit always had.
    """

    logit_bias: nn.Parameter | None
    expert_bias: torch.Tensor | None
    expert_load: torch.Tensor | None

    def __init__(self, dim: int, num_experts: int, k: int = 2, w_importance: float = 0.1,
                 w_load: float = 0.1, init_std: float = 0.02, score: str = "softmax", normalize: bool = True,
                 scale: float = 1.0, num_groups: int = 1, topk_groups: int | None = None,
                 expert_bias: bool = False, logit_bias: bool = False, device=None, dtype=None):
        super().__init__(dim, num_experts, k, {"importance": w_importance, "load": w_load})
        self.topk_groups = check_topk_options(num_experts, k, score, normalize, scale, num_groups, topk_groups)
        for name, value in (("expert_bias", expert_bias), ("logit_bias", logit_bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self.score, self.normalize, self.scale, self.num_groups = score, normalize, float(scale), num_groups
        self.w_gate = nn.Parameter(torch.randn(dim, num_experts, device=device, dtype=dtype) * init_std)
        self.logit_bias = nn.Parameter(torch.zeros(num_experts, device=device, dtype=dtype)) if logit_bias else None
        zeros_E = torch.zeros(num_experts, device=device, dtype=torch.float32) if expert_bias else None
        self.register_buffer("expert_bias", zeros_E)
        # Counts of the training forwards since the last ``update_expert_bias``: not a checkpoint's
        # business (the update runs after every step), so not saved.
        self.register_buffer("expert_load", None if zeros_E is None else zeros_E.clone(), persistent=False)

    @property
    def plain(self) -> bool:
        """True for the softmax over the top-k logits (no selection bias, every group eligible)."""
        return (self.score == "softmax" and self.normalize and self.expert_bias is None
                and self.topk_groups == self.num_groups)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 router logits ``x @ W_g (+ logit_bias)``."""
        logits_TE = x_TD.float() @ self.w_gate.float()
        return logits_TE if self.logit_bias is None else logits_TE + self.logit_bias.float()

    def select(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [T, K], combine weights [T, K] before ``scale``) from the logits."""
        if self.plain:  # today's router, bit for bit
            top = noisy_top_k(logits_TE, None, self.k)
            return top.indices, top.gates
        scores_TE = torch.softmax(logits_TE, dim=-1) if self.score == "softmax" else torch.sigmoid(logits_TE)
        choice_TE = scores_TE.detach()  # the selection is discrete: no gradient through it
        if self.expert_bias is not None:
            choice_TE = choice_TE + self.expert_bias
        if self.topk_groups < self.num_groups:
            choice_TE = limit_to_groups(choice_TE, self.num_groups, self.topk_groups)
        indices_TK = choice_TE.topk(self.k, dim=-1).indices
        if self.score == "softmax" and self.normalize:  # = kept probabilities / their sum, more stably
            return indices_TK, torch.softmax(logits_TE.gather(1, indices_TK), dim=-1)
        gates_TK = scores_TE.gather(1, indices_TK)
        if self.normalize:
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + NORMALIZE_EPS)
        return indices_TK, gates_TK

    def local_decision(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        indices_TK, gates_TK = self.select(self.logits(x_TD))
        if self.scale != 1.0:
            gates_TK = gates_TK * self.scale
        return mask_slots(indices_TK, gates_TK, token_weights(mask_T))

    def local_routing(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None,
                      rows: tuple[int, int] | None = None) -> LocalRouting:
        return routing_sums(*self.local_decision(x_TD, mask_T), self.num_experts, None)

    def finish(self, local: LocalRouting, sums: dict[str, torch.Tensor]) -> Routing:
        if self.training and self.expert_load is not None:  # the whole batch's counts, equal on every rank
            self.expert_load += sums["counts"].detach().to(self.expert_load.dtype)
        return routing_from_sums(local.indices, local.weights, sums["counts"], sums["importance"], None, {},
                                 self.loss_weights)

    def extra_repr(self) -> str:
        options = {"score": (self.score, "softmax"), "normalize": (self.normalize, True), "scale": (self.scale, 1.0),
                   "num_groups": (self.num_groups, 1), "topk_groups": (self.topk_groups, self.num_groups),
                   "expert_bias": (self.expert_bias is not None, False),
                   "logit_bias": (self.logit_bias is not None, False)}
        changed = "".join(f", {name}={value!r}" for name, (value, default) in options.items() if value != default)
        return super().extra_repr() + changed
