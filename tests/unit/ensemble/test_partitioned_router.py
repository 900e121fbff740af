"""E^3 routing: block-diagonal gates, 1 member = V-MoE, initialisation from a V-MoE."""

import pytest
import torch

from moekit.ensemble import PartitionedRouter, init_e3_from_vmoe, split_router_weight
from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig
from moekit.routing.vmoe import VMoERouter

torch.set_num_threads(1)

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


def _first_moe_routing(model, images):
    """(router input x_TD, Routing) of the first MoE layer's router."""
    first = model.blocks[model.moe_blocks[0]].mlp.router
    seen = {}
    handle = first.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], routing=out))
    model(images)
    handle.remove()
    return seen["x"], seen["routing"]


@pytest.mark.parametrize("k", [1, 2])
def test_e3_from_vmoe_reproduces_its_routing_within_each_block(k):
    # Member m's router is the V-MoE router restricted to block m: it picks the top k of the
    # V-MoE's logits among experts [m*P, (m+1)*P), with the V-MoE's softmax renormalised over the block.
    M, P = 2, 2
    vmoe = small_model(None, k=k, init_std=1.0).eval()
    e3 = init_e3_from_vmoe(small_model(M, k=k, seed=1), vmoe.state_dict()).eval()
    images = torch.randn(5, 1, 8, 8)
    x_v, r_v = _first_moe_routing(vmoe, images)
    x_e, r_e = _first_moe_routing(e3, images)
    # The blocks before the first MoE are copied, so each member sees the V-MoE's tokens.
    torch.testing.assert_close(x_e.view(-1, M, x_v.shape[-1]), x_v[:, None].expand(-1, M, -1))
    probs_TE = torch.softmax(x_v @ vmoe.blocks[vmoe.moe_blocks[0]].mlp.router.w_gate, dim=-1)
    agree = 0
    for m in range(M):
        block_TP = probs_TE[:, m * P:(m + 1) * P]
        want_w, want_i = (block_TP / block_TP.sum(-1, keepdim=True)).topk(k, dim=-1)
        torch.testing.assert_close(r_e.weights.view(-1, M, k)[:, m], want_w)
        assert torch.equal(r_e.indices.view(-1, M, k)[:, m], want_i + m * P)
        # Where the V-MoE's own top k lies in block m, member m's choice is the V-MoE's, exactly.
        inside = ((r_v.indices // P) == m).all(-1)
        assert torch.equal(r_e.indices.view(-1, M, k)[:, m][inside], r_v.indices[inside])
        agree += int(inside.sum())
    assert agree > 0


def test_split_router_weight_is_the_reshape():
    w = torch.arange(12.0).view(2, 6)
    parts = split_router_weight(w, 3)
    assert [p.tolist() for p in parts] == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]]
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by ensemble_size=4"):
        split_router_weight(w, 4)


def test_init_from_a_mismatched_checkpoint_names_the_key():
    e3 = small_model(2)
    state = small_model(None).state_dict()
    del state["head.weight"]
    with pytest.raises(ValueError, match="head.weight"):
        init_e3_from_vmoe(e3, state)
