"""The out directory: created and locked, stray temporaries removed, unusable directories named."""

import errno
import json
import os

import pytest

from moekit.train.lock import LOCK_FILE, is_locked_here, release_lock
from moekit.train.outdir import (
    OutDirError,
    checkpoint_path,
    config_digest,
    latest_checkpoint,
    prepare_out_dir,
    prune_checkpoints,
)


@pytest.fixture(autouse=True)
def _release(tmp_path):
    yield
    release_lock(tmp_path / "out")


def test_a_new_directory_is_created_locked_and_given_its_config(tmp_path):
    out = tmp_path / "out"
    assert prepare_out_dir(out, {"steps": 3, "models": ("a", "b")}, resume=False, force=False) is None
    assert json.loads((out / "config.json").read_text()) == {"steps": 3, "models": ["a", "b"]}
    assert is_locked_here(out) and (out / LOCK_FILE).exists()


def test_stray_temporaries_of_killed_writes_are_removed_on_start(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"steps": 3}))
    stray = [out / ".metrics.json.99.0123abcd.tmp", out / "checkpoints" / ".step_00000002.pt.99.89abcdef.tmp"]
    for path in stray:
        path.write_bytes(b"\0" * 1000)
    (out / "checkpoints" / "step_00000002.pt").write_bytes(b"kept")
    (out / "notes.tmp").write_text("not ours")
    assert prepare_out_dir(out, {"steps": 3}, resume=True, force=False) == out / "checkpoints" / "step_00000002.pt"
    assert not any(path.exists() for path in stray)
    assert (out / "notes.tmp").exists() and (out / "checkpoints" / "step_00000002.pt").exists()


def test_a_refused_directory_is_left_unlocked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(OutDirError, match="steps: 3 -> 4"):
        prepare_out_dir(out, {"steps": 4}, resume=False, force=False)
    assert not is_locked_here(out) and not (out / LOCK_FILE).exists()


def test_the_lock_file_does_not_make_a_directory_look_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("{}")  # left by a killed run that had written nothing else
    assert prepare_out_dir(out, {"steps": 3}, resume=False, force=False) is None


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_that_cannot_be_a_directory_is_named(tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if where == "a file" else tmp_path / "file" / "out"
    with pytest.raises(OutDirError) as e:
        prepare_out_dir(out, {}, resume=False, force=False)
    assert str(out) in str(e.value)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_directory_that_cannot_be_written_is_named_before_anything_else(tmp_path, monkeypatch, code):
    out = tmp_path / "out"
    out.mkdir()

    def refuse(path, flags, mode=0o777):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr("moekit.train.lock.os.open", refuse)  # the first file written is the lock file
    with pytest.raises(OutDirError) as e:
        prepare_out_dir(out, {}, resume=False, force=False)
    assert str(out) in str(e.value) and os.strerror(code) in str(e.value)


def test_prune_keeps_the_newest_checkpoints_by_step(tmp_path):
    for step in (9, 10, 100, 2):
        checkpoint_path(tmp_path, step).parent.mkdir(exist_ok=True)
        checkpoint_path(tmp_path, step).write_bytes(b"x")
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000100.pt"]
    assert latest_checkpoint(tmp_path).name == "step_00000100.pt"


def test_config_digest_is_that_of_the_config_as_written():
    assert config_digest({"b": (1, 2), "a": 1}) == config_digest({"a": 1, "b": [1, 2]})
    assert config_digest({"a": 1}) != config_digest({"a": 2})
