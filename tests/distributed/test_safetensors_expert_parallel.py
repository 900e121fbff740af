"""An expert-parallel model saved as safetensors is the single-process model's file (2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moekit
from moekit.parallel import load_full_state_dict, parallelize, spawn_local

pytest.importorskip("safetensors")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), moekit.MoE(6, 4, 2, 5, router="topk", activation="swiglu", bias=False,
                                                     shared_experts=1))


def _save_and_load(rank: int, world_size: int, path: str) -> dict:
    model = parallelize(_model())
    moekit.save_safetensors(model, path, metadata={"rank": str(rank)})  # every rank takes part; rank 0 writes
    torch.distributed.barrier()
    fresh = parallelize(_model())
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_full_state_dict(fresh, moekit.load_safetensors(path))
    return {"local_w1": fresh[1].experts.w1.detach().clone(), "equal": all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))}


def test_expert_parallel_model_saves_its_full_state_dict(tmp_path):
    path = tmp_path / "ep.safetensors"
    results = spawn_local(_save_and_load, 2, (str(path),))
    want = _model().state_dict()
    saved = moekit.load_safetensors(path)
    assert saved.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(saved[key], value), key  # experts gathered to [E, ...] from both ranks
    assert moekit.safetensors_io.safetensors_metadata(path) == {"rank": "0"}
    for rank, result in enumerate(results):
        assert result["equal"]
        assert torch.equal(result["local_w1"], want["1.experts.w1"][2 * rank:2 * rank + 2])
