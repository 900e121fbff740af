"""``moekit ensemble`` end to end on a tiny synthetic .npz: outputs, recomputable metrics, resume, errors."""

import json

import numpy as np
import pytest
import torch

from moekit import cli
from moekit.metrics.calibration import accuracy, brier, ece, nll
from moekit.metrics.diversity import disagreement
from moekit.metrics.ood import ood_auroc

MODELS = ["dense", "vmoe", "e3", "deep-ensemble", "e3-init"]


def _args(npz, out, *extra):
    return ["ensemble", "--data", str(npz), "--steps", "4", "--finetune-steps", "2", "--checkpoint-every", "3",
            "--out", str(out), "--quiet", *extra]


def test_end_to_end_writes_recomputable_metrics(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(tiny_npz, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["models"]) == sorted(MODELS)
    for name in MODELS:
        m = metrics["models"][name]
        with np.load(out / f"predictions_{name}.npz") as pred:
            probs, labels, ood = pred["probs"], pred["labels"], pred["ood_probs"]
            members = pred["member_probs"] if "member_probs" in pred else None
        # Ensembles keep their members' predictions; the ensemble's is their mean.
        assert (members is not None) == (name in ("e3", "deep-ensemble", "e3-init"))
        if members is not None:
            assert members.shape == (20, 2, 3)
            np.testing.assert_allclose(probs, members.mean(1), atol=1e-6)
            assert m["member_disagreement"] == pytest.approx(disagreement(members))
        assert probs.shape == (20, 3) and labels.shape == (20,) and ood.shape == (8, 3)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
        for key, fn in (("accuracy", accuracy), ("nll", nll), ("ece", ece), ("brier", brier)):
            assert m[key] == pytest.approx(fn(probs, labels), abs=1e-9), (name, key)
        assert m["ood_auroc_msp"] == pytest.approx(ood_auroc(probs, ood, "msp"))
        assert m["ood_auroc_entropy"] == pytest.approx(ood_auroc(probs, ood, "entropy"))
        assert (out / f"reliability_{name}.png").stat().st_size > 0
    models = metrics["models"]
    # E^3 shares the V-MoE's parameters; the deep ensemble doubles them and its FLOPs.
    assert models["e3"]["params"] == models["vmoe"]["params"] == models["deep-ensemble"]["params"] // 2
    assert models["vmoe"]["gflops_per_example"] < models["e3"]["gflops_per_example"]
    assert models["e3"]["gflops_per_example"] < models["deep-ensemble"]["gflops_per_example"]
    assert models["deep-ensemble"]["seeds"] == [0, 1] and models["deep-ensemble"]["train_steps"] == [4, 4]
    assert models["e3-init"]["train_steps"] == [2]
    assert metrics["flops_ratios"]["e3/deep-ensemble"] < 1
    assert (out / "flops_vs_nll.png").stat().st_size > 0 and (out / "config.json").exists()
    report = (out / "report.md").read_text()
    assert "| e3 |" in report and "FLOPs ratio e3/deep-ensemble" in report
    assert "| deep-ensemble |" in capsys.readouterr().out


def test_resume_after_an_interrupt_reproduces_the_uninterrupted_run(tiny_npz, tmp_path, monkeypatch,
                                                                     stop_during_step):
    models = ["--models", "vmoe,e3-init"]
    assert cli.main(_args(tiny_npz, tmp_path / "whole", *models)) == 0
    stop_during_step(5)
    # vmoe finishes its 4 steps; e3-init is stopped after 1 of its 2, with a checkpoint of 4 + 1 steps.
    assert cli.main(_args(tiny_npz, tmp_path / "cut", *models)) == 130
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_00000004.pt",
                                                                                     "step_00000005.pt"]
    monkeypatch.undo()
    # Without --resume an unfinished run is not thrown away.
    assert cli.main(_args(tiny_npz, tmp_path / "cut", *models)) == 2
    assert cli.main(_args(tiny_npz, tmp_path / "cut", *models, "--resume")) == 0
    for name in ("vmoe", "e3-init"):
        with np.load(tmp_path / "whole" / f"predictions_{name}.npz") as a, \
                np.load(tmp_path / "cut" / f"predictions_{name}.npz") as b:
            assert np.array_equal(a["probs"], b["probs"]) and np.array_equal(a["ood_probs"], b["ood_probs"])


def test_malformed_npz_gets_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((2, 8, 8), np.uint8))
    assert cli.main(_args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "bad.npz" in err and "'y_test'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_options_name_the_value(tiny_npz, tmp_path, capsys):
    assert cli.main(_args(tiny_npz, tmp_path / "a", "--models", "dense,moe")) == 2
    assert "unknown model(s) ['moe']" in capsys.readouterr().err
    torch.manual_seed(0)
    assert cli.main(_args(tiny_npz, tmp_path / "b", "--models", "dense")) == 0
    assert cli.main(_args(tiny_npz, tmp_path / "b", "--models", "dense", "--k", "2")) == 2
    assert "different configuration" in capsys.readouterr().err


def test_fewshot_probes_recompute_from_the_saved_features(tmp_path):
    from moekit.metrics.fewshot import fewshot_report

    # A larger tiny set, so that the pool half holds 1 and 2 shots per class.
    rng = np.random.default_rng(1)
    y_train, y_test = rng.integers(0, 3, 64), np.repeat(np.arange(3), 12)
    x_train, x_test = (rng.integers(0, 60, (len(y), 8, 8)).astype(np.uint8) for y in (y_train, y_test))
    for x, y in ((x_train, y_train), (x_test, y_test)):
        for c in range(3):
            x[y == c, 2 * c:2 * c + 3] += 150
    npz = tmp_path / "set.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = tmp_path / "run"
    argv = ["ensemble", "--data", str(npz), "--steps", "3", "--models", "vmoe,e3,deep-ensemble,soft-moe,vmoe-ec",
            "--ensemble-size", "4", "--layout", "every_2", "--k", "2", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["ensemble_size"] == 4 and config["layout"] == "every_2"
    for name, members in (("vmoe", 1), ("e3", 4), ("deep-ensemble", 4), ("soft-moe", 1), ("vmoe-ec", 1)):
        with np.load(out / f"features_{name}.npz") as f:
            feats, labels = f["test"], f["test_labels"]
            assert "ood" not in f.files  # an .npz's x_ood has no labels (and this one has no x_ood)
        assert feats.shape == (36, members, 64) and feats.dtype == np.float16
        again = fewshot_report(feats.astype(np.float64).reshape(36, -1), labels, (1, 5, 10), 5, num_classes=3)
        assert metrics["models"][name]["fewshot"]["test"] == again, name
        assert again["1"] is not None and again["10"] is None  # 6 per class in the pool: 10 shots do not fit
    # E^3's 4 members each hold 2 of the 8 experts in all 4 odd blocks; its members tile from block 1.
    models = metrics["models"]
    assert models["e3"]["params"] == models["vmoe"]["params"] == models["vmoe-ec"]["params"]
    assert models["e3"]["gflops_per_example"] > 3 * models["vmoe"]["gflops_per_example"]
    report = (out / "report.md").read_text()
    assert "every odd block" in report and "--ensemble-size 4 --layout every_2" in report
    assert "| soft-moe | " in report and "Few-shot linear probes" in report
