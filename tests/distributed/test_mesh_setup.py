"""The ("dp", "ep") mesh layout in this process: argument checks, and a one-rank world (no spawn)."""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moekit
from moekit.parallel import (
    MeshLayout,
    ParallelTraining,
    full_optimizer_state_dict,
    full_state_dict,
    layout_of,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    mesh_of,
    parallelize,
)
from moekit.parallel.mesh import check_ep_size, set_layout


def test_ep_size_must_divide_the_world():
    assert check_ep_size(None, 4) == 4  # the default: today's layout, experts over every rank
    assert check_ep_size(2, 4) == 2 and check_ep_size(1, 4) == 1 and check_ep_size(4, 4) == 4
    for bad in (3, 0, -2, 8):
        with pytest.raises(ValueError, match=f"ep_size={bad} must be a positive divisor of the world size 4"):
            check_ep_size(bad, 4)
    for bad in (True, 2.0, "2"):
        with pytest.raises(TypeError, match="ep_size=.* must be an int"):
            check_ep_size(bad, 4)


def test_a_model_that_was_not_parallelized_has_no_layout():
    with pytest.raises(ValueError, match="Linear was not parallelized"):
        layout_of(nn.Linear(2, 2))
    sub_group = nn.Linear(2, 2)
    set_layout(sub_group, MeshLayout(None, 1, 2, False, False))  # today's layout over a sub-group
    with pytest.raises(ValueError, match="sub-group"):
        mesh_of(sub_group)


def test_the_mesh_layout_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        parallelize(moekit.MoE(4, 2), ep_size=1, fsdp=True)
    with pytest.raises(RuntimeError, match="init_distributed"):
        ParallelTraining(ep_size=1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 6)
        self.moe = moekit.MoE(6, 4, k=2, hidden_dim=7, router="topk")
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        o = self.moe(h)
        return self.out(h + o.y), o.aux_loss


def _steps(model, opt, par=None) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        logits, aux = model(x)
        loss = F.cross_entropy(logits, y) + aux
        opt.zero_grad()
        loss.backward()
        if par is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
        else:
            par.clip_and_step(model, opt, 0.1)
        losses.append(loss.item())
    return losses


@pytest.fixture
def one_rank_world(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("fsdp", [True, False])
def test_one_rank_mesh_trains_as_the_plain_model_and_round_trips_its_state(one_rank_world, fsdp):
    plain = Tiny()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.05)
    want = _steps(plain, plain_opt)

    par = ParallelTraining(ep_size=1, fsdp=fsdp)
    model = par.parallelize(Tiny())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    assert layout_of(model) == MeshLayout(mesh_of(model), 1, 1, fsdp, True)
    assert _steps(model, opt, par) == pytest.approx(want, rel=1e-6)
    state, opt_state = par.full_state(model, opt)
    assert state.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)

    again = par.parallelize(Tiny())
    again_opt = torch.optim.Adam(again.parameters(), lr=0.05)
    load_full_state_dict(again, copy.deepcopy(state))
    load_full_optimizer_state_dict(again, again_opt, copy.deepcopy(opt_state))
    for key, value in full_state_dict(again).items():
        assert torch.equal(value, state[key]), key
    reloaded = full_optimizer_state_dict(again, again_opt)
    for index, param_state in opt_state["state"].items():
        for key, value in param_state.items():
            assert torch.equal(reloaded["state"][index][key], value), (index, key)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(again)
