"""``moekit lm`` end to end on tiny configurations: outputs, resume, ablation, bad data."""

import json
import math
import shutil
import signal

import numpy as np
import pytest
import torch

from moekit.cli import build_parser, main
from moekit.jobs.lm.config import BALANCING, PRESETS, command_line, config_from_args
from moekit.jobs.lm.report import PAPER_TABLE6
from moekit.models.lstm_lm import LSTMLM, MODEL_NAMES
from moekit.train.checkpoint import load_checkpoint

torch.set_num_threads(1)

TINY = ["--dim", "8", "--steps", "4", "--batch-size", "4", "--seq-len", "8", "--vocab-size", "60", "--lr", "0.03",
        "--warmup", "2", "--eval-every", "2", "--eval-tokens", "64", "--checkpoint-every", "3", "--device", "cpu",
        "--quiet"]
RESULT_KEYS = {"name", "experts", "k", "ops_per_timestep", "params", "test_ppl", "valid_ppl", "cv_importance",
               "cv_load", "max_mean_load"}


def _lm(out, text_file, *extra):
    return main(["lm", "--out", str(out), "--data", str(text_file), *TINY, *extra])


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def all_models(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "all"
    assert _lm(out, text_file) == 0
    return out


def test_every_model_end_to_end(all_models, capsys):
    out = all_models
    m = _metrics(out)
    assert [r["name"] for r in m["models"]] == list(MODEL_NAMES)
    for r in m["models"]:
        assert RESULT_KEYS <= r.keys()
        assert 1 < r["test_ppl"] < 50 and 1 < r["valid_ppl"] < 50  # uniform over the 53 tokens would be 53
        assert r["steps"] == 4 and r["history"]["valid_step"] == [2, 4]
        dense = r["model"] in ("lstm-4x", "moe-1-wide", "moe-1-deep")
        assert (r["cv_load"] is None) == (r["train_cv_load"] is None) == dense
    by_name = {r["name"]: r for r in m["models"]}
    assert by_name["moe-32"]["experts"] == 32 and by_name["moe-32"]["k"] == 4
    assert by_name["moe-256-h"]["experts"] == 256 and by_name["lstm-4x"]["experts"] is None
    assert len(by_name["moe-256"]["load"]) == 256
    assert by_name["moe-4"]["max_mean_load"] == pytest.approx(1.0)  # k = E: every expert sees every token
    assert by_name["lstm-4x"]["ops_per_timestep"] == by_name["moe-1-wide"]["ops_per_timestep"] == 32 * 8 * 8
    # The perplexities are recomputable from the saved per-token losses.
    raw = np.load(out / "eval_nll.npz")
    for r in m["models"]:
        nll = raw[f"{r['name']}__test_nll"].astype(np.float64)
        assert nll.size == raw["test_targets"].size == m["tokens"]["test"] - 1
        assert math.exp(nll.mean()) == pytest.approx(r["test_ppl"], rel=1e-6)
    for name in ("report.md", "valid_ppl.png", "ppl_vs_experts.png", "expert_load.png", "expert_load_moe-32.png",
                 "config.json", "vocab.json"):
        assert (out / name).is_file(), name
    assert (out / "ppl_vs_experts.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| moe-256-h | 256 | 4 |" in report and "39.7" in report  # beside the paper's Table 7
    assert "contiguous blocks" in report  # the split is stated
    assert not list(out.rglob("*.tmp"))
    assert len(list((out / "checkpoints").iterdir())) == 2  # the last two checkpoints are kept


def _interrupt(monkeypatch, call, action):
    """Run ``action`` in the ``call``-th training forward pass (counted over all models)."""
    original = LSTMLM.forward
    calls = {"n": 0}

    def forward(self, ids, mask=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                action()
        return original(self, ids, mask)

    monkeypatch.setattr(LSTMLM, "forward", forward)


def _same_results(a, b):
    ra, rb = _metrics(a)["models"], _metrics(b)["models"]
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        for key in ("train_time_s", "eval_time_s"):
            x.pop(key), y.pop(key)
        assert x == y


MODELS = ["--models", "lstm-4x,moe-32,moe-16-h"]


@pytest.fixture(scope="module")
def three_models(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "three"
    assert _lm(out, text_file, *MODELS) == 0
    return out


def test_ctrl_c_then_resume_gives_the_uninterrupted_result(tmp_path, text_file, three_models, monkeypatch, capsys):
    out = tmp_path / "run"
    # Step 2 of the second model: it finishes, is checkpointed (global step 4 + 2), and the job stops.
    _interrupt(monkeypatch, 6, lambda: signal.raise_signal(signal.SIGINT))
    assert _lm(out, text_file, *MODELS) == 130
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000006.pt"]
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    assert _lm(out, text_file, *MODELS) == 2  # an unfinished run is not thrown away without --resume
    assert _lm(out, text_file, *MODELS, "--resume") == 0
    _same_results(three_models, out)


def test_crash_then_resume_from_the_last_checkpoint(tmp_path, text_file, three_models, monkeypatch):
    out = tmp_path / "run"

    def crash():
        raise RuntimeError("simulated crash")

    # Step 4 of the third model: the last checkpoint is its step 3 (global 8 + 3).
    _interrupt(monkeypatch, 12, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _lm(out, text_file, *MODELS)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000008.pt", "step_00000011.pt"]
    monkeypatch.undo()
    assert _lm(out, text_file, *MODELS, "--resume") == 0
    _same_results(three_models, out)


def test_different_config_is_refused_unless_forced(tmp_path, three_models, text_file, capsys):
    out = tmp_path / "copy"
    shutil.copytree(three_models, out)
    assert _lm(out, text_file, "--models", "lstm-4x,moe-32") == 2
    assert "models" in capsys.readouterr().err
    assert _lm(out, text_file, "--models", "lstm-4x,moe-32", "--force") == 0
    assert [r["name"] for r in _metrics(out)["models"]] == ["lstm-4x", "moe-32"]


def test_balancing_trains_every_scheme_and_reports_the_load(tmp_path, text_file):
    out = tmp_path / "balancing"
    assert _lm(out, text_file, "--balancing", "--models", "moe-8", "--steps", "3") == 0
    m = _metrics(out)
    assert m["balancing"] is True
    assert [r["scheme"] for r in m["models"]] == list(BALANCING)
    routers = {r["scheme"]: r for r in m["models"]}
    for r in m["models"]:
        counts = r["history"]["train_counts"]
        assert len(counts) == 3 and all(sum(c) == 4 * 4 * 8 for c in counts)  # k = 4 slots per token
        # The training balance is that of the recorded counts, by hand.
        last = torch.tensor(counts[-1], dtype=torch.float64)
        assert r["history"]["train_counts_balance"][-1][1] == pytest.approx(float(last.max() / last.mean()))
        assert r["train_dead_experts"] == int((torch.tensor(counts).sum(0) == 0).sum())
        assert r["dead_experts"] == sum(v == 0 for v in r["load"])
    state = load_checkpoint(sorted((out / "checkpoints").iterdir())[-1])
    assert state["current"] is None and set(state["finished"]) == {f"moe-8_{s}" for s in BALANCING}
    assert routers["no-loss"]["w_importance"] == routers["no-loss"]["w_load"] == 0.0
    assert (out / "balancing_load.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Balancing schemes side by side" in report and "| moe-8 | deepseek |" in report
    assert _lm(tmp_path / "x", text_file, "--balancing", "--models", "lstm-4x") == 2


def test_aux_loss_free_balancing_moves_the_bias_after_every_step(tmp_path, text_file, monkeypatch):
    from moekit.jobs.lm import job as lm_job

    calls = []
    monkeypatch.setattr(lm_job, "update_expert_bias", lambda model, rate: calls.append(rate))
    assert _lm(tmp_path / "b", text_file, "--balancing", "--models", "moe-8", "--steps", "3") == 0
    assert calls == [1e-3] * 6  # 3 steps of each of the two aux-loss-free schemes


def test_ablation_runs_the_table_6_grid(tmp_path, text_file):
    out = tmp_path / "ablation"
    assert _lm(out, text_file, "--ablation", "--models", "moe-8", "--steps", "2") == 0
    m = _metrics(out)
    assert m["ablation"] is True
    assert [(r["w_importance"], r["w_load"]) for r in m["models"]] == list(PAPER_TABLE6)
    assert {r["model"] for r in m["models"]} == {"moe-8"}
    assert all(r["train_cv_importance"] >= 0 and r["train_max_mean_load"] >= 1 for r in m["models"])
    report = (out / "report.md").read_text()
    assert "17.80" in report and "| moe-8 | 0 | 0 |" in report and "CV(load) train" in report
    assert m["command"].startswith(f"moekit lm --preset cpu-small --models moe-8 --ablation --data {text_file} ")
    assert " --steps 2 " in m["command"] and f"`{m['command']}`" in report


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01\x02" * 50, "binary"),
                                              (b" \n\n \n", "empty"), (b"\xff\xfe caf\xe9", "UTF-8")])
def test_unusable_data_file_is_a_clear_error(tmp_path, content, message, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    out = tmp_path / "o"
    assert _lm(out, bad) == 2
    err = capsys.readouterr().err
    assert "bad.txt" in err and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("bad, message", [(["--models", "moe-32,gru"], "unknown model 'gru'"),
                                          (["--models", "moe-2"], "k=4 exceeds"),
                                          (["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
                                          (["--seq-len", "100000"], "seq_len=100000")])
def test_invalid_config_is_refused_before_the_out_dir_is_touched(tmp_path, text_file, bad, message, capsys):
    out = tmp_path / "o"
    assert _lm(out, text_file, *bad) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(shutil.which("bible") is None, reason="needs the `bible` program (Debian package bible-kjv)")
def test_default_corpus_is_the_kjv_split_by_book(tmp_path):
    out = tmp_path / "kjv"
    args = ["lm", "--out", str(out), *TINY, "--models", "moe-4", "--steps", "1", "--vocab-size", "300"]
    assert main(args) == 0
    m = _metrics(out)
    assert m["data"].startswith("kjv") and m["vocab_size"] == 300
    assert "Esther" in m["split"] and "Ruth" in m["split"]
    assert m["tokens"]["train"] > 20 * m["tokens"]["test"] > 0


@pytest.mark.parametrize("argv", [["--preset", "paper"], ["--ablation", "--steps", "7", "--lr", "0.01"],
                                  ["--models", "moe-4,lstm-4x", "--seed", "3", "--dim", "32", "--w-load", "0"]])
def test_the_reported_command_reproduces_the_configuration(argv):
    cfg = config_from_args(build_parser().parse_args(["lm", *argv]))
    again = config_from_args(build_parser().parse_args(command_line(cfg).split()[1:]))
    assert again == cfg
    assert cfg.dim == (32 if "--dim" in argv else PRESETS[cfg.preset]["dim"])


def test_the_data_scaling_study_on_tiny_runs(tmp_path, text_file, capsys):
    from moekit.jobs.lm import scaling

    out = tmp_path / "study"
    assert scaling.main(["--out", str(out), "--tiny", "--data", str(text_file), "--jobs", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["commands"]) == 4 and len(m["runs"]) == 4 * 3  # (width, seed) runs x models
    assert {g["model"] for g in m["gaps"]} == {"moe-32", "moe-256"}
    assert all(len(g["gap"]) == len(g["step"]) for g in m["gaps"])
    assert (out / "gap_vs_tokens_per_param.png").read_bytes()[:4] == b"\x89PNG"
    assert "tokens per dense parameter" in (out / "report.md").read_text()
    # Rerun: every run is finished, so only the report is rewritten.
    assert scaling.main(["--out", str(out), "--tiny", "--data", str(text_file), "--jobs", "1"]) == 0


def test_corpus_option(tmp_path, text_file, capsys):
    assert main(["lm", "--out", str(tmp_path / "x"), "--data", str(text_file), "--corpus", "english", *TINY]) == 2
    assert "exclude each other" in capsys.readouterr().err
    args = build_parser().parse_args(["lm", "--corpus", "english", "--models", "moe-32"])
    assert command_line(config_from_args(args)).endswith("--corpus english")
