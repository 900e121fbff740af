"""The small ViT / V-MoE / E^3 model: placement of MoE blocks, tiling point, shapes, errors."""

import pytest
import torch

from moekit.layer import MoE
from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig, moe_block_indices
from moekit.soft_moe import SoftMoE

torch.set_num_threads(1)

VIT = ViTConfig(image_size=(8, 12), patch_size=4, channels=2, num_classes=5, dim=16, depth=6, heads=2, mlp_dim=20)


def test_moe_placement():
    assert moe_block_indices(8, "every_2", 2) == [1, 3, 5, 7]
    assert moe_block_indices(8, "last_n", 2) == [5, 7]
    assert moe_block_indices(4, "last_n", 1) == [3]
    with pytest.raises(ValueError, match="last_n=3 must be in"):
        moe_block_indices(4, "last_n", 3)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("moe", [None, VMoEConfig(k=2, layout="every_2"), VMoEConfig(k=1, ensemble_size=2)])
def test_shapes_and_backward(pool, moe):
    torch.manual_seed(0)
    model = ViTMoE(ViTConfig(**{**VIT.__dict__, "pool": pool}), moe).train()
    images, labels = torch.randn(3, 2, 8, 12), torch.tensor([0, 4, 2])
    loss, out = model.loss(images, labels)
    M = model.ensemble_size
    assert out.logits.shape == (3 * M, 5)
    assert len(out.stats) == len(model.moe_blocks)
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [i in model.moe_blocks for i in range(6)]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    probs = model.eval().predict_probs(images)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_e3_tiles_right_before_the_first_moe_block():
    model = ViTMoE(VIT, VMoEConfig(num_experts=4, ensemble_size=2, layout="last_n", last_n=2))
    assert model.moe_blocks == [3, 5]
    rows = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: rows.__setitem__(i, args[0].shape[0]))
    model(torch.randn(3, 2, 8, 12))
    assert rows == {0: 3, 1: 3, 2: 3, 3: 6, 4: 6, 5: 6}


def test_bad_configs_and_inputs_name_the_value():
    with pytest.raises(ValueError, match="patch_size=5 does not divide image_size=\\(8, 12\\)"):
        ViTConfig(image_size=(8, 12), patch_size=5)
    with pytest.raises(ValueError, match="pool='max'"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match="layout='first'"):
        VMoEConfig(layout="first")
    with pytest.raises(ValueError, match=r"images must have shape \[B, 2, 8, 12\], got \(3, 1, 8, 12\)"):
        ViTMoE(VIT)(torch.randn(3, 1, 8, 12))


def test_device_and_dtype_are_honoured():
    model = ViTMoE(VIT, VMoEConfig(ensemble_size=2), device="meta", dtype=torch.float64)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


# Soft MoE blocks in place of the MoE MLPs.
SOFT_VIT = ViTConfig(image_size=(8, 12), patch_size=4, channels=2, num_classes=5, dim=16, depth=4, heads=2, mlp_dim=20)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_soft_blocks_sit_where_the_layout_says_and_train(pool):
    torch.manual_seed(0)
    cfg = VMoEConfig(num_experts=4, soft=True, slots_per_expert=2, layout="every_2")
    model = ViTMoE(ViTConfig(**{**SOFT_VIT.__dict__, "pool": pool}), cfg).train()
    assert model.moe_blocks == [1, 3]
    assert [isinstance(b.mlp, SoftMoE) for b in model.blocks] == [False, True, False, True]
    assert model.blocks[1].mlp.slots_per_expert == 2 and model.blocks[1].mlp.experts.hidden_dim == 20
    images, labels = torch.randn(3, 2, 8, 12), torch.tensor([0, 4, 2])
    loss, out = model.loss(images, labels)
    assert out.logits.shape == (3, 5) and len(out.stats) == 2 and out.aux_loss.item() == 0
    assert out.stats[0].counts.tolist() == [3 * 2] * 4  # 3 images x 2 slots for every expert
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch.testing.assert_close(model.eval().predict_probs(images).sum(-1), torch.ones(3))


def test_images_do_not_interact():
    torch.manual_seed(0)
    model = ViTMoE(SOFT_VIT, VMoEConfig(num_experts=4, soft=True)).eval()
    images = torch.randn(4, 2, 8, 12)
    whole = model(images).logits
    torch.testing.assert_close(model(images[2:3]).logits[0], whole[2], rtol=1e-5, atol=1e-6)


def test_soft_config_errors_name_the_value():
    with pytest.raises(ValueError, match="soft=True with ensemble_size=2"):
        VMoEConfig(soft=True, ensemble_size=2)
    with pytest.raises(ValueError, match="slots_per_expert=0"):
        VMoEConfig(soft=True, slots_per_expert=0)


def test_meta_device_and_dtype():
    model = ViTMoE(SOFT_VIT, VMoEConfig(soft=True), device="meta", dtype=torch.float64)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}


# Pre-logit features, for the few-shot probes.
@pytest.mark.parametrize("moe", [None, VMoEConfig(num_experts=4, k=1), VMoEConfig(num_experts=4, ensemble_size=2)])
def test_member_outputs_are_the_pre_logits_the_head_reads(moe):
    torch.manual_seed(0)
    model = ViTMoE(VIT, moe).eval()
    images = torch.randn(3, 2, 8, 12)
    probs_BMC, feats_BMD = model.member_outputs(images)
    M = model.ensemble_size
    assert probs_BMC.shape == (3, M, 5) and feats_BMD.shape == (3, M, 16)
    torch.testing.assert_close(probs_BMC, model.member_probs(images))
    # The head applied to member m's features of image b gives row b*M + m of the logits.
    logits = model(images).logits
    torch.testing.assert_close(model.head(feats_BMD).flatten(0, 1), logits)
    # The features are the final LayerNorm's output at the class token (no affine change yet): zero
    # mean and unit variance over D, up to the norm's epsilon.
    torch.testing.assert_close(feats_BMD.mean(-1), torch.zeros(3, M), atol=1e-5, rtol=0)


def test_forward_is_unchanged_by_the_features_split():
    # forward = head(forward_features): the same numbers as computing the pooled state by hand.
    torch.manual_seed(0)
    model = ViTMoE(VIT, VMoEConfig(num_experts=4, ensemble_size=2)).eval()
    images = torch.randn(2, 2, 8, 12)
    pooled, aux, stats = model.forward_features(images)
    out = model(images)
    assert torch.equal(out.logits, model.head(pooled)) and torch.equal(out.aux_loss, aux)
    assert len(stats) == len(out.stats) == 2


# Expert-choice routing as a V-MoE variant.
def test_expert_choice_blocks_route_every_expert_the_same_number_of_tokens():
    torch.manual_seed(0)
    model = ViTMoE(VIT, VMoEConfig(num_experts=4, k=1, router="expert_choice", layout="every_2")).train()
    assert [b.mlp.router.__class__.__name__ for b in model.blocks if b.is_moe] == ["ExpertChoiceRouter"] * 3
    images, labels = torch.randn(3, 2, 8, 12), torch.tensor([0, 4, 2])
    loss, out = model.loss(images, labels)
    # 3 images x 7 tokens (6 patches + class token) = 21 tokens; each of 4 experts takes ceil(1*21/4) = 6.
    assert [s.counts.tolist() for s in out.stats] == [[6, 6, 6, 6]] * 3
    assert all(s.dropped == 0 for s in out.stats)
    assert out.aux_loss.item() == 0  # balanced by construction: no balancing loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_expert_choice_config_errors_name_the_value():
    with pytest.raises(ValueError, match="router='switch' is not one of"):
        VMoEConfig(router="switch")
    with pytest.raises(ValueError, match="router='expert_choice' with soft=False, ensemble_size=2"):
        VMoEConfig(router="expert_choice", ensemble_size=2)
    with pytest.raises(ValueError, match="router='expert_choice' with soft=True"):
        VMoEConfig(router="expert_choice", soft=True)
