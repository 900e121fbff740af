"""The E^3 sweep (``python -m moekit.jobs.ensemble.study``) on a tiny set: its points, and rows that
agree with the jobs' own metrics where both exist."""

import json
import re

import pytest

from moekit.jobs.ensemble import study


def test_plan_covers_every_m_k_and_layout_with_the_costliest_first():
    points = study.plan(list(study.CONFIGS), e3_seeds=2, extras=True)
    names = [p.name for p in points]
    assert len(names) == len(set(names)) == 4 * 4 + 1
    assert names[0] == "every_2-k2-m4"
    assert {"every_2-k1-e3m2", "every_2-k1-e3m2-seed1", "every_2-k1-e3m4-seed1", "extras"} <= set(names)
    assert [p.cost for p in points] == sorted((p.cost for p in points), reverse=True)


def test_tiny_study_gathers_rows_that_match_the_jobs(tiny_npz, tmp_path):
    out = tmp_path / "study"
    argv = ["--out", str(out), "--data", str(tiny_npz), "--steps", "2", "--jobs", "1", "--configs", "last_n-k2",
            "--e3-seeds", "1", "--quiet"]
    assert study.main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    rows = summary["rows"]
    got = sorted((r["family"], r["M"], r["seed"]) for r in rows)
    assert got == sorted([("V-MoE", 1, s) for s in range(4)] + [("deep ensemble", 2, 0), ("deep ensemble", 4, 0),
                         ("E^3", 2, 0), ("E^3", 4, 0), ("dense ViT", 1, 0), ("Soft MoE", 1, 0),
                         ("V-MoE (expert choice)", 1, 0)])
    job = json.loads((out / "last_n-k2-m4" / "metrics.json").read_text())["models"]
    by = {(r["family"], r["M"], r["seed"]): r for r in rows}
    # The V-MoE of seed 0 is the job's vmoe; the same V-MoE recomputed as member 0 of the deep
    # ensemble must give the same numbers, so the seed spread is measured consistently.
    member0 = study._sub_ensemble(out / "last_n-k2-m4", [0], job["deep-ensemble"], {"fewshot_shots": [1],
                                  "fewshot_draws": 5}, {"test": 3, "ood": None})
    for key in ("accuracy", "nll", "ece"):
        assert by[("V-MoE", 1, 0)][key] == pytest.approx(job["vmoe"][key], abs=1e-6)
        assert member0[key] == pytest.approx(job["vmoe"][key], abs=1e-6)
        assert by[("deep ensemble", 4, 0)][key] == job["deep-ensemble"][key]
    assert by[("deep ensemble", 2, 0)]["gflops"] == pytest.approx(job["deep-ensemble"]["gflops_per_example"] / 2)
    assert len(re.findall(r"\| V-MoE \(\d\) \|", (out / "study.md").read_text())) == 4
    for plot in ("tradeoff.png", "fewshot.png", "diversity.png"):
        assert (out / plot).stat().st_size > 0
    # Gathering again reads the finished points without training anything.
    assert study.main([*argv, "--gather-only"]) == 0
    assert json.loads((out / "study.json").read_text())["rows"] == rows
