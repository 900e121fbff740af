"""Atomic checkpoint writes, weights-only loading, unreadable files and failed writes, RNG state capture."""

import errno
import io
import os
import pathlib
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import moekit
from moekit.train.checkpoint import (
    CheckpointError,
    WriteError,
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    remove_temporaries,
    restore_rng_state,
    save_checkpoint,
)

torch.set_num_threads(1)


def _state():
    return {
        "step": 7,
        "lr": 0.003,
        "name": "demo",
        "none": None,
        "model": {"w": torch.randn(3, 4), "b": torch.arange(5)},
        "history": {"loss": [3.5, 2.25], "steps": [1, 2]},
        "nested": [{"t": torch.ones(2, dtype=torch.bfloat16)}, (1, "x")],
    }


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", state)
    _assert_same(load_checkpoint(path), state)


def test_save_leaves_only_the_final_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", _state())
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 8})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "ckpt.pt") == {"step": 8}


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails; the type is torch's choice
        save_checkpoint(path, {"step": 2, "bad": lambda: None})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path) == {"step": 1}


def test_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})

    def write_half_then_interrupt(f):
        f.write(b"partial data")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write_half_then_interrupt)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(path) == {"step": 1}


class _Payload:
    """Unpickling this would create a file: the marker of code run by a load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_load_refuses_a_pickled_object_without_running_it(tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, path)  # a plain torch.save of an object
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_refuses_a_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a dict"):
        load_checkpoint(path)


def _draw():
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(),
        [random.random() for _ in range(3)],
    )


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leave a cached Gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = _draw()
    _draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected


def test_rng_state_is_plain_data():
    buf = io.BytesIO()
    torch.save(capture_rng_state(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # raises if anything but plain data got in


# --- unreadable checkpoints and failed writes ---------------------------------------------------------


def _damaged(tmp_path, kind):
    good = save_checkpoint(tmp_path / "good.pt", _state()).read_bytes()
    path = tmp_path / "step_00000004.pt"
    content = {"truncated": good[: len(good) // 2], "zero-byte": b"", "garbage": b"\x00not a checkpoint" * 64,
               "text": b"hello\n", "tail cut": good[:-10]}[kind]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "garbage", "text", "tail cut"])
def test_an_unreadable_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, kind):
    path = _damaged(tmp_path, kind)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_a_failed_write_is_a_write_error_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moekit.train.checkpoint.os.fsync", no_space)
    with pytest.raises(WriteError) as e:
        save_checkpoint(path, {"step": 2})
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left
    assert load_checkpoint(path) == {"step": 1}


def test_writing_under_a_file_is_a_write_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="file/sub/ckpt.pt"):
        save_checkpoint(tmp_path / "file" / "sub" / "ckpt.pt", {"step": 1})


def test_remove_temporaries_removes_only_what_atomic_write_leaves(tmp_path):
    stray = [tmp_path / ".step_00000004.pt.4242.0123abcd.tmp", tmp_path / ".config.json.7.ffffffff.tmp"]
    kept = [tmp_path / "step_00000004.pt", tmp_path / "notes.tmp", tmp_path / ".hidden.tmp",
            tmp_path / ".x.12.0123abcd.tmp.bak"]
    for path in stray + kept:
        path.write_bytes(b"x" * 10)
    assert sorted(remove_temporaries(tmp_path)) == sorted(stray)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_temporaries(tmp_path / "missing") == []


def test_a_write_killed_midway_leaves_a_temporary_that_remove_temporaries_clears(tmp_path):
    # SIGKILL gives atomic_write no chance to clean up: the temporary file survives, named as
    # remove_temporaries expects (the process is killed while writing, the target never appears).
    script = (
        "import os, signal, sys\n"
        "from moekit.train.checkpoint import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'x' * 1000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(moekit.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt.pt")], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".ckpt.pt.") and left.stat().st_size == 1000
    assert remove_temporaries(tmp_path) == [left]
    assert not list(tmp_path.iterdir())


def test_a_write_beyond_what_the_file_system_allows_is_a_write_error(tmp_path):
    # A real write failure, not a simulated one: RLIMIT_FSIZE makes the kernel refuse writes past
    # 20 kB (EFBIG), as a full disk refuses them (ENOSPC). torch.save reports such a failure as a
    # RuntimeError of its own; the error must still name the file and the cause.
    script = (
        "import resource, signal, sys, torch\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "from moekit.train.checkpoint import WriteError, save_checkpoint\n"
        "try:\n"
        "    save_checkpoint(sys.argv[1], {'w': torch.zeros(100000)})\n"
        "except WriteError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(moekit.__file__).parents[1])}
    path = tmp_path / "ckpt.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cannot write {str(path)!r}: {os.strerror(errno.EFBIG)}"
    assert not list(tmp_path.iterdir())  # neither the checkpoint nor a temporary
