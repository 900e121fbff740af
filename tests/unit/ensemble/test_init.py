"""Initialising an E^3 from a trained V-MoE: the router reshape reproduces its routing."""

import pytest
import torch

from moekit.ensemble import init_e3_from_vmoe, split_router_weight
from moekit.models.vit_moe import ViTConfig, ViTMoE, VMoEConfig

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
