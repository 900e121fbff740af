"""Initialise an E^3 model from a trained V-MoE checkpoint.

Legend: D model dim, E experts, M ensemble members, P = E/M experts per member.

Every parameter is copied as is, except each MoE router: the V-MoE's ``w_gate`` [D, E] is reshaped
to [D, M, P] and member m gets the slice [D, P] of its expert block. Before fine-tuning, member m
routes each token to the top K of the V-MoE's logits *within its block*, with the V-MoE's softmax
renormalised over that block.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_MEMBER_KEY = re.compile(r"^(?P<prefix>.*)\.members\.(?P<member>\d+)\.w_gate$")


def split_router_weight(w_gate_DE: torch.Tensor, ensemble_size: int) -> list[torch.Tensor]:
    """[D, E] -> M tensors [D, P]: the reshape D x E -> D x M x P, one slice per member."""
    dim, num_experts = w_gate_DE.shape
    if num_experts % ensemble_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ensemble_size={ensemble_size}")
    return list(w_gate_DE.reshape(dim, ensemble_size, num_experts // ensemble_size).unbind(1))


def e3_state_from_vmoe(vmoe_state: dict[str, torch.Tensor], e3_keys: list[str]) -> dict[str, torch.Tensor]:
    """Map a V-MoE state dict onto the parameter names ``e3_keys`` of an E^3 model.

    A key ``<prefix>.members.<m>.w_gate`` takes member m's slice of ``<prefix>.w_gate``; any other
    key must exist in the V-MoE state under the same name. ``ValueError`` names what is missing.
    """
    members: dict[str, int] = {}
    for key in e3_keys:
        if match := _MEMBER_KEY.match(key):
            members[match["prefix"]] = max(members.get(match["prefix"], 0), int(match["member"]) + 1)
    out: dict[str, torch.Tensor] = {}
    for key in e3_keys:
        match = _MEMBER_KEY.match(key)
        source = f"{match['prefix']}.w_gate" if match else key
        if source not in vmoe_state:
            raise ValueError(f"the V-MoE checkpoint has no {source!r} (needed for {key!r})")
        if match:
            out[key] = split_router_weight(vmoe_state[source], members[match["prefix"]])[int(match["member"])]
        else:
            out[key] = vmoe_state[source]
    return out


def init_e3_from_vmoe(e3_model: nn.Module, vmoe_state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a V-MoE state dict into an E^3 model of the same architecture (routers reshaped); returns it."""
    target = e3_model.state_dict()
    state = e3_state_from_vmoe(vmoe_state, list(target))
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise ValueError(f"{key!r}: the V-MoE gives shape {tuple(value.shape)}, "
                             f"the E^3 model expects {tuple(target[key].shape)}")
    e3_model.load_state_dict(state, strict=True)
    return e3_model
