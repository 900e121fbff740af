"""Every MoE family of transformers is expressible exactly with moekit's options.

For each family a tiny block of transformers (the ground truth for what it computes) is built at
random, its weights are copied into a ``moekit.MoE`` configured as docs/routing.md says, and both
run on the same input in float32: the outputs must agree to relative 1e-5. The weight copying
here is written for the test only; converting blocks is ``moekit.hf``'s business.
"""

import pytest
import torch

import moekit

transformers = pytest.importorskip("transformers")

D, F, E = 8, 6, 8
NO_LOSS = dict(w_importance=0.0, w_load=0.0)


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _copy_swiglu_experts(moe: moekit.MoE, gate_up_EtwoFD: torch.Tensor, down_EDF: torch.Tensor) -> None:
    """Experts stored as gate_up [E, 2F, D] (gate rows first) and down [E, D, F], nn.Linear style."""
    half = gate_up_EtwoFD.shape[1] // 2
    with torch.no_grad():
        moe.experts.w1.copy_(gate_up_EtwoFD[:, :half].transpose(1, 2))
        moe.experts.w3.copy_(gate_up_EtwoFD[:, half:].transpose(1, 2))
        moe.experts.w2.copy_(down_EDF.transpose(1, 2))


def _copy_mlp(shared, mlp) -> None:
    """A gate/up/down nn.Linear MLP into ``moe.shared``."""
    with torch.no_grad():
        shared.w1.copy_(mlp.gate_proj.weight.t())
        shared.w3.copy_(mlp.up_proj.weight.t())
        shared.w2.copy_(mlp.down_proj.weight.t())


def mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                             num_experts_per_tok=2))
    _randomise(hf)
    moe = moekit.MoE(D, E, 2, F, router="topk", activation="swiglu", bias=False, **NO_LOSS)
    with torch.no_grad():
        moe.router.w_gate.copy_(hf.gate.weight.t())
    _copy_swiglu_experts(moe, hf.experts.gate_up_proj, hf.experts.down_proj)
    return hf, moe, lambda x: hf(x)


def _qwen_like(module_path: str, config_cls: str, block_cls: str, normalize: bool, shared: bool):
    import importlib

    mod = importlib.import_module(module_path)
    # OLMoE's experts read intermediate_size, the Qwens' moe_intermediate_size.
    cfg = dict(hidden_size=D, intermediate_size=F, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=2,
               norm_topk_prob=normalize)
    if shared:
        cfg["shared_expert_intermediate_size"] = 5
    hf = getattr(mod, block_cls)(getattr(mod, config_cls)(**cfg))
    _randomise(hf)
    kw = dict(shared_experts=1, shared_hidden_dim=5, shared_gate=True) if shared else {}
    moe = moekit.MoE(D, E, 2, F, router="topk", router_kwargs=dict(normalize=normalize), activation="swiglu",
                     bias=False, **kw, **NO_LOSS)
    with torch.no_grad():
        moe.router.w_gate.copy_(hf.gate.weight.t())
        if shared:
            _copy_mlp(moe.shared, hf.shared_expert)
            moe.shared.w_gate.copy_(hf.shared_expert_gate.weight[0])
    _copy_swiglu_experts(moe, hf.experts.gate_up_proj, hf.experts.down_proj)
    return hf, moe, lambda x: hf(x)


def qwen2_moe():
    return _qwen_like("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeSparseMoeBlock",
                      False, True)


def qwen3_moe():
    return _qwen_like("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
                      True, False)


def qwen3_moe_unnormalised():
    return _qwen_like("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock",
                      False, False)


def olmoe():
    return _qwen_like("transformers.models.olmoe.modeling_olmoe", "OlmoeConfig", "OlmoeSparseMoeBlock", False, False)


def deepseek_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=2,
                           n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                           n_shared_experts=2)
    hf = DeepseekV3MoE(cfg)
    _randomise(hf)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.2)
    moe = moekit.MoE(D, E, 2, F, router="topk", activation="swiglu", bias=False, shared_experts=2, **NO_LOSS,
                     router_kwargs=dict(score="sigmoid", normalize=True, scale=2.5, num_groups=4, topk_groups=2,
                                        expert_bias=True))
    with torch.no_grad():
        moe.router.w_gate.copy_(hf.gate.weight.t())
        moe.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
    _copy_swiglu_experts(moe, hf.experts.gate_up_proj, hf.experts.down_proj)
    _copy_mlp(moe.shared, hf.shared_experts)
    return hf, moe, lambda x: hf(x)


def gpt_oss():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssMLP

    # A small limit, so that the clamps act on these random weights.
    cfg = GptOssConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2,
                       swiglu_limit=1.0)
    hf = GptOssMLP(cfg)
    _randomise(hf)
    moe = moekit.MoE(D, E, 2, F, router="topk", router_kwargs=dict(logit_bias=True), activation="clamped_swiglu",
                     activation_kwargs=dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit), **NO_LOSS)
    ex = hf.experts
    with torch.no_grad():
        moe.router.w_gate.copy_(hf.router.weight.t())
        moe.router.logit_bias.copy_(hf.router.bias)
        # gate and up are interleaved along the last dimension: even columns gate, odd up.
        moe.experts.w1.copy_(ex.gate_up_proj[..., ::2])
        moe.experts.w3.copy_(ex.gate_up_proj[..., 1::2])
        moe.experts.b1.copy_(ex.gate_up_proj_bias[..., ::2])
        moe.experts.b3.copy_(ex.gate_up_proj_bias[..., 1::2])
        moe.experts.w2.copy_(ex.down_proj)
        moe.experts.b2.copy_(ex.down_proj_bias)
    return hf, moe, lambda x: hf(x)[0]


def llama4():
    from transformers.models.llama4.modeling_llama4 import Llama4TextConfig, Llama4TextMoe

    hf = Llama4TextMoe(Llama4TextConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                        num_experts_per_tok=1))
    _randomise(hf)
    moe = moekit.MoE(D, E, 1, F, router="topk", router_kwargs=dict(score="sigmoid", normalize=False), gate_input=True,
                     activation="swiglu", bias=False, shared_experts=1, **NO_LOSS)
    with torch.no_grad():
        moe.router.w_gate.copy_(hf.router.weight.t())
        moe.experts.w1.copy_(hf.experts.gate_up_proj[..., :F])  # [E, D, 2F]: gate columns first
        moe.experts.w3.copy_(hf.experts.gate_up_proj[..., F:])
        moe.experts.w2.copy_(hf.experts.down_proj)
    _copy_mlp(moe.shared, hf.shared_expert)
    return hf, moe, lambda x: hf(x.reshape(-1, D))[0].reshape(x.shape)


def switch_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersConfig,
        SwitchTransformersSparseMLP,
    )

    cfg = SwitchTransformersConfig(d_model=D, d_ff=F, num_experts=E, expert_capacity=2, dropout_rate=0.0)
    hf = SwitchTransformersSparseMLP(cfg)
    _randomise(hf)
    moe = moekit.MoE(D, E, 1, F, router="switch", sequence_capacity=2, activation="relu", bias=False, **NO_LOSS)
    with torch.no_grad():
        moe.router.w_gate.copy_(hf.router.classifier.weight.t())
        for e in range(E):
            moe.experts.w1[e].copy_(hf.experts[f"expert_{e}"].wi.weight.t())
            moe.experts.w2[e].copy_(hf.experts[f"expert_{e}"].wo.weight.t())
    return hf, moe, lambda x: hf(x)


FAMILIES = [mixtral, qwen2_moe, qwen3_moe, qwen3_moe_unnormalised, olmoe, deepseek_v3, gpt_oss, llama4,
            switch_transformers]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.__name__ for f in FAMILIES])
def test_block_is_expressible_exactly(family):
    torch.manual_seed(0)
    hf, moe, run_hf = family()
    hf.eval()
    moe.eval()
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        want = run_hf(x.clone())
        got = moe(x).y
    # Relative 1e-5 of the output's scale: the k expert outputs are summed in another order.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert scale > 1e-3  # not a trivially zero block


def test_the_capacity_and_the_clamps_act_in_these_cases():
    torch.manual_seed(0)
    _, moe, _ = switch_transformers()
    assert moe.eval()(torch.randn(3, 7, D)).stats.dropped > 0  # 7 tokens, capacity 2 per sequence
    _, moe, _ = gpt_oss()
    x = torch.randn(3, 7, D).reshape(-1, D)
    h = x @ moe.experts.w1[0] + moe.experts.b1[0]
    assert (h > 1.0).any()
