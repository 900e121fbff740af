"""Whole transformers models with their MoE blocks replaced by moekit's compute what they computed.

For every family (hf_models.FAMILIES): every sparse block is replaced and the dense layers are
left alone; logits, greedy generation, router logits and the model's own balancing losses are
those of the original model; the labels loss backpropagates into moekit's parameters with the
gradients the original model gives its block (mapped into moekit's layout); float64 too.
"""

import copy

import hf_models as hm
import pytest
import torch

import moekit
from moekit.hf import MoEBlock
from moekit.hf.families import FAMILIES, family_of, qualified_name

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=list(hm.FAMILIES))
def pair(request):
    """(family, original model, the same model with its blocks replaced, the replaced names)."""
    family = request.param
    original = hm.build(family)
    replaced = copy.deepcopy(original)
    names = moekit.hf.replace_moe_blocks(replaced)
    return family, original, replaced, names


def test_every_sparse_block_is_replaced_and_dense_layers_are_left_alone(pair):
    family, original, replaced, names = pair
    sparse = [n for n, m in original.named_modules() if qualified_name(type(m)) in FAMILIES]
    assert names == sparse and names
    assert not [n for n, m in replaced.named_modules() if qualified_name(type(m)) in FAMILIES]
    for name in names:
        assert isinstance(replaced.get_submodule(name), MoEBlock)
    # Every other module of the original is still there, of the same class.
    kept = {n: type(m) for n, m in original.named_modules() if not any(n.startswith(b) for b in names)}
    now = {n: type(m) for n, m in replaced.named_modules() if not any(n.startswith(b) for b in names)}
    assert kept == now
    dense = {"qwen2_moe": "model.layers.0.mlp", "deepseek_v3": "model.layers.0.mlp",
             "llama4": "model.layers.0.feed_forward", "switch_transformers": "encoder.block.0.layer.1.mlp"}
    if family in dense:  # a dense layer of the family, untouched
        assert dense[family] not in names
        assert type(replaced.get_submodule(dense[family])) is type(original.get_submodule(dense[family]))


def test_logits_loss_router_logits_and_aux_loss_equal_the_original(pair):
    family, original, replaced, names = pair
    ids, mask, labels = hm.batch(family)
    with torch.no_grad():
        want = hm.run(original, family, ids, mask, labels, output_router_logits=True)
        got = hm.run(replaced, family, ids, mask, labels, output_router_logits=True)
    hm.assert_close(got.logits, want.logits)
    hm.assert_close(got.loss, want.loss)
    want_logits, got_logits = hm.router_logits(want, family), hm.router_logits(got, family)
    assert len(got_logits) == len(want_logits) == len(names)
    for g, w in zip(got_logits, want_logits, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        hm.assert_close(g, w)
    for name, w in hm.aux_losses(want, family).items():
        g = hm.aux_losses(got, family)[name]
        if w is None:
            assert g is None, name
        else:
            assert float(w) > 0
            hm.assert_close(torch.as_tensor(g), torch.as_tensor(w))


def test_without_router_logits_too(pair):
    family, original, replaced, _ = pair
    ids, mask, _ = hm.batch(family, seed=1)
    with torch.no_grad():
        hm.assert_close(hm.run(replaced, family, ids, mask).logits, hm.run(original, family, ids, mask).logits)


def test_greedy_generation_gives_the_same_tokens(pair):
    family, original, replaced, _ = pair
    ids, mask, _ = hm.batch(family, seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    want = original.generate(ids, **kw)
    got = replaced.generate(ids, **kw)
    assert want.shape[1] > ids.shape[1] or hm.is_seq2seq(family)
    assert torch.equal(got, want)
    assert all(m.last_stats is not None for m in replaced.modules() if isinstance(m, MoEBlock))
    # Built to serve, without routing statistics: the same tokens, and no statistics kept.
    serving = copy.deepcopy(original)
    moekit.hf.replace_moe_blocks(serving, routing_stats=False)
    blocks = [m for m in serving.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(not block.moe.routing_stats for block in blocks)
    assert torch.equal(serving.generate(ids, **kw), want)
    assert all(block.last_stats is None for block in blocks)


def _grads_in_moekit_layout(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The block's parameter gradients, keyed and laid out as moekit's weights (via the family's mapping)."""
    shadow = copy.deepcopy(block)
    with torch.no_grad():
        for p_shadow, p in zip(shadow.parameters(), block.parameters(), strict=True):
            p_shadow.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return family_of(block).to_moekit(shadow)


def test_labels_loss_backpropagates_the_original_gradients_into_moekit(pair):
    family, original, replaced, names = pair
    ids, mask, labels = hm.batch(family, seed=3)
    for model in (original, replaced):
        model.zero_grad(set_to_none=True)
        hm.run(model, family, ids, mask, labels, output_router_logits=True).loss.backward()
    for name in names:
        want = _grads_in_moekit_layout(original.get_submodule(name))
        moe = replaced.get_submodule(name).moe
        params = dict(moe.named_parameters())
        assert set(params) <= set(want)  # the expert_bias buffer is the only non-parameter
        for key, p in params.items():
            assert p.grad is not None, f"{name}: {key} got no gradient"
            hm.assert_close(p.grad, want[key], rel=2e-5)
        assert moe.router.w_gate.grad.abs().sum() > 0 and moe.experts.w1.grad.abs().sum() > 0
    # The layers around the blocks get the same gradients too.
    around = dict(replaced.named_parameters())
    compared = 0
    for n, p in original.named_parameters():
        if p.grad is not None and not any(n.startswith(b + ".") for b in names):
            hm.assert_close(around[n].grad, p.grad, rel=2e-5)
            compared += 1
    assert compared > 5


def test_each_replacement_keeps_the_stats_of_its_last_forward(pair):
    family, _, replaced, names = pair
    ids, mask, _ = hm.batch(family, seed=4)
    with torch.no_grad():
        hm.run(replaced, family, ids, mask)
    for name in names:
        module = replaced.get_submodule(name)
        stats = module.last_stats
        k = module.moe.k
        # Every token of the block's input (2 x 9, the decoder's too) routes k slots (transformers
        # routes padding too); the capacity of SwitchTransformers drops some of them.
        assert int(stats.counts.sum()) + stats.dropped == ids.numel() * k
        assert stats.importance.shape == (module.moe.num_experts,) and not stats.importance.requires_grad
        assert float(module.last_aux_loss) == 0.0  # the model computes its own balancing loss
    if family == "switch_transformers":
        assert replaced.get_submodule(names[0]).last_stats.dropped > 0  # 9 tokens, capacity 3 per expert


def test_float64(pair):
    family, original, replaced, _ = pair
    original64, replaced64 = copy.deepcopy(original).double(), copy.deepcopy(replaced).double()
    original64.set_experts_implementation("eager")  # transformers' grouped_mm takes no float64 on CPU
    ids, mask, labels = hm.batch(family, seed=5)
    with torch.no_grad():
        want = hm.run(original64, family, ids, mask, labels, output_router_logits=True)
        got = hm.run(replaced64, family, ids, mask, labels, output_router_logits=True)
    assert got.logits.dtype == torch.float64
    # moekit's routers compute in float32 whatever the layer's dtype, as transformers' do for most
    # of these families (Mixtral, Qwen, OLMoE and Llama 4 take their softmax or sigmoid in
    # float32, DeepSeek-V3's and SwitchTransformers' routers run in float32): the combine weights
    # agree to float32 rounding, and so do the outputs. The expert computation itself agrees to
    # float64 rounding (test_experts_backend.py compares it under the model's own routing).
    hm.assert_close(got.logits, want.logits, rel=1e-6)
    for g, w in zip(hm.router_logits(got, family), hm.router_logits(want, family), strict=True):
        hm.assert_close(g.double(), w.double(), rel=1e-6)


def test_bfloat16(pair):
    """In bfloat16 the replacement runs in the model's dtype and agrees to bfloat16 rounding."""
    family, original, replaced, _ = pair
    original16, replaced16 = copy.deepcopy(original).bfloat16(), copy.deepcopy(replaced).bfloat16()
    ids, mask, labels = hm.batch(family, seed=6)
    with torch.no_grad():
        want = hm.run(original16, family, ids, mask, labels)
        got = hm.run(replaced16, family, ids, mask, labels)
    assert got.logits.dtype == torch.bfloat16
    assert abs(got.loss.item() - want.loss.item()) < 0.01 * want.loss.item()
