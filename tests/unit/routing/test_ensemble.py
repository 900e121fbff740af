"""E^3's partitioned router: block-diagonal gates, members that never meet, one member = V-MoE."""

import pytest
import torch

from moekit.ensemble import PartitionedRouter, init_e3_from_vmoe
from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig
from moekit.routing.vmoe import VMoERouter

VIT = ViTConfig(image_size=(8, 8), patch_size=4, channels=1, num_classes=3, dim=16, depth=4, heads=2, mlp_dim=24)


def small_model(ensemble_size=None, k=1, init_std=None, seed=0):
    torch.manual_seed(seed)
    model = ViTMoE(VIT, VMoEConfig(num_experts=4, k=k, ensemble_size=ensemble_size))
    if init_std is not None:  # spread the routing so that it is not decided by ties
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("w_gate"):
                    p.normal_(0, init_std)
    return model


@pytest.mark.parametrize("k", [1, 2])
def test_router_gates_are_block_diagonal(k):
    # Token t belongs to member t % M and may only reach experts [m*P, (m+1)*P).
    torch.manual_seed(0)
    router = PartitionedRouter(dim=8, num_experts=8, k=k, ensemble_size=2, init_std=1.0).train()
    r = router(torch.randn(40, 8))
    member_T1 = (torch.arange(40) % 2)[:, None]
    assert ((r.indices // 4) == member_T1).all()
    # Both blocks are used, and each member's gates are its own softmax (sum <= 1 over its block).
    assert set(r.indices.flatten().tolist()) & {0, 1, 2, 3} and set(r.indices.flatten().tolist()) & {4, 5, 6, 7}
    assert (r.weights.sum(-1) <= 1 + 1e-6).all()
    assert r.stats.importance.shape == (8,) and r.stats.counts.sum() == 40 * k


def test_no_copy_reaches_another_members_experts_end_to_end():
    # Perturbing member 1's experts (4..7 of 8) in every MoE layer must leave member 0's rows of
    # the logits unchanged and change member 1's: no copy of member 0 passed through them.
    torch.manual_seed(0)
    model = ViTMoE(VIT, VMoEConfig(num_experts=8, k=2, ensemble_size=2)).eval()
    images = torch.randn(6, 1, 8, 8)
    before = model(images).logits.view(6, 2, 3)
    with torch.no_grad():
        for block in model.blocks:
            if block.is_moe:
                block.mlp.experts.w2[4:].add_(torch.randn_like(block.mlp.experts.w2[4:]))
    after = model(images).logits.view(6, 2, 3)
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=0)
    assert (after[:, 1] - before[:, 1]).abs().max() > 1e-3


def test_e_not_divisible_by_m_names_both():
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by ensemble_size=4"):
        PartitionedRouter(dim=4, num_experts=6, k=1, ensemble_size=4)
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by ensemble_size=4"):
        ViTMoE(VIT, VMoEConfig(num_experts=6, ensemble_size=4))
    with pytest.raises(ValueError, match=r"k=3 exceeds the 2 experts of each member"):
        PartitionedRouter(dim=4, num_experts=4, k=3, ensemble_size=2)
    with pytest.raises(ValueError, match=r"7 tokens is not a multiple of ensemble_size=2"):
        PartitionedRouter(dim=4, num_experts=4, k=1, ensemble_size=2)(torch.randn(7, 4))


def test_one_member_router_equals_vmoe_router():
    vmoe = VMoERouter(dim=6, num_experts=4, k=2).train()
    e3 = PartitionedRouter(dim=6, num_experts=4, k=2, ensemble_size=1).train()
    e3.members[0].load_state_dict(vmoe.state_dict())
    x = torch.randn(10, 6)
    torch.manual_seed(3)
    a = vmoe(x)
    torch.manual_seed(3)
    b = e3(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    torch.testing.assert_close(a.stats.load, b.stats.load)


def test_one_member_e3_model_equals_vmoe_model_outputs_and_gradients():
    vmoe = small_model(None, k=2, init_std=0.5).train()
    e3 = init_e3_from_vmoe(small_model(1, k=2, seed=1), vmoe.state_dict()).train()
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(5)
    loss_v, out_v = vmoe.loss(images, labels)
    torch.manual_seed(5)
    loss_e, out_e = e3.loss(images, labels)
    torch.testing.assert_close(out_e.logits, out_v.logits)
    torch.testing.assert_close(loss_e, loss_v)
    loss_v.backward()
    loss_e.backward()
    grads_v = dict(vmoe.named_parameters())
    for name, p in e3.named_parameters():
        source = name.replace("members.0.", "")
        torch.testing.assert_close(p.grad, grads_v[source].grad, msg=name)
