"""``moekit demo`` end to end on a tiny configuration: the out-directory contract, resume, errors."""

import json
import math
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.models.demo_lm import DemoLM
from moekit.train.checkpoint import load_checkpoint

torch.set_num_threads(1)

TINY = (
    "--steps 6 --batch-size 4 --seq-len 8 --dim 16 --hidden-dim 32 --num-experts 4 --k 2 --vocab-size 120 "
    "--eval-every 3 --eval-tokens 200 --lr 0.02 --checkpoint-every 2 --device cpu --quiet"
).split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A synthetic text file with some structure to learn (no corpus package needed)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(150)]
    lines = []
    for _ in range(600):
        start = rng.randrange(len(words))
        lines.append(" ".join(words[(start + j * rng.choice((1, 2))) % len(words)] for j in range(8)) + " .")
    path = tmp_path_factory.mktemp("data") / "synthetic.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _demo(out, text_file, *extra):
    return main(["demo", "--out", str(out), "--data", str(text_file), *TINY, *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert _demo(out, text_file) == 0
    return out


def test_demo_writes_the_out_dir_contract(finished_run, capsys):
    out = finished_run
    for name in (
        "config.json",
        "metrics.json",
        "report.md",
        "loss.png",
        "expert_load.png",
        "vocab.json",
        "eval_tokens.npz",
        "checkpoints/step_00000006.pt",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 6 and config["num_experts"] == 4 and config["router"] == "noisy_topk"
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["train_tokens_seen"] == 6 * 4 * 8
    assert m["history"]["train_step"] == [1, 2, 3, 4, 5, 6]
    assert m["history"]["valid_step"] == [3, 6]
    assert m["history"]["valid_loss"][-1] == pytest.approx(m["valid"]["loss"])
    assert m["history"]["valid_loss"][1] < m["history"]["valid_loss"][0]  # it learns
    # The perplexities are recomputable from the saved per-token cross-entropies.
    raw = np.load(out / "eval_tokens.npz")
    for split in ("train", "valid"):
        assert m[split]["tokens"] == raw[f"{split}_nll"].size == raw[f"{split}_targets"].size
        assert m[split]["ppl"] == pytest.approx(math.exp(raw[f"{split}_nll"].astype(np.float64).mean()), rel=1e-5)
        assert 1 < m[split]["ppl"] < 100  # clearly better than uniform over the 120-word vocabulary
    ex = m["experts"]
    assert len(ex["counts"]) == len(ex["importance"]) == len(ex["load"]) == 4
    # Dropless routing computes k=2 slots for every validation token.
    assert sum(ex["counts"]) == 2 * m["valid"]["tokens"] and ex["dropped"] == 0
    assert sum(ex["importance"]) == pytest.approx(m["valid"]["tokens"], rel=1e-4)  # gates sum to 1
    # ... and the expert table is recomputable from the saved per-token routing.
    idx, w = raw["valid_expert_indices"].astype(np.int64), raw["valid_expert_weights"]
    assert idx.shape == w.shape == (m["valid"]["tokens"], 2)
    assert np.bincount(idx.ravel(), minlength=4).tolist() == ex["counts"]
    per_expert = np.bincount(idx.ravel(), weights=w.ravel().astype(np.float64), minlength=4)
    np.testing.assert_allclose(per_expert, ex["importance"], rtol=1e-4)
    assert "validation" in (out / "report.md").read_text()


def _interrupt_at_step(monkeypatch, step, action):
    """Run ``action`` during the forward pass of training step ``step``."""
    original = DemoLM.forward
    calls = {"n": 0}

    def forward(self, ids):
        if self.training:
            calls["n"] += 1
            if calls["n"] == step:
                action()
        return original(self, ids)

    monkeypatch.setattr(DemoLM, "forward", forward)


def _assert_same_run(a: Path, b: Path):
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["history"]["train_loss"] == mb["history"]["train_loss"]
    assert ma["history"]["valid_loss"] == mb["history"]["valid_loss"]
    assert ma["valid"] == mb["valid"]
    wa = load_checkpoint(a / "checkpoints" / "step_00000006.pt")["current"]["model"]
    wb = load_checkpoint(b / "checkpoints" / "step_00000006.pt")["current"]["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_ctrl_c_saves_the_completed_step_and_resume_matches_an_uninterrupted_run(
    tmp_path, text_file, finished_run, monkeypatch, capsys
):
    out = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))
    assert _demo(out, text_file) == 130
    assert "--resume" in capsys.readouterr().err
    # Step 3 finished after the signal and was checkpointed on the way out (the schedule says 2, 4, 6).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000003.pt"]
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert _demo(out, text_file) == 2  # an unfinished run is not thrown away without --resume
    assert "unfinished" in capsys.readouterr().err
    assert _demo(out, text_file, "--resume") == 0
    _assert_same_run(finished_run, out)


def test_resume_after_a_crash_continues_from_the_last_checkpoint(tmp_path, text_file, finished_run, monkeypatch):
    out = tmp_path / "run"

    def crash():
        raise RuntimeError("simulated crash")

    _interrupt_at_step(monkeypatch, 6, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _demo(out, text_file)
    assert load_checkpoint(out / "checkpoints" / "step_00000004.pt")["current"]["state"]["step"] == 4
    monkeypatch.undo()
    assert _demo(out, text_file, "--resume") == 0
    _assert_same_run(finished_run, out)


def test_resume_of_a_finished_run_only_rewrites_the_results(tmp_path, finished_run, text_file):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / "metrics.json").unlink()
    assert _demo(out, text_file, "--resume") == 0
    _assert_same_run(finished_run, out)


def test_different_config_is_refused_unless_forced(tmp_path, finished_run, text_file, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = (out / "config.json").read_text()
    assert _demo(out, text_file, "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "lr" in err and "--force" in err
    assert (out / "config.json").read_text() == before
    assert _demo(out, text_file, "--lr", "0.01", "--resume") == 2  # resuming is no way around it
    assert _demo(out, text_file, "--lr", "0.01", "--force") == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01


def test_non_run_directory_is_refused_unless_forced(tmp_path, text_file, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _demo(out, text_file) == 2
    assert "config.json" in capsys.readouterr().err
    assert _demo(out, text_file, "--force") == 0
    assert (out / "notes.txt").read_text() == "keep me"


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x01\x02" * 100)
    assert main(["demo", "--out", str(tmp_path / "o"), "--data", str(bad), *TINY]) == 2
    assert "bad.bin" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [["--k", "5"], ["--seq-len", "100000"], ["--steps", "0"], ["--device", "nodevice"]])
def test_invalid_config_is_refused_before_the_out_dir_is_touched(tmp_path, text_file, bad, capsys):
    out = tmp_path / "o"
    try:
        rc = _demo(out, text_file, *bad)
    except SystemExit as e:  # argparse rejects what it can check on its own
        rc = e.code
    assert rc == 2
    assert bad[0].lstrip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")
    assert not out.exists()


@pytest.mark.skipif(
    shutil.which("bible") is None, reason="the `bible` program (Debian package bible-kjv) is not installed"
)
def test_demo_on_the_king_james_bible(tmp_path, capsys):
    out = tmp_path / "kjv"
    assert main(["demo", "--out", str(out), *TINY, "--steps", "2", "--vocab-size", "500"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"].startswith("kjv") and m["vocab_size"] == 500
    assert "validation perplexity" in capsys.readouterr().out
