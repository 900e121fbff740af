"""``benchmarks/compare_lm.py``: two language-model runs compared model by model."""

import copy
import json

import pytest


def _metrics():
    model = {"name": "moe-4", "valid_ppl": 70.0, "test_ppl": 60.0,
             "history": {"train_step": [1, 2, 3], "train_loss": [5.0, 4.5, 4.0], "valid_ppl": [90.0, 70.0]}}
    return {"models": [model, {**copy.deepcopy(model), "name": "moe-16-h"}]}


def test_identical_runs_pass_and_a_moved_value_fails(tmp_path, capsys, load_script):
    cmp = load_script("compare_lm")
    a, b = _metrics(), _metrics()
    assert cmp.compare(a, b) == {"moe-4": 0.0, "moe-16-h": 0.0}
    b["models"][1]["history"]["train_loss"][2] = 4.0 * (1 + 1e-2)
    worst = cmp.compare(a, b)
    assert worst["moe-4"] == 0.0 and worst["moe-16-h"] == pytest.approx(1e-2 / (1 + 1e-2))
    for name, m in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "moe-16-h: largest relative difference 9.90e-03 (FAIL" in capsys.readouterr().out
    assert cmp.main([str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "0.02"]) == 0


def test_a_nan_on_one_side_only_fails(load_script):
    cmp = load_script("compare_lm")
    a, b = _metrics(), _metrics()
    b["models"][0]["test_ppl"] = float("nan")
    assert cmp.compare(a, b)["moe-4"] == float("inf")
    a["models"][0]["test_ppl"] = float("nan")
    assert cmp.compare(a, b)["moe-4"] == 0.0


def test_runs_of_different_models_or_steps_are_an_error(load_script):
    cmp = load_script("compare_lm")
    a, b = _metrics(), _metrics()
    b["models"][1]["name"] = "moe-32"
    with pytest.raises(ValueError, match="different models"):
        cmp.compare(a, b)
    b = _metrics()
    b["models"][0]["history"]["train_step"] = [1, 2, 4]
    with pytest.raises(ValueError, match="moe-4: the runs logged different steps"):
        cmp.compare(a, b)
