"""The ``moekit`` command line: its jobs, the options every job shares, the version."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
from moekit.cli import JOBS, main
from moekit.jobs import demo


def test_help_lists_jobs_and_common_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--steps", "--seed", "--quiet", "--resume", "--force", "--device", "--malloc", "--data"):
        assert option in text


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_is_a_package_with_its_own_options(job, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([job, "--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.parametrize("choice,calls", [("keep", 1), ("default", 0)])
def test_malloc_option_keeps_freed_memory_unless_told_not_to(choice, calls, monkeypatch, tmp_path):
    kept = []
    monkeypatch.setattr("moekit.cli.keep_freed_memory", lambda: kept.append(True))
    monkeypatch.setattr(demo, "run", lambda args: 0)  # the option, not the job, is under test
    assert main(["demo", "--out", str(tmp_path), "--malloc", choice]) == 0
    assert len(kept) == calls


def test_version_via_python_m():
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(Path(moekit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "moekit", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"moekit {moekit.__version__}"
