"""from_hf / to_hf on single blocks, restoring blocks, and the save_pretrained / from_pretrained round trip."""

import copy

import hf_models as hm
import pytest
import torch

import moekit
from moekit.hf import MoEBlock, from_hf, replace_moe_blocks, restore_moe_blocks, restored, to_hf
from moekit.hf.families import FAMILIES, family_of, qualified_name

torch.set_num_threads(1)


def _blocks(model):
    return [(n, m) for n, m in model.named_modules() if qualified_name(type(m)) in FAMILIES]


@pytest.fixture(scope="module", params=list(hm.FAMILIES))
def block(request):
    """The first sparse block of the family's tiny model."""
    return _blocks(hm.build(request.param))[0][1]


def test_from_hf_returns_what_the_block_returns_and_leaves_it_untouched(block):
    before = {k: v.clone() for k, v in block.state_dict().items()}
    module = from_hf(block)
    x = torch.randn(3, 5, module.moe.dim)
    with torch.no_grad():
        want, got = block(x.clone()), module(x.clone())
    if isinstance(want, tuple):  # GPT-OSS: (y, scores [T, K]); Llama 4: (y [T, D], logits [T, E])
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            hm.assert_close(g, w)
    else:
        assert isinstance(got, torch.Tensor) and got.shape == want.shape == x.shape
        hm.assert_close(got, want)
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_block_built_to_serve_gives_the_same_output_without_statistics(block):
    default, serving = from_hf(block).eval(), from_hf(block, routing_stats=False).eval()
    assert default.moe.routing_stats and not serving.moe.routing_stats
    x = torch.randn(3, 5, default.moe.dim)
    with torch.no_grad():
        want, got = default(x.clone()), serving(x.clone())
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True):
        assert torch.equal(g, w)
    assert default.last_stats is not None and serving.last_stats is None
    serving.train()  # training keeps its statistics and balancing losses
    serving(x.clone())
    assert serving.last_stats is not None
    assert serving.options == default.options  # to_hf still takes it: a serving layer is the same block
    to_hf(serving, copy.deepcopy(block))


def test_routing_stats_must_be_a_bool():
    model = hm.build("mixtral")
    with pytest.raises(TypeError, match="routing_stats must be a bool, got 'no'"):
        from_hf(_blocks(model)[0][1], routing_stats="no")
    with pytest.raises(TypeError, match="routing_stats must be a bool, got 0"):
        replace_moe_blocks(model, routing_stats=0)
    assert not [m for m in model.modules() if isinstance(m, MoEBlock)]  # nothing was replaced


def test_to_hf_inverts_from_hf_exactly(block):
    fresh = copy.deepcopy(block)
    with torch.no_grad():
        for t in fresh.parameters():
            t.zero_()
    to_hf(from_hf(block), fresh)
    for key, value in block.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key  # transposes and slices only: bit for bit


def test_to_hf_materialises_a_meta_block(block):
    module = from_hf(block)
    skeleton = copy.deepcopy(block).to("meta")
    to_hf(module, skeleton)
    for key, value in block.state_dict().items():
        assert torch.equal(skeleton.state_dict()[key], value), key


def test_to_hf_refuses_the_wrong_block():
    mixtral = _blocks(hm.build("mixtral"))[0][1]
    module = from_hf(mixtral)
    with pytest.raises(TypeError, match="to_hf takes a moekit.hf.MoEBlock"):
        to_hf(module.moe, mixtral)
    with pytest.raises(ValueError, match="is a olmoe block; this module computes a mixtral block"):
        to_hf(module, _blocks(hm.build("olmoe"))[0][1])
    other = _blocks(hm.build("mixtral", num_experts_per_tok=1))[0][1]
    with pytest.raises(ValueError, match=r"does not match the module \(k: 1 vs 2\)"):
        to_hf(module, other)


def test_unsupported_blocks_and_settings_are_named():
    with pytest.raises(TypeError, match=r"Linear \(torch.nn.modules.linear.Linear\) is not a supported sparse-MoE "
                                        r"block; moekit.hf converts MixtralSparseMoeBlock, .*SwitchTransformersSparse"):
        from_hf(torch.nn.Linear(3, 3))
    gelu = _blocks(hm.build("mixtral", hidden_act="gelu"))[0][1]
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock.experts: its gate activation is gelu"):
        from_hf(gelu)
    bf16_router = _blocks(hm.build("switch_transformers", router_dtype="bfloat16"))[0][1]
    with pytest.raises(ValueError, match="router_dtype=torch.bfloat16"):
        from_hf(bf16_router)
    dense = hm.transformers.LlamaForCausalLM(hm.transformers.LlamaConfig(**hm.COMMON, intermediate_size=24))
    with pytest.raises(ValueError, match="LlamaForCausalLM holds no sparse-MoE block of a supported class"):
        replace_moe_blocks(dense)


def test_switch_router_bias_and_the_dropout_warning():
    block = _blocks(hm.build("switch_transformers", router_bias=True))[0][1]
    assert block.router.classifier.bias is not None
    module = from_hf(block)
    assert module.moe.router.logit_bias is not None  # the "topk" router, top-1 of the softmax
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        hm.assert_close(module(x), block(x))
    dropping = _blocks(hm.build("switch_transformers", dropout_rate=0.1))[0][1]
    with pytest.warns(UserWarning, match=r"experts apply dropout \(p=0.1\) in training"):
        from_hf(dropping)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_training_mode_input_jitter_is_the_blocks_own(family):
    block = _blocks(hm.build(family, router_jitter_noise=0.3))[0][1].train()
    module = from_hf(block)
    assert module.training and module.jitter_noise == pytest.approx(0.3)
    x = torch.randn(2, 9, 32)
    torch.manual_seed(7)
    want = block(x.clone())
    torch.manual_seed(7)
    got = module(x.clone())
    hm.assert_close(got, want)
    torch.manual_seed(8)
    assert not torch.allclose(module(x.clone()), got)  # another draw, another output
    with torch.no_grad():
        hm.assert_close(module.eval()(x), block.eval()(x))  # no jitter in eval mode


def _count_router_logits(model, family):
    ids, mask, labels = hm.batch(family)
    with torch.no_grad():
        return len(hm.router_logits(hm.run(model, family, ids, mask, labels, output_router_logits=True), family))


def test_restore_gives_back_the_original_model():
    original = hm.build("qwen2_moe")
    model = copy.deepcopy(original)
    names = replace_moe_blocks(model)
    assert restore_moe_blocks(model) == names
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in original.named_modules()]
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="holds no moekit.hf.MoEBlock to restore"):
        restore_moe_blocks(model)
    orphan = copy.deepcopy(original)
    orphan.model.layers[1].mlp = from_hf(orphan.model.layers[1].mlp)
    with pytest.raises(ValueError, match="model.layers.1.mlp: made by from_hf, not replace_moe_blocks"):
        restore_moe_blocks(orphan)


@pytest.mark.parametrize("hooked_first", [False, True])
def test_router_logits_are_collected_whenever_the_models_hooks_were_installed(hooked_first):
    """transformers installs its capturing hooks once, on the modules present then; replacing and
    restoring blocks before or after that must neither lose router logits nor duplicate them."""
    model = hm.build("mixtral")
    if hooked_first:
        assert _count_router_logits(model, "mixtral") == 2
    replace_moe_blocks(model)
    assert _count_router_logits(model, "mixtral") == 2
    restore_moe_blocks(model)
    assert _count_router_logits(model, "mixtral") == 2
    replace_moe_blocks(model)
    assert _count_router_logits(model, "mixtral") == 2


@pytest.mark.parametrize("family", list(hm.FAMILIES))
def test_trained_weights_survive_save_pretrained_and_from_pretrained(family, tmp_path):
    model = hm.build(family)
    replace_moe_blocks(model)
    modules = [m for m in model.modules() if isinstance(m, MoEBlock)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask, labels = hm.batch(family)
    before = modules[0].moe.experts.w1.detach().clone()
    model.train()
    for _ in range(3):
        loss = hm.run(model, family, ids, mask, labels, output_router_logits=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        moekit.update_expert_bias(model, rate=0.05)  # DeepSeek-V3's selection bias moves too
    assert not torch.equal(modules[0].moe.experts.w1, before)
    if family == "deepseek_v3":
        assert modules[0].moe.router.expert_bias.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        want = hm.run(model, family, ids, mask).logits
    with restored(model) as plain:
        assert not [m for m in plain.modules() if isinstance(m, MoEBlock)]
        plain.save_pretrained(tmp_path)
    # The same moekit modules are back (the optimizer's parameters are theirs).
    assert [m for m in model.modules() if isinstance(m, MoEBlock)] == modules
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hm.assert_close(hm.run(loaded, family, ids, mask).logits, want)
    # ... and training continues with the same optimizer.
    model.train()
    loss = hm.run(model, family, ids, mask, labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_changes_made_inside_restored_are_carried_back():
    model = hm.build("mixtral")
    replace_moe_blocks(model)
    with restored(model):
        block = model.model.layers[0].mlp
        with torch.no_grad():
            block.experts.down_proj.mul_(2.0)
        want = block.experts.down_proj.detach().clone()
    moe = model.model.layers[0].mlp.moe
    assert torch.equal(moe.experts.w2, want.transpose(1, 2))


def test_deepseek_expert_bias_is_used_for_selection_only():
    block = _blocks(hm.build("deepseek_v3"))[0][1]
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    module = from_hf(block)
    assert torch.equal(module.moe.router.expert_bias, block.gate.e_score_correction_bias)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        hm.assert_close(module(x), block(x))


def test_family_lookup_is_by_exact_class():
    block = _blocks(hm.build("mixtral"))[0][1]

    class Derived(type(block)):
        pass

    derived = Derived.__new__(Derived)
    torch.nn.Module.__init__(derived)
    with pytest.raises(TypeError, match="Derived"):
        family_of(derived)


def test_router_logits_are_computed_only_when_something_reads_them(monkeypatch):
    """A Mixtral block returns its output alone: its router logits are computed for transformers'
    collector (``output_router_logits``) or for a hook on the tap, and are skipped otherwise."""
    model = hm.build("mixtral").eval()
    replace_moe_blocks(model)
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    calls = []
    real = MoEBlock.router_logits
    monkeypatch.setattr(MoEBlock, "router_logits", lambda self, x: calls.append(1) or real(self, x))
    ids, mask, labels = hm.batch("mixtral")
    with torch.no_grad():
        plain = hm.run(model, "mixtral", ids, mask, labels).logits
        assert calls == []
        collected = hm.run(model, "mixtral", ids, mask, labels, output_router_logits=True)
        assert len(calls) == 2 and len(hm.router_logits(collected, "mixtral")) == 2
        assert torch.equal(collected.logits, plain)  # the same forward either way
        seen = []
        handle = block.router_logits_tap.register_forward_hook(lambda m, a, out: seen.append(out.shape))
        hm.run(model, "mixtral", ids, mask, labels)
        handle.remove()
    assert len(calls) == 3 and seen == [(ids.numel(), 4)]
