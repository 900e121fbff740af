"""The sparse-MoE blocks of transformers' model families, each as a ``moekit.MoE`` configuration.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

A ``Family`` knows one block class of transformers (read from ``transformers/models/*/modeling_*.py``,
5.x): which ``moekit.MoE`` options compute what the block computes (docs/routing.md has the table),
how its weights map to moekit's and back, and what the block's ``forward`` returns. Weights are
exchanged as state dicts (``to_moekit(block)`` is keyed like ``MoE.state_dict()``, ``to_block(moe)``
like the block's), so loading them with ``strict=True`` proves that every tensor was written.

Layouts (transformers' ``nn.Linear`` convention is out x in, moekit's is in x out):
- fused experts (Mixtral, Qwen, OLMoE, DeepSeek-V3): ``gate_up_proj`` [E, 2F, D] with the gate
  rows first and ``down_proj`` [E, D, F]: ``w1[e] = gate_up[e, :F].T``, ``w3[e] = gate_up[e, F:].T``,
  ``w2[e] = down[e].T``;
- GPT-OSS: ``gate_up_proj`` [E, D, 2F] in moekit's orientation with gate and up *interleaved*
  (even columns gate), the same for its bias;
- Llama 4: ``gate_up_proj`` [E, D, 2F] with the gate columns first, ``down_proj`` [E, F, D];
- routers: ``weight`` [E, D], so ``w_gate = weight.T``; dense MLPs (shared experts): gate/up/down
  ``nn.Linear`` layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moekit.upcycle import activation_name

# moekit's aux loss is left at 0: the model computes its own balancing loss from the router logits
# the block emits (output_router_logits=True), exactly as it does with its own block.
NO_AUX = {"w_importance": 0.0, "w_load": 0.0}

def gated_activation(act: Any, where: str) -> str:
    """"swiglu" for a gate activation that is SiLU (``moekit.upcycle.activation_name``); ``ValueError`` otherwise."""
    name = activation_name(act, where)
    if name != "silu":
        raise ValueError(f"{where}: its gate activation is {name}; moekit's gated experts compute SwiGLU "
                         "(a SiLU gate)")
    return "swiglu"


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.detach().transpose(-1, -2)


def fused_to_moekit(experts: Any, prefix: str = "experts.") -> dict[str, torch.Tensor]:
    """``gate_up_proj`` [E, 2F, D] (gate rows first) and ``down_proj`` [E, D, F] as w1, w3 [E, D, F], w2 [E, F, D]."""
    gate_up = experts.gate_up_proj.detach()
    half = gate_up.shape[1] // 2
    return {prefix + "w1": _t(gate_up[:, :half]), prefix + "w3": _t(gate_up[:, half:]),
            prefix + "w2": _t(experts.down_proj)}


def fused_to_block(moe: Any, prefix: str = "experts.") -> dict[str, torch.Tensor]:
    ex = moe.experts
    return {prefix + "gate_up_proj": torch.cat([_t(ex.w1), _t(ex.w3)], dim=1), prefix + "down_proj": _t(ex.w2)}


def mlp_to_moekit(mlp: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A gate/up/down ``nn.Linear`` MLP (no biases) as moekit's ``SharedExperts`` w1, w3 [D, F], w2 [F, D]."""
    return {prefix + "w1": _t(mlp.gate_proj.weight), prefix + "w3": _t(mlp.up_proj.weight),
            prefix + "w2": _t(mlp.down_proj.weight)}


def mlp_to_block(shared: Any, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + "gate_proj.weight": _t(shared.w1), prefix + "up_proj.weight": _t(shared.w3),
            prefix + "down_proj.weight": _t(shared.w2)}


def check_mlp(mlp: Any, where: str, act_attr: str = "act_fn") -> int:
    """The width of a gate/up/down MLP without biases and with a SiLU gate; ``ValueError`` otherwise."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if getattr(mlp, name).bias is not None:
            raise ValueError(f"{where}.{name} has a bias; moekit's shared experts here have none")
    gated_activation(getattr(mlp, act_attr), where)
    return mlp.gate_proj.out_features


class Family:
    """One block class of transformers and how moekit computes it (see the module docstring).

    Attributes:
        name: the family's short name.
        block_class: the block's class, ``module.QualName``.
        returns: what the block's ``forward`` returns: "tensor" (y, shaped as the input),
            "tensor_and_scores" (GPT-OSS: y and the [T, K] combine weights) or "flat_and_logits"
            (Llama 4: y as [T, D] and the [T, E] router logits).
        logits_float32: the router logits the block emits are float32 whatever the model's dtype.
        logits_per_sequence: the emitted router logits are [B, S, E] (SwitchTransformers), not [T, E].
    """

    name = ""
    block_class = ""
    returns = "tensor"
    logits_float32 = False
    logits_per_sequence = False

    def options(self, block: nn.Module) -> dict[str, Any]:
        """The ``moekit.MoE`` arguments (without device and dtype) that compute ``block``."""
        raise NotImplementedError

    def to_moekit(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The block's weights keyed like the ``MoE.state_dict()`` of ``options(block)``."""
        raise NotImplementedError

    def to_block(self, moe: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's weights keyed like the block's ``state_dict()``."""
        raise NotImplementedError

    def jitter(self, block: nn.Module) -> float:
        """The multiplicative input jitter the block applies in training (0: none)."""
        return 0.0

    def caveats(self, block: nn.Module) -> list[str]:
        """What of the block's training-mode computation moekit leaves out (``from_hf`` warns)."""
        return []


class Mixtral(Family):
    name = "mixtral"
    block_class = "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"

    def options(self, block):
        num_experts, dim = block.gate.weight.shape
        return {"dim": dim, "num_experts": num_experts, "k": block.gate.top_k,
                "hidden_dim": block.experts.down_proj.shape[-1], "router": "topk",
                "activation": gated_activation(block.experts.act_fn, f"{type(block).__name__}.experts"),
                "bias": False, **NO_AUX}

    def to_moekit(self, block):
        return {"router.w_gate": _t(block.gate.weight), **fused_to_moekit(block.experts)}

    def to_block(self, moe):
        return {"gate.weight": _t(moe.router.w_gate), **fused_to_block(moe)}

    def jitter(self, block):
        return float(block.jitter_noise)


class SoftmaxTopK(Family):
    """Qwen3-MoE and OLMoE: softmax over all experts, top-k, renormalised only if ``norm_topk_prob``."""

    def options(self, block):
        num_experts, dim = block.gate.weight.shape
        return {"dim": dim, "num_experts": num_experts, "k": block.gate.top_k,
                "hidden_dim": block.experts.down_proj.shape[-1], "router": "topk",
                "router_kwargs": {"normalize": bool(block.gate.norm_topk_prob)},
                "activation": gated_activation(block.experts.act_fn, f"{type(block).__name__}.experts"),
                "bias": False, **NO_AUX}

    def to_moekit(self, block):
        return {"router.w_gate": _t(block.gate.weight), **fused_to_moekit(block.experts)}

    def to_block(self, moe):
        return {"gate.weight": _t(moe.router.w_gate), **fused_to_block(moe)}


class Qwen3Moe(SoftmaxTopK):
    name = "qwen3_moe"
    block_class = "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock"


class Olmoe(SoftmaxTopK):
    name = "olmoe"
    block_class = "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock"


class Qwen2Moe(SoftmaxTopK):
    """Qwen3-MoE's routing plus one shared expert scaled by ``sigmoid(x . w_s)``."""

    name = "qwen2_moe"
    block_class = "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock"

    def options(self, block):
        width = check_mlp(block.shared_expert, f"{type(block).__name__}.shared_expert")
        if block.shared_expert_gate.bias is not None:
            raise ValueError(f"{type(block).__name__}.shared_expert_gate has a bias; moekit's shared gate has none")
        return {**super().options(block), "shared_experts": 1, "shared_hidden_dim": width, "shared_gate": True}

    def to_moekit(self, block):
        return {**super().to_moekit(block), **mlp_to_moekit(block.shared_expert, "shared."),
                "shared.w_gate": block.shared_expert_gate.weight.detach()[0]}

    def to_block(self, moe):
        return {**super().to_block(moe), **mlp_to_block(moe.shared, "shared_expert."),
                "shared_expert_gate.weight": moe.shared.w_gate.detach()[None]}


class DeepseekV3(Family):
    """Sigmoid scores, a selection-only bias, group-limited top-k, scaled weights, shared experts."""

    name = "deepseek_v3"
    block_class = "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE"
    logits_float32 = True  # its router runs in float32

    def options(self, block):
        gate = block.gate
        num_experts, dim = gate.weight.shape
        width = check_mlp(block.shared_experts, f"{type(block).__name__}.shared_experts")
        router_kwargs = {"score": "sigmoid", "normalize": bool(gate.norm_topk_prob),
                         "scale": float(gate.routed_scaling_factor), "num_groups": int(gate.num_group),
                         "topk_groups": int(gate.topk_group), "expert_bias": True}
        return {"dim": dim, "num_experts": num_experts, "k": gate.top_k,
                "hidden_dim": block.experts.down_proj.shape[-1], "router": "topk", "router_kwargs": router_kwargs,
                "activation": gated_activation(block.experts.act_fn, f"{type(block).__name__}.experts"),
                "bias": False, "shared_experts": 1, "shared_hidden_dim": width, **NO_AUX}

    def to_moekit(self, block):
        return {"router.w_gate": _t(block.gate.weight),
                "router.expert_bias": block.gate.e_score_correction_bias.detach(),
                **fused_to_moekit(block.experts), **mlp_to_moekit(block.shared_experts, "shared.")}

    def to_block(self, moe):
        return {"gate.weight": _t(moe.router.w_gate), "gate.e_score_correction_bias": moe.router.expert_bias,
                **fused_to_block(moe), **mlp_to_block(moe.shared, "shared_experts.")}


class GptOss(Family):
    """Top-k of biased logits, softmax over the k; clamped SwiGLU experts with biases."""

    name = "gpt_oss"
    block_class = "transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP"
    returns = "tensor_and_scores"

    def options(self, block):
        num_experts, dim = block.router.weight.shape
        ex = block.experts
        return {"dim": dim, "num_experts": num_experts, "k": block.router.top_k, "hidden_dim": ex.down_proj.shape[1],
                "router": "topk", "router_kwargs": {"logit_bias": True}, "activation": "clamped_swiglu",
                "activation_kwargs": {"alpha": float(ex.alpha), "limit": float(ex.limit)}, "bias": True, **NO_AUX}

    def to_moekit(self, block):
        ex = block.experts
        gate_up, gate_up_bias = ex.gate_up_proj.detach(), ex.gate_up_proj_bias.detach()
        return {"router.w_gate": _t(block.router.weight), "router.logit_bias": block.router.bias.detach(),
                "experts.w1": gate_up[..., ::2], "experts.w3": gate_up[..., 1::2],
                "experts.b1": gate_up_bias[..., ::2], "experts.b3": gate_up_bias[..., 1::2],
                "experts.w2": ex.down_proj.detach(), "experts.b2": ex.down_proj_bias.detach()}

    def to_block(self, moe):
        ex = moe.experts

        def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            return torch.stack([gate.detach(), up.detach()], dim=-1).flatten(-2)

        return {"router.weight": _t(moe.router.w_gate), "router.bias": moe.router.logit_bias.detach(),
                "experts.gate_up_proj": interleave(ex.w1, ex.w3), "experts.gate_up_proj_bias": interleave(ex.b1, ex.b3),
                "experts.down_proj": ex.w2.detach(), "experts.down_proj_bias": ex.b2.detach()}


class Llama4(Family):
    """Top-1 of the logits, the expert's *input* scaled by sigmoid(top logit), one shared expert."""

    name = "llama4"
    block_class = "transformers.models.llama4.modeling_llama4.Llama4TextMoe"
    returns = "flat_and_logits"

    def options(self, block):
        num_experts, dim = block.router.weight.shape
        if block.router.bias is not None:
            raise ValueError(f"{type(block).__name__}.router has a bias; Llama 4's has none")
        width = check_mlp(block.shared_expert, f"{type(block).__name__}.shared_expert", act_attr="activation_fn")
        return {"dim": dim, "num_experts": num_experts, "k": block.router.top_k,
                "hidden_dim": block.experts.down_proj.shape[1], "router": "topk",
                "router_kwargs": {"score": "sigmoid", "normalize": False}, "gate_input": True,
                "activation": gated_activation(block.experts.act_fn, f"{type(block).__name__}.experts"),
                "bias": False, "shared_experts": 1, "shared_hidden_dim": width, **NO_AUX}

    def to_moekit(self, block):
        gate_up = block.experts.gate_up_proj.detach()
        half = gate_up.shape[-1] // 2
        return {"router.w_gate": _t(block.router.weight), "experts.w1": gate_up[..., :half],
                "experts.w3": gate_up[..., half:], "experts.w2": block.experts.down_proj.detach(),
                **mlp_to_moekit(block.shared_expert, "shared.")}

    def to_block(self, moe):
        ex = moe.experts
        return {"router.weight": _t(moe.router.w_gate), "experts.gate_up_proj": torch.cat([ex.w1, ex.w3], -1).detach(),
                "experts.down_proj": ex.w2.detach(), **mlp_to_block(moe.shared, "shared_expert.")}


class SwitchTransformers(Family):
    """Top-1 of the softmax (not renormalised), an absolute capacity per sequence, ReLU experts."""

    name = "switch_transformers"
    block_class = "transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersSparseMLP"
    logits_float32 = True
    logits_per_sequence = True

    def options(self, block):
        router = block.router
        if router.dtype != torch.float32:
            raise ValueError(f"{type(block).__name__}: router_dtype={router.dtype}; moekit's routers compute in "
                             "float32 only")
        num_experts, dim = router.classifier.weight.shape
        first = block.experts["expert_0"]
        act = activation_name(first.act, f"{type(block).__name__}.experts.expert_0")
        common = {"dim": dim, "num_experts": num_experts, "k": 1, "hidden_dim": first.wi.out_features,
                  "activation": act, "bias": False, "sequence_capacity": int(router.expert_capacity), **NO_AUX}
        if router.classifier.bias is None:
            return {**common, "router": "switch", "router_kwargs": {"w_z": 0.0}}
        # A router bias: the same top-1 of the softmax is the "topk" router without renormalising.
        return {**common, "router": "topk", "router_kwargs": {"normalize": False, "logit_bias": True}}

    def to_moekit(self, block):
        experts = [block.experts[f"expert_{e}"] for e in range(len(block.experts))]
        state = {"router.w_gate": _t(block.router.classifier.weight),
                 "experts.w1": torch.stack([_t(ex.wi.weight) for ex in experts]),
                 "experts.w2": torch.stack([_t(ex.wo.weight) for ex in experts])}
        if block.router.classifier.bias is not None:
            state["router.logit_bias"] = block.router.classifier.bias.detach()
        return state

    def to_block(self, moe):
        state = {"router.classifier.weight": _t(moe.router.w_gate)}
        if getattr(moe.router, "logit_bias", None) is not None:
            state["router.classifier.bias"] = moe.router.logit_bias.detach()
        for e in range(moe.num_experts):
            state[f"experts.expert_{e}.wi.weight"] = _t(moe.experts.w1[e])
            state[f"experts.expert_{e}.wo.weight"] = _t(moe.experts.w2[e])
        return state

    def jitter(self, block):
        return float(block.router.jitter_noise)

    def caveats(self, block):
        p = block.experts["expert_0"].dropout.p
        if not p:
            return []
        return [f"{type(block).__name__}'s experts apply dropout (p={p}) in training; moekit's experts have none, "
                "so in training mode the replacement computes them without it (eval-mode outputs are identical)"]


FAMILIES: dict[str, Family] = {f.block_class: f for f in (
    Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(), DeepseekV3(), GptOss(), Llama4(), SwitchTransformers())}
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def supported_blocks() -> list[str]:
    """The supported block classes, by class name."""
    return [path.rsplit(".", 1)[1] for path in FAMILIES]


def family_of(block: nn.Module) -> Family:
    """The family of ``block`` (its exact class); ``TypeError`` naming it and the supported ones otherwise."""
    family = FAMILIES.get(qualified_name(type(block)))
    if family is None:
        raise TypeError(f"{type(block).__name__} ({qualified_name(type(block))}) is not a supported sparse-MoE "
                        f"block; moekit.hf converts {', '.join(supported_blocks())}")
    return family
