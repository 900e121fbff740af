"""Start-up and misuse of moekit.parallel in one process (no spawn)."""

import socket

import pytest
import torch
import torch.distributed as dist

import moekit
from moekit.parallel import DistInfo, apply_expert_parallel, init_distributed, parallelize
from moekit.shards import LOCAL_SHARDS


def test_expert_parallel_without_a_process_group_says_how_to_start_one():
    with pytest.raises(RuntimeError, match="init_distributed"):
        apply_expert_parallel(moekit.MoE(4, 2))
    with pytest.raises(RuntimeError, match="init_distributed"):
        parallelize(torch.nn.Sequential(moekit.MoE(4, 2)))


def test_init_distributed_names_the_missing_torchrun_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE.*torchrun"):
        init_distributed("cpu")


def test_init_distributed_reads_torchrun_environment_and_uses_gloo_on_cpu(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = init_distributed("cpu", timeout_s=30)
    try:
        assert info == DistInfo(0, 1, 0, torch.device("cpu"))
        assert dist.get_backend() == "gloo"
        with pytest.raises(RuntimeError, match="twice"):
            init_distributed("cpu")
        moe = apply_expert_parallel(moekit.MoE(4, 2, k=1, hidden_dim=3))  # W = 1: every expert stays
        assert moe.experts.w1.shape == (2, 4, 3)
        with pytest.raises(ValueError, match="already expert-parallel"):
            apply_expert_parallel(moe)
    finally:
        dist.destroy_process_group()


def test_every_built_in_router_and_layer_starts_on_the_whole_local_batch():
    layer = moekit.HierarchicalMoE(4, 2, 2)
    assert layer.shards is LOCAL_SHARDS and layer.router.shards is LOCAL_SHARDS
    for name in moekit.routers():
        assert moekit.MoE(4, 4, k=2, router=name).router.shards is LOCAL_SHARDS, name
    x = torch.randn(3, 2)
    gathered, start = LOCAL_SHARDS.gather(x)
    assert LOCAL_SHARDS.sum(x) is x and gathered is x and start == 0 and LOCAL_SHARDS.count == 1
    counts = torch.tensor([2, 0, 1])
    summed = LOCAL_SHARDS.sum_many(x, counts)  # no copy, no cast on one process
    assert summed[0] is x and summed[1] is counts
    assert LOCAL_SHARDS.rows(3, x.device) == (3, 0)
