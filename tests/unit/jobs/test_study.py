"""moekit.jobs.study.run_jobs: every run started, the failed ones named, logs where asked."""

import pytest

from moekit.jobs.study import run_jobs

GOOD = ["lm", "--help"]
BAD = ["lm", "--steps", "0"]


def test_in_process_runs_stop_at_the_first_failure_and_name_it(capsys):
    with pytest.raises(SystemExit) as e:
        run_jobs([("bad", BAD), ("never", GOOD)], jobs=1)
    assert str(e.value) == "study run bad failed"
    out = capsys.readouterr().out
    assert "bad: moekit lm --steps 0" in out and "never:" not in out


def test_subprocess_runs_all_run_and_the_failed_ones_are_named_with_their_logs(tmp_path, capsys):
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as e:
        run_jobs([("ok", GOOD), ("bad", BAD)], jobs=2, logs=logs)
    assert "bad" in str(e.value) and "ok" not in str(e.value).split(":")[1] and str(logs) in str(e.value)
    assert "usage" in (logs / "ok.log").read_text()
    assert "--steps" in (logs / "bad.log").read_text()
    out = capsys.readouterr().out
    assert "ok: done in" in out and "bad: FAILED (2)" in out
