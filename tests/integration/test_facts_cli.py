"""``moekit facts`` end to end on a tiny configuration: outputs, capacities, resume, bad options."""

import json

import pytest
import torch

from moekit.cli import main

torch.set_num_threads(1)

TINY = ["--dim", "8", "--facts", "4,8,16", "--seeds", "2", "--num-symbols", "6", "--num-values", "4",
        "--epochs", "60", "--batch-size", "8", "--lr", "0.03", "--warmup", "2", "--eval-every", "20",
        "--checkpoint-every", "9", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts") / "run"
    assert main(["facts", "--out", str(out), "--models", "lstm-4x,moe-4", *TINY]) == 0
    return out


def test_outputs_and_capacities(finished, capsys):
    m = json.loads((finished / "metrics.json").read_text())
    assert len(m["runs"]) == 2 * 3 * 2  # models x numbers of facts x seeds
    assert [r["name"] for r in m["runs"][:3]] == ["lstm-4x_n4_s0", "lstm-4x_n4_s1", "lstm-4x_n8_s0"]
    for r in m["runs"]:
        assert 0.0 <= r["recall"] <= 1.0 and r["steps"] == -(-60 * r["facts"] // 8)
    # Four facts of 2 bits, 60 times each: stored by both models.
    assert all(r["recall"] == 1.0 for r in m["runs"] if r["facts"] == 4)
    summary = {s["model"]: s for s in m["summary"]}
    assert summary["lstm-4x"]["capacity"] >= 4 and summary["moe-4"]["unused_experts_max"] == 0
    assert summary["lstm-4x"]["unused_experts_max"] is None  # a dense model has no experts to leave unused
    assert 4 <= summary["lstm-4x"]["recalled_max"] <= 16  # all 4 facts of the smallest set, at least
    assert set(summary["lstm-4x"]["recall"]) == {"4", "8", "16"}
    report = (finished / "report.md").read_text()
    assert "| lstm-4x |" in report and "capacity at 90% recall" in report
    assert "--facts 4,8,16" in m["command"]
    assert (finished / "recall_vs_facts.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_of_a_finished_run_recomputes_nothing(finished, capsys):
    before = json.loads((finished / "metrics.json").read_text())
    assert main(["facts", "--out", str(finished), "--models", "lstm-4x,moe-4", "--resume", *TINY]) == 0
    after = json.loads((finished / "metrics.json").read_text())
    assert [r["recall"] for r in after["runs"]] == [r["recall"] for r in before["runs"]]


@pytest.mark.parametrize(("extra", "match"), [
    (["--facts", "4,4"], "distinct"),
    (["--facts", "40"], "facts=40"),
    (["--models", "moe-2"], "k=4 exceeds"),
    (["--facts", "x"], "comma-separated integers"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1"),
])
def test_bad_options(tmp_path, capsys, extra, match):
    assert main(["facts", "--out", str(tmp_path / "x"), *TINY, *extra]) == 2
    assert match in capsys.readouterr().err
