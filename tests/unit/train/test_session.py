"""The session: what a checkpoint holds, resuming a run exactly, the data fingerprint, the numbering."""

import pytest
import torch
from torch import nn

from moekit.train.checkpoint import save_checkpoint
from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.outdir import OutDirError, list_checkpoints
from moekit.train.session import Session


def _run(session, name, steps, stop_after=None, seed=0):
    """Build, (restore), train ``name`` with dropout (so the RNG state matters) and return the model."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = session.start(name, model, opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)

    def step(i):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt  # killed before this step: the last checkpoint survives
        loss = (model(x) - y).pow(2).mean()
        return StepOutput(loss, {"loss": loss.item()})

    train(model, opt, state, LoopConfig(steps, checkpoint_every=2), step,
          lambda s: session.save(name, s, model, opt), desc=name, quiet=True)
    return model, state


def test_a_killed_run_resumes_from_its_last_checkpoint_exactly(tmp_path):
    want, want_state = _run(Session(tmp_path / "a", fingerprint="data"), "net", 6)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        _run(Session(out, fingerprint="data"), "net", 6, stop_after=5)
    (latest,) = list_checkpoints(out)
    assert latest.name == "step_00000004.pt"  # one checkpoint kept, numbered by the steps done
    session = Session(out, fingerprint="data")
    session.restore(latest)
    assert session.pending_run == "net"
    got, state = _run(session, "net", 6)
    assert state.history == want_state.history
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b)


def test_finished_runs_are_kept_and_the_next_run_starts_fresh(tmp_path):
    session = Session(tmp_path, fingerprint={"vocab": ["a"]})
    _, state = _run(session, "first", 2)
    session.finish("first", state, {"score": torch.tensor([1.0, 2.0])})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt"]
    again = Session(tmp_path, fingerprint={"vocab": ["a"]})
    again.restore(list_checkpoints(tmp_path)[0])
    assert again.pending_run is None and again.steps_done == 2
    assert torch.equal(again.finished["first"]["score"], torch.tensor([1.0, 2.0]))
    model = nn.Linear(1, 1)
    assert again.start("second", model, None) == TrainState()
    _run(again, "second", 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004.pt"]  # 2 finished + 2 in progress


def test_resuming_on_other_data_or_a_foreign_file_is_refused(tmp_path):
    session = Session(tmp_path, fingerprint={"vocab": ["a", "b"]})
    session.save()
    (path,) = list_checkpoints(tmp_path)
    with pytest.raises(OutDirError, match="different data"):
        Session(tmp_path, fingerprint={"vocab": ["a", "c"]}).restore(path)
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(foreign, {"step": 3, "model": {}})
    with pytest.raises(OutDirError, match="not a moekit session checkpoint"):
        Session(tmp_path).restore(foreign)
