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
