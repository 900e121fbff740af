"""``moekit upcycle`` end to end on the tiny preset: outputs, exported weights, resume, errors."""

import json
import math
import sys

import numpy as np
import pytest
import torch

import moekit
from moekit.cli import build_parser, main

pytest.importorskip("transformers")
torch.set_num_threads(1)

# 6 dense steps, then 4 of each continuation: 14 in all.
TINY = ["--preset", "tiny", "--device", "cpu", "--quiet"]


def _upcycle(out, text_file, *extra):
    return main(["upcycle", "--out", str(out), "--data", str(text_file), *TINY, *extra])


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert _upcycle(out, text_file) == 0
    return out


def test_outputs_and_what_they_say(finished_run, capsys):
    out = finished_run
    for name in ("config.json", "metrics.json", "report.md", "valid_ppl.png", "eval_nll.npz",
                 "models/dense.safetensors", "models/dense-continued.safetensors", "models/upcycled.safetensors",
                 "checkpoints/step_00000014.pt"):
        assert (out / name).is_file(), name
    assert (out / "valid_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = _metrics(out)
    runs = m["runs"]
    assert list(runs) == ["dense", "dense-continued", "upcycled"]
    assert [(r["first_step"], r["steps"]) for r in runs.values()] == [(0, 6), (6, 4), (6, 4)]
    assert runs["dense"]["history"]["valid_step"] == [2, 4, 6]
    raw = np.load(out / "eval_nll.npz")
    for name, r in runs.items():
        for split in ("valid", "test"):
            nll = raw[f"{name}__{split}_nll"].astype(np.float64)
            assert r[f"{split}_ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
        assert 1 < r["valid_ppl"] < 60  # uniform over the vocabulary of the synthetic corpus would be ~53
    dense, cont, up = runs["dense"], runs["dense-continued"], runs["upcycled"]
    assert dense["params"] == cont["params"] == dense["active_params"]
    # 2 layers of a SwiGLU MLP of 16 x 32: 3 * 512 weights each; 4 experts hold 4 copies, k=2 are active.
    mlp = 3 * 16 * 32
    router = 16 * 4
    assert up["params"] == dense["params"] + 2 * (3 * mlp + router)
    assert up["active_params"] == dense["params"] + 2 * (mlp + router)
    # At the upcycling the MoE is the dense model: the continuations' first losses (same batch) agree.
    assert up["history"]["train_loss"][0] == pytest.approx(cont["history"]["train_loss"][0], rel=1e-5)
    assert up["history"]["train_loss"][1] != pytest.approx(cont["history"]["train_loss"][1], rel=1e-7)
    load = up["expert_load"]
    assert len(load["load_over_ideal"]) == 2 and len(load["load_over_ideal"][0]) == 4
    assert all(sum(layer) == pytest.approx(4.0) for layer in load["load_over_ideal"])
    assert dense["expert_load"] is None
    report = (out / "report.md").read_text()
    assert "| upcycled | 6-10 |" in report and "moekit upcycle --preset tiny --data" in report
    assert "lower for the upcycled model" in report or "higher for the upcycled model" in report


def test_the_exported_weights_are_the_models(finished_run, text_file):
    """models/*.safetensors hold each run's final weights: loaded into the job's model they give its perplexity."""
    from moekit.jobs.upcycle import job
    from moekit.jobs.upcycle.config import PRESETS, UpcycleConfig

    cfg = UpcycleConfig(preset="tiny", clip=1.0, w_importance=0.01, w_load=0.0, noise=0.0, seed=0,
                        data=str(text_file), **PRESETS["tiny"])
    data = job.load_data(cfg)
    m = _metrics(finished_run)
    for name in ("dense", "upcycled"):
        model = job.dense_model(cfg, data.vocab, torch.device("cpu"))
        if name == "upcycled":
            moekit.hf.upcycle_model(model, cfg.num_experts, cfg.k)
        model.load_state_dict(moekit.load_safetensors(finished_run / "models" / f"{name}.safetensors"))
        ppl = job.evaluate(model, data.valid, cfg, torch.device("cpu")).ppl
        assert ppl == pytest.approx(m["runs"][name]["valid_ppl"], rel=1e-6)
    exported = moekit.export_checkpoint(finished_run / "checkpoints" / "step_00000014.pt", finished_run / "export")
    assert sorted(p.name for p in exported) == ["dense-continued.safetensors", "dense.safetensors",
                                                "upcycled.safetensors"]


@pytest.mark.parametrize("stop_at", [5, 12])  # inside the dense run; inside the upcycled run
def test_stop_and_resume_match_an_uninterrupted_run(tmp_path, text_file, finished_run, stop_during_step, stop_at):
    out = tmp_path / "run"
    stop_during_step(stop_at)
    assert _upcycle(out, text_file) == 130
    assert not (out / "metrics.json").exists()
    # The last two checkpoints are kept; the newest holds the step the stop was asked in.
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step_{stop_at:08d}.pt"
    stop_during_step(10**6)
    assert _upcycle(out, text_file, "--resume") == 0
    want, got = _metrics(finished_run)["runs"], _metrics(out)["runs"]
    for name in want:
        assert got[name]["valid_ppl"] == want[name]["valid_ppl"], name
        assert got[name]["history"]["train_loss"] == want[name]["history"]["train_loss"], name


def test_bad_options_are_one_line_errors(tmp_path, text_file, capsys):
    assert _upcycle(tmp_path / "a", text_file, "--dim", "15", "--heads", "2") == 2
    assert capsys.readouterr().err.strip() == "moekit upcycle: error: dim=15 is not a multiple of heads=2"
    assert _upcycle(tmp_path / "b", text_file, "--k", "5") == 2
    assert "k=5 exceeds num_experts=4" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_without_transformers_the_error_says_what_to_install(tmp_path, text_file, monkeypatch, capsys):
    # As if transformers were not installed: None in sys.modules fails its import, and moekit.hf is
    # imported afresh (its import is what checks). The jobs are imported first: the metrics library
    # they use probes for transformers by its installed metadata, which stays.
    build_parser()
    for name in [m for m in sys.modules if m == "moekit.hf" or m.startswith("moekit.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(moekit, "hf", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert _upcycle(tmp_path / "out", text_file) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["moekit upcycle: error: moekit upcycle trains a transformers model: moekit.hf needs "
                     "transformers >=5.0,<6.0, which is not installed: pip install 'moekit[hf]'"]
    assert not (tmp_path / "out").exists()
