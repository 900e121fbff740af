"""The data-scaling study's arithmetic: gaps, interpolation, fits, its commands."""

import math
from pathlib import Path

import pytest

from moekit.jobs.lm.scaling import POINTS, SEEDS, commands, fit_log, fits, gaps, interpolate, mean_gap, trend_table


def _row(dim, seed, model, ppl, params=100):
    return {"dim": dim, "seed": seed, "model": model, "params": params, "dense_params": 100, "steps": 20,
            "valid_step": [10, 20], "tokens_per_param": [1.0, 10.0], "valid_ppl": ppl,
            "final_valid_ppl": ppl[-1], "final_test_ppl": ppl[-1] * 2}


def test_gap_is_the_relative_perplexity_to_the_dense_model_of_the_same_width_and_seed():
    rows = [_row(8, 0, "lstm-4x", [100.0, 50.0]), _row(8, 0, "moe-32", [110.0, 45.0]),
            _row(8, 1, "lstm-4x", [100.0, 40.0]), _row(8, 1, "moe-32", [100.0, 38.0])]
    g = gaps(rows)
    assert [x["seed"] for x in g] == [0, 1]
    assert g[0]["gap"] == pytest.approx([0.1, -0.1]) and g[1]["gap"] == pytest.approx([0.0, -0.05])
    assert g[0]["final_test_gap"] == pytest.approx(-0.1)
    x, y = mean_gap(g, "moe-32", 8)
    assert x == [1.0, 10.0] and y == pytest.approx([0.05, -0.075])
    assert "| moe-32 | 8 |" in trend_table(g)


def test_gaps_refuse_curves_measured_at_different_steps():
    dense, moe = _row(8, 0, "lstm-4x", [1.0, 1.0]), _row(8, 0, "moe-32", [1.0, 1.0])
    moe["valid_step"] = [10, 30]
    with pytest.raises(ValueError, match="validation steps differ"):
        gaps([dense, moe])


def test_interpolation_is_linear_in_log_x():
    assert interpolate([1, 100], [0.0, 1.0], 10) == pytest.approx(0.5)
    assert interpolate([1, 100], [0.0, 1.0], 1000) is None
    assert interpolate([1, 10, 100], [0.0, 1.0, 3.0], 100) == pytest.approx(3.0)


def test_log_fit_and_per_decade_slope():
    a, b = fit_log([1, 10, 100], [0.02, 0.0, -0.02])  # -2 points per decade through 2% at x = 1
    assert a == pytest.approx(0.02) and b == pytest.approx(-0.02)
    g = [{"model": "moe-32", "dim": 8, "seed": s, "step": [500, 1000, 2000], "tokens_per_param": [1, 10, 100],
          "gap": [0.02, 0.0, -0.02]} for s in (0, 1)]
    [f] = fits(g)
    assert f["pooled"]["per_decade"] == pytest.approx(-0.02)
    assert f["pooled"]["at_1200"] == pytest.approx(0.02 - 0.02 * math.log10(1200))
    assert f["per_width"]["8"]["per_decade"] == pytest.approx(-0.02)


def test_commands_one_resumable_lm_run_per_width_and_seed():
    argvs = commands(Path("out"))
    assert len(argvs) == len(POINTS) * len(SEEDS)
    first = argvs[0]
    assert first[:2] == ["lm", "--preset"] and "--resume" in first and "--corpus" in first
    assert first[first.index("--out") + 1] == str(Path("out/runs/d64_seed0"))
    assert "--data" in commands(Path("o"), data="x.txt")[0]
