"""The session: what a checkpoint holds, resuming a run exactly, the configuration and data fingerprint it
checks, falling back past an unreadable checkpoint, the numbering."""

import pytest
import torch
from torch import nn

from moekit.train.checkpoint import load_checkpoint, save_checkpoint
from moekit.train.loop import LoopConfig, StepOutput, TrainState, train
from moekit.train.outdir import OutDirError, config_digest, list_checkpoints
from moekit.train.session import Session, describe_differences


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
    previous, latest = list_checkpoints(out)
    # The last two checkpoints are kept, numbered by the steps done.
    assert (previous.name, latest.name) == ("step_00000002.pt", "step_00000004.pt")
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
    # The run's last checkpoint (step 2) is replaced by the one of the finished run (also step 2).
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt"]
    again = Session(tmp_path, fingerprint={"vocab": ["a"]})
    again.restore(list_checkpoints(tmp_path)[-1])
    assert again.pending_run is None and again.steps_done == 2
    assert torch.equal(again.finished["first"]["score"], torch.tensor([1.0, 2.0]))
    model = nn.Linear(1, 1)
    assert again.start("second", model, None) == TrainState()
    _run(again, "second", 2)
    # 2 finished + 2 in progress, and the one before
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000004.pt"]


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


# --- what a checkpoint records of its run, and falling back past an unreadable one ----------------------


def _interrupted(out, config=None, fingerprint="data"):
    """A run of 6 steps killed before step 6: checkpoints after steps 2 and 4."""
    with pytest.raises(KeyboardInterrupt):
        _run(Session(out, fingerprint=fingerprint, config=config), "net", 6, stop_after=5)
    return list_checkpoints(out)


def test_resuming_under_another_configuration_is_refused_naming_what_differs(tmp_path):
    *_, latest = _interrupted(tmp_path, config={"steps": 6, "lr": 0.01})
    ckpt = load_checkpoint(latest)
    assert ckpt["config"] == {"steps": 6, "lr": 0.01}
    assert ckpt["config_sha256"] == config_digest({"lr": 0.01, "steps": 6})  # that of config.json's content
    with pytest.raises(OutDirError, match=r"different configuration \(lr: 0.01 -> 0.02\)"):
        Session(tmp_path, fingerprint="data", config={"steps": 6, "lr": 0.02}).restore(latest)
    # The configuration is compared as config.json holds it: a tuple and a list are the same.
    Session(tmp_path, fingerprint="data", config={"lr": 0.01, "steps": 6}).restore(latest)


def test_resuming_on_changed_data_names_what_changed(tmp_path):
    old = {"vocab": ["a", "b"], "data": {"path": "/d.npz", "size": 10, "sha256": "aaaa"}}
    new = {"vocab": ["a", "b"], "data": {"path": "/d.npz", "size": 10, "sha256": "bbbb"}}
    *_, latest = _interrupted(tmp_path, fingerprint=old)
    with pytest.raises(OutDirError) as e:
        Session(tmp_path, fingerprint=new).restore(latest)
    assert "different data ('/d.npz': data.sha256: 'aaaa' -> 'bbbb')" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "garbage", "foreign", "incomplete"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path, damage, capsys):
    want, want_state = _run(Session(tmp_path / "whole", fingerprint="data"), "net", 6)
    out = tmp_path / "cut"
    previous, latest = _interrupted(out)
    raw = latest.read_bytes()
    if damage == "truncated":
        latest.write_bytes(raw[: len(raw) // 2])
    elif damage == "zero-byte":
        latest.write_bytes(b"")
    elif damage == "garbage":
        latest.write_bytes(b"\x00\x01" * 500)
    elif damage == "foreign":
        save_checkpoint(latest, {"step": 4, "model": {}})
    else:  # a session checkpoint of this format that lacks a part
        ckpt = load_checkpoint(latest)
        del ckpt["fingerprint"]
        save_checkpoint(latest, ckpt)
    session = Session(out, fingerprint="data")
    assert session.restore(latest) == previous
    err = capsys.readouterr().err
    assert f"resuming from the previous checkpoint {previous.name}" in err and str(latest) in err
    assert list_checkpoints(out) == [previous]
    assert (out / "checkpoints" / f"{latest.name}.unreadable").exists()  # moved aside, not deleted
    got, state = _run(session, "net", 6)  # from step 2: the run ends as the uninterrupted one did
    assert state.history == want_state.history
    for a, b in zip(got.parameters(), want.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_readable_checkpoint_is_one_error_naming_each_file(tmp_path):
    previous, latest = _interrupted(tmp_path)
    latest.write_bytes(b"")
    previous.write_bytes(b"garbage")
    with pytest.raises(OutDirError) as e:
        Session(tmp_path, fingerprint="data").restore(latest)
    message = str(e.value)
    assert "no readable checkpoint" in message and "\n" not in message
    assert latest.name in message and "empty" in message and previous.name in message and "--force" in message


def test_a_checkpoint_of_another_format_is_refused_not_passed_over(tmp_path):
    previous, latest = _interrupted(tmp_path)
    ckpt = load_checkpoint(latest)
    save_checkpoint(latest, {**ckpt, "format": 1})
    with pytest.raises(OutDirError, match="format 1, and this moekit reads format 2"):
        Session(tmp_path, fingerprint="data").restore(latest)
    assert list_checkpoints(tmp_path) == [previous, latest]  # nothing moved


def test_differences_of_fingerprints_are_named_briefly():
    assert describe_differences({"vocab": ["a"], "data": {"size": 1}}, {"vocab": ["a"], "data": {"size": 2}}) == \
        "data.size: 1 -> 2"
    assert describe_differences({"vocab": ["a", "b"]}, {"vocab": ["a", "c"]}) == \
        "vocab: 2 entries -> 2 entries, some differ"
    assert describe_differences("x", "y") == "fingerprint: 'x' -> 'y'"
