"""The ViT with Soft MoE MLP blocks (``VMoEConfig(soft=True)``)."""

import pytest
import torch

from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig
from moekit.soft_moe import SoftMoE

VIT = ViTConfig(image_size=(8, 12), patch_size=4, channels=2, num_classes=5, dim=16, depth=4, heads=2, mlp_dim=20)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_soft_blocks_sit_where_the_layout_says_and_train(pool):
    torch.manual_seed(0)
    cfg = VMoEConfig(num_experts=4, soft=True, slots_per_expert=2, layout="every_2")
    model = ViTMoE(ViTConfig(**{**VIT.__dict__, "pool": pool}), cfg).train()
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
    model = ViTMoE(VIT, VMoEConfig(num_experts=4, soft=True)).eval()
    images = torch.randn(4, 2, 8, 12)
    whole = model(images).logits
    torch.testing.assert_close(model(images[2:3]).logits[0], whole[2], rtol=1e-5, atol=1e-6)


def test_soft_config_errors_name_the_value():
    with pytest.raises(ValueError, match="soft=True with ensemble_size=2"):
        VMoEConfig(soft=True, ensemble_size=2)
    with pytest.raises(ValueError, match="slots_per_expert=0"):
        VMoEConfig(soft=True, slots_per_expert=0)


def test_meta_device_and_dtype():
    model = ViTMoE(VIT, VMoEConfig(soft=True), device="meta", dtype=torch.float64)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}
