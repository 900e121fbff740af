"""Weights as safetensors: round trips, atomic writes, metadata, errors, and the export of job checkpoints."""

import pytest
import torch
from torch import nn

import moekit
from moekit.safetensors_io import safetensors_metadata
from moekit.train.checkpoint import save_checkpoint

pytest.importorskip("safetensors")
torch.set_num_threads(1)


class Tied(nn.Module):
    """An MoE between a tied embedding and output layer, and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.moe = moekit.MoE(8, 4, 2, 12, router="topk", activation="swiglu", bias=False, shared_experts=1,
                              router_kwargs=dict(expert_bias=True))
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("steps", torch.tensor([3, 5], dtype=torch.int64))


def test_a_model_round_trips_bit_for_bit(tmp_path):
    model = Tied()
    path = moekit.save_safetensors(model, tmp_path / "m.safetensors", metadata={"note": "tied"})
    state = moekit.load_safetensors(path)
    assert state.keys() == model.state_dict().keys()  # the tied weight under both names
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    fresh = Tied()
    fresh.load_state_dict(state)
    x = torch.randint(0, 11, (3, 4))
    assert torch.equal(fresh.out(fresh.moe(fresh.embed(x)).y), model.out(model.moe(model.embed(x)).y))
    assert safetensors_metadata(path) == {"note": "tied"}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_views_low_precision_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    state = {"t": base.t(), "row": base[1], "also_row": base[1], "half": base.to(torch.bfloat16),
             "empty": torch.empty(0, 3)}
    moekit.save_safetensors(state, tmp_path / "s.safetensors")
    loaded = moekit.load_safetensors(tmp_path / "s.safetensors")
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype, key
    assert base.data_ptr() != loaded["row"].data_ptr()


def test_an_existing_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    moekit.save_safetensors({"a": torch.ones(2)}, path)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        moekit.save_safetensors({"a": torch.zeros(2)}, path)
    assert torch.equal(moekit.load_safetensors(path)["a"], torch.ones(2))
    monkeypatch.undo()
    moekit.save_safetensors({"b": torch.zeros(3)}, path)
    assert list(moekit.load_safetensors(path)) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(TypeError, match="state dict entry 'x' is a int, not a tensor"):
        moekit.save_safetensors({"x": 3}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="metadata must map str to str; not: 'step': 3"):
        moekit.save_safetensors({"x": torch.ones(1)}, tmp_path / "a.safetensors", metadata={"step": 3})
    with pytest.raises(TypeError, match="takes an nn.Module or a state dict, got list"):
        moekit.save_safetensors([torch.ones(1)], tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError, match="no safetensors file at"):
        moekit.load_safetensors(tmp_path / "missing.safetensors")


def test_export_checkpoint_writes_every_run_that_keeps_weights(tmp_path):
    """A session checkpoint as the jobs write it: finished runs keep weights under "weights" (patterns)
    or "model" (ensemble), or none (lm keeps per-token results only); plus the run in progress."""
    a, b, c = Tied(), Tied(), Tied()
    ckpt = {
        "format": 1, "fingerprint": None, "steps_done": 10, "rng": {},
        "finished": {
            "dense": {"weights": a.state_dict(), "state": {"step": 5}},
            "vmoe/e3": {"model": b.state_dict(), "result": {"nll": 0.1}},
            "lm-run": {"result": {"ppl": 3.0}, "raw": {"test_nll": torch.rand(7)}},
        },
        "current": {"name": "upcycled", "state": {"step": 4, "elapsed_s": 1.0, "history": {}},
                    "model": c.state_dict(), "optimizer": {}},
    }
    path = save_checkpoint(tmp_path / "checkpoints" / "step_00000014.pt", ckpt)
    written = moekit.export_checkpoint(path, tmp_path / "export")
    names = sorted(p.name for p in written)
    assert names == ["dense.safetensors", "upcycled.step4.safetensors", "vmoe_e3.safetensors"]
    for file, model in (("dense", a), ("vmoe_e3", b), ("upcycled.step4", c)):
        state = moekit.load_safetensors(tmp_path / "export" / f"{file}.safetensors")
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), (file, key)
    meta = safetensors_metadata(tmp_path / "export" / "upcycled.step4.safetensors")
    assert meta == {"run": "upcycled", "status": "in progress", "step": "4", "checkpoint": "step_00000014.pt"}
    with pytest.raises(ValueError, match="is not a moekit session checkpoint"):
        moekit.export_checkpoint(save_checkpoint(tmp_path / "other.pt", {"model": a.state_dict()}), tmp_path)
