"""Tiny transformers models of every supported family, built from configs at random (no hub, no network).

Imported by the tests of this directory (conftest.py puts it on the path).

Each family is (model class name, config class name, config arguments, whether it is an
encoder-decoder). Two layers, width 32, a few experts; the weights are perturbed away from
transformers' small initialisation so that routing is far from uniform and every expert is hit.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(
        intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), False),
    # Layer 0 stays dense (mlp_only_layers): it must be left alone.
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
        num_experts_per_tok=2, num_key_value_heads=2, mlp_only_layers=[0]), False),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_key_value_heads=2,
        head_dim=8, norm_topk_prob=True), False),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(
        intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_key_value_heads=2), False),
    # The first layer is dense (first_k_dense_replace=1); 8 experts in 4 groups, 2 groups kept.
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), False),
    # A small swiglu_limit, so that the clamps act on these weights.
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", dict(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, head_dim=8,
        swiglu_limit=1.0), False),
    # Layer 0 is a dense MLP, layer 1 the MoE.
    "llama4": ("Llama4ForCausalLM", "Llama4TextConfig", dict(
        intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1,
        num_key_value_heads=2, head_dim=8, moe_layers=[1]), False),
    # Sparse every 2nd block of encoder and decoder; capacity 3 per sequence, so tokens are dropped.
    "switch_transformers": ("SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig", dict(
        vocab_size=VOCAB, d_model=32, d_ff=24, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_experts=4, expert_capacity=3, encoder_sparse_step=2, decoder_sparse_step=2, dropout_rate=0.0,
        router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2), True),
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """The family's tiny model (eval mode), its weights perturbed with N(0, 0.2^2)."""
    model_cls, config_cls, kwargs, seq2seq = FAMILIES[family]
    config_kwargs = {**kwargs, **overrides} if seq2seq else {**COMMON, **kwargs, **overrides}
    config = getattr(transformers, config_cls)(**config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.to(dtype)


def is_seq2seq(family: str) -> bool:
    return FAMILIES[family][3]


def batch(family: str, seed: int = 0):
    """(input_ids [2, 9], attention_mask with the second row left-padded by 2, labels [2, 9])."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = 0
    labels = torch.randint(3, VOCAB, (2, 9), generator=gen)
    return ids, mask, labels


def run(model, family: str, ids, mask, labels=None, **kwargs):
    """The model's forward on a batch (an encoder-decoder gets the labels' shift as decoder input)."""
    if is_seq2seq(family):
        dec = model._shift_right(labels if labels is not None else ids)
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels, **kwargs)
    return model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)


def router_logits(out, family: str):
    if is_seq2seq(family):
        return tuple(out.encoder_router_logits) + tuple(out.decoder_router_logits)
    return tuple(out.router_logits)


def aux_losses(out, family: str) -> dict:
    """The balancing losses the model itself computed from the router logits (None where it has none)."""
    if is_seq2seq(family):
        return {name: getattr(out, name) for name in ("encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss",
                                                      "decoder_z_loss")}
    return {"aux_loss": getattr(out, "aux_loss", None)}


def assert_close(got, want, rel=1e-5):
    """Equal to ``rel`` of the reference's largest magnitude (sums of k expert outputs in another order)."""
    scale = want.detach().abs().max().item()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=rel, atol=rel * max(scale, 1e-12))

