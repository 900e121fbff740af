"""The jobs under hostile conditions: a second process on a running job's ``--out``, a killed run's
stale lock and temporaries, data changed between an interrupt and ``--resume``, unreadable
checkpoints, a checkpoint of another configuration, and every router a job offers.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from moekit.cli import main
from moekit.jobs.demo.config import LM_ROUTERS, NOT_FOR_LM
from moekit.train.lock import LOCK_FILE

torch.set_num_threads(1)

SRC = str(Path(moekit.__file__).parents[1])
TINY = ["--batch-size", "4", "--seq-len", "8", "--dim", "16", "--hidden-dim", "32", "--num-experts", "4", "--k", "2",
        "--vocab-size", "120", "--eval-every", "2", "--eval-tokens", "64", "--lr", "0.02", "--checkpoint-every", "2",
        "--device", "cpu", "--quiet"]
TIMING = ("time", "environment", "elapsed")


def _demo(out, data, *extra, steps=6):
    return main(["demo", "--out", str(out), "--data", str(data), "--steps", str(steps), *TINY, *extra])


def _results(out):
    """metrics.json of a run without its timings (the same command gives the same results)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if not any(t in k for t in TIMING)}
        return [strip(v) for v in o] if isinstance(o, list) else o
    return strip(json.loads((out / "metrics.json").read_text()))


@pytest.fixture(scope="module", autouse=True)
def _no_figures():
    """Figures are not under test here, and drawing them is most of a tiny run's time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("moekit.train.plots.save_figure", lambda fig, path, dpi=120: Path(path).write_bytes(b"") or path)
        yield


@pytest.fixture(scope="module")
def whole(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "whole"
    assert _demo(out, text_file) == 0
    return out


def _start_demo(out, data, steps):
    """``moekit demo`` in its own process (one thread, so its results equal this process's)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moekit", "demo", "--out", str(out), "--data", str(data), "--steps", str(steps), *TINY]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _lock_holder(out):
    try:
        return json.loads((out / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_second_process_cannot_take_a_running_jobs_out_even_with_force(tmp_path, text_file, capsys):
    out = tmp_path / "busy"
    first = _start_demo(out, text_file, steps=6)
    try:
        _wait_for(lambda: _lock_holder(out) == first.pid, first, "the first run locked --out")
        first.send_signal(signal.SIGSTOP)  # hold it mid-run, its lock held, so the race is certain
        assert not (out / "metrics.json").exists()
        assert _demo(out, text_file, "--force", "--lr", "0.05", steps=8) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and "in use by another run" in err[0]
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    # The directory is the first run's, whole: its configuration, its results, its checkpoints.
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 6 and config["lr"] == 0.02
    assert _results(out)["steps"] == 6
    assert not (out / LOCK_FILE).exists()  # released at exit
    assert _demo(out, text_file, "--force", "--lr", "0.05", steps=2) == 0  # and free again


def test_a_killed_run_leaves_a_lock_and_temporaries_that_a_resume_clears(tmp_path, text_file, whole, capsys):
    out = tmp_path / "killed"
    first = _start_demo(out, text_file, steps=6)
    # Killed as soon as its first checkpoint exists, by SIGKILL: no handler runs, nothing is released.
    _wait_for(lambda: (out / "checkpoints" / "step_00000002.pt").exists(), first, "the first checkpoint")
    first.kill()
    first.wait(timeout=60)
    assert _lock_holder(out) == first.pid
    # What a kill during a checkpoint write leaves: a full-size temporary file.
    stray = out / "checkpoints" / f".step_00000004.pt.{first.pid}.0123abcd.tmp"
    stray.write_bytes((out / "checkpoints" / "step_00000002.pt").read_bytes())
    assert _demo(out, text_file, "--resume") == 0
    err = capsys.readouterr().err
    assert f"pid {first.pid}" in err and "taking it over" in err
    assert not stray.exists() and not list(out.rglob("*.tmp")) and not (out / LOCK_FILE).exists()
    assert _results(out) == _results(whole)  # resumed exactly where the kill left it


def _interrupted_demo(out, data, monkeypatch, stop_during_step, step=5):
    stop_during_step(step)
    assert _demo(out, data) == 130
    monkeypatch.undo()


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(
        tmp_path, text_file, whole, monkeypatch, stop_during_step, capsys, damage):
    out = tmp_path / "cut"
    _interrupted_demo(out, text_file, monkeypatch, stop_during_step)  # checkpoints after steps 4 and 5
    newest = out / "checkpoints" / "step_00000005.pt"
    newest.write_bytes(b"" if damage == "zero-byte" else newest.read_bytes()[:1000])
    capsys.readouterr()
    assert _demo(out, text_file, "--resume") == 0
    err = capsys.readouterr().err
    assert "step_00000005.pt" in err and "resuming from the previous checkpoint step_00000004.pt" in err
    assert _results(out) == _results(whole)


def test_no_readable_checkpoint_is_one_line_and_exit_2(tmp_path, text_file, monkeypatch, stop_during_step, capsys):
    out = tmp_path / "cut"
    _interrupted_demo(out, text_file, monkeypatch, stop_during_step)
    for path in (out / "checkpoints").iterdir():
        path.write_bytes(b"\x00garbage")
    capsys.readouterr()
    assert _demo(out, text_file, "--resume") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "no readable checkpoint" in line and "step_00000004.pt" in line and "step_00000005.pt" in line


def test_a_text_file_changed_before_resume_is_refused(tmp_path, text_file, monkeypatch, stop_during_step, capsys):
    data = tmp_path / "text.txt"
    shutil.copy(text_file, data)
    out = tmp_path / "cut"
    _interrupted_demo(out, data, monkeypatch, stop_during_step)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same words, same vocabulary
    capsys.readouterr()
    assert _demo(out, data, "--resume") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "different data" in line and str(data.resolve()) in line and "sha256" in line


def test_an_npz_changed_in_place_before_resume_is_refused(tmp_path, tiny_npz, monkeypatch, stop_during_step, capsys):
    data = tmp_path / "images.npz"
    arrays = dict(np.load(tiny_npz))
    np.savez(data, **arrays)
    args = ["ensemble", "--data", str(data), "--models", "vmoe", "--steps", "4", "--checkpoint-every", "2",
            "--out", str(tmp_path / "cut"), "--quiet", "--device", "cpu"]
    stop_during_step(3)
    assert main(args) == 130
    monkeypatch.undo()
    arrays["x_train"][0, 0, 0] += 1  # one pixel
    np.savez(data, **arrays)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "different data" in line and str(data) in line and "data.sha256" in line


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, text_file, monkeypatch, stop_during_step,
                                                          capsys):
    # What two unlocked runs on one --out used to leave: this config.json, another run's checkpoints.
    other = tmp_path / "other"
    _interrupted_demo(other, text_file, monkeypatch, stop_during_step)
    out = tmp_path / "mine"
    _interrupted_demo(out, text_file, monkeypatch, stop_during_step)
    config = json.loads((out / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "lr": 0.05}))
    capsys.readouterr()
    assert main(["demo", "--out", str(other), "--data", str(text_file), "--steps", "6", *TINY, "--lr", "0.05",
                 "--resume"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "was made by a different configuration (lr: 0.02 -> 0.05)" in line


def test_every_registered_router_is_offered_to_the_demo_or_excluded_with_a_reason():
    assert set(LM_ROUTERS) | set(NOT_FOR_LM) == set(moekit.routers())
    assert not set(LM_ROUTERS) & set(NOT_FOR_LM)


@pytest.mark.parametrize("router", LM_ROUTERS)
def test_every_router_the_demo_offers_trains_validates_and_resumes(router, tmp_path, text_file, monkeypatch,
                                                                   stop_during_step):
    out = tmp_path / router
    stop_during_step(3)
    assert _demo(out, text_file, "--router", router, steps=4) == 130
    monkeypatch.undo()
    assert _demo(out, text_file, "--router", router, "--resume", steps=4) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["history"]["valid_step"] == [2, 4] and np.isfinite(m["valid"]["loss"])
    with np.load(out / "eval_tokens.npz") as raw:
        idx = raw["valid_expert_indices"]
    assert idx.shape[0] == m["valid"]["tokens"] and idx.max() < 4
    assert np.bincount(idx[idx >= 0], minlength=4).tolist() == m["experts"]["counts"]
