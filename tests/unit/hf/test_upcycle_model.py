"""moekit.hf.upcycle_model: a dense Llama / Qwen3 causal LM upcycled in place is, at initialisation, the same model."""

import copy

import hf_models as hm
import pytest
import torch

import moekit.hf
from moekit.hf import UpcycledMLP, moe_aux_loss, upcycle_model

torch.set_num_threads(1)
transformers = hm.transformers


def dense(kind: str):
    common = dict(hm.COMMON, intermediate_size=40, num_key_value_heads=2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_upcycled_model_is_the_dense_model_at_initialisation(kind):
    original = dense(kind)
    model = copy.deepcopy(original)
    names = upcycle_model(model, num_experts=4, k=2, w_importance=0.01, w_load=0.0)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.get_submodule(n), UpcycledMLP) for n in names)
    ids, mask, labels = hm.batch("mixtral")
    with torch.no_grad():
        want, got = original(ids, attention_mask=mask), model(ids, attention_mask=mask)
    hm.assert_close(got.logits, want.logits)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), original.generate(ids, **kw))
    # Train: the labels loss plus the balancing loss reach every expert and the router.
    model.train()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    aux = moe_aux_loss(model)
    assert aux.requires_grad and aux.item() > 0
    (loss + aux).backward()
    for name in names:
        moe = model.get_submodule(name).moe
        assert moe.experts.w1.grad.abs().sum() > 0 and moe.router.w_gate.grad.abs().sum() > 0
        assert model.get_submodule(name).last_stats.counts.sum() == ids.numel() * 2


def test_only_the_chosen_layers_are_upcycled():
    model = dense("llama")
    assert upcycle_model(model, 4, 1, layers=[1]) == ["model.layers.1.mlp"]
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert isinstance(model.model.layers[1].mlp, UpcycledMLP)
    base = dense("llama").model  # LlamaModel works as well
    assert upcycle_model(base, 4, 1, layers=[0]) == ["layers.0.mlp"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"supports model types \('llama', 'qwen3'\); MixtralForCausalLM is 'mixtral'"):
        upcycle_model(hm.build("mixtral"), 4, 2)
    model = dense("llama")
    with pytest.raises(ValueError, match="layer 2 is not one of the 2 decoder layers"):
        upcycle_model(model, 4, 2, layers=[0, 2])
    with pytest.raises(ValueError, match=r"layers=\[1, 1\] lists a layer twice"):
        upcycle_model(model, 4, 2, layers=[1, 1])
    upcycle_model(model, 4, 2, layers=[0])
    with pytest.raises(ValueError, match="model.layers.0.mlp is already upcycled"):
        upcycle_model(model, 4, 2, layers=[0])
    assert moekit.hf.moe_aux_loss(dense("llama")).item() == 0.0  # no MoE: nothing to add
