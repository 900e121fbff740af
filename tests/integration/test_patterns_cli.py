"""``moekit patterns`` end to end on tiny JSON-lines data: outputs, metrics, errors, resume."""

import json

import pytest

from moekit import cli
from moekit.data.pairs import synthetic_examples, write_jsonl
from moekit.jobs.patterns import job as patterns_job

MODELS = "spmoe,beam,sampling,hmoe"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, synthetic_examples(30, 2, seed=0))
    return path


def _run(out, data, *extra):
    return cli.main(["patterns", "--data", str(data), "--preset", "tiny", "--patterns", "2", "--models", MODELS,
                     "--out", str(out), "--quiet", "--device", "cpu", *extra])


def test_end_to_end_writes_outputs_metrics_report_and_plot(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert _run(out, data) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for model in MODELS.split(","):
        m = metrics[model]
        for key in ("bleu", "oracle_bleu", "pairwise_bleu", "distinct_1", "distinct_2", "refs_covered",
                    "pattern_usage"):
            assert key in m, (model, key)
        assert m["oracle_bleu"] >= max(m["bleu_per_output"]) - 1e-6 or m["oracle_bleu"] >= m["bleu"]
        assert len(m["pattern_usage"]) == 2 and sum(m["pattern_usage"]) == pytest.approx(1.0)
        rows = [json.loads(line) for line in (out / f"outputs_{model}.jsonl").read_text().splitlines()]
        assert len(rows) == metrics["run"]["test_inputs"] >= 1
        assert all(len(r["outputs"]) == 2 and len(r["references"]) == 2 for r in rows)
    assert len(metrics["spmoe"]["train"]["assignment_share"]) == 2
    report = (out / "report.md").read_text()
    assert "SPMoE" in report and "pattern 1" in report and "quality_vs_diversity.png" in report
    assert (out / "quality_vs_diversity.png").stat().st_size > 1000
    assert (out / "config.json").exists() and list((out / "checkpoints").glob("step_*.pt"))
    assert "results in" in capsys.readouterr().out


def test_metrics_can_be_recomputed_from_the_outputs_file(tmp_path, data):
    from moekit.metrics.generation import generation_metrics

    out = tmp_path / "run"
    assert cli.main(["patterns", "--data", str(data), "--preset", "tiny", "--patterns", "2", "--models", "beam",
                     "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "outputs_beam.jsonl").read_text().splitlines()]
    again = generation_metrics([r["outputs"] for r in rows], [r["references"] for r in rows], tokenize="none")
    saved = json.loads((out / "metrics.json").read_text())["beam"]
    assert again["oracle_bleu"] == pytest.approx(saved["oracle_bleu"])
    assert again["pairwise_bleu"] == pytest.approx(saved["pairwise_bleu"])


def test_malformed_jsonl_gets_an_error_naming_the_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"source": "a b", "targets": ["b a"]})
    path.write_text("\n".join([good, good, good, '{"source": "x", "targets": "y"}', good]) + "\n")
    assert _run(tmp_path / "run", path) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:4" in err and "targets" in err
    assert not (tmp_path / "run").exists()  # nothing written before the data is known to be good


def test_bad_options_are_refused(tmp_path, data, capsys):
    assert cli.main(["patterns", "--data", str(data), "--models", "spmoe,greedy", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
    assert "greedy" in capsys.readouterr().err
    assert cli.main(["patterns", "--data", str(data), "--patterns", "1", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
    assert "--patterns 1" in capsys.readouterr().err


def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(tmp_path, data, monkeypatch):
    ref = tmp_path / "ref"
    assert _run(ref, data) == 0
    # Kill the second network (spmoe) at its 15th step, with no checkpoint on the way out: its
    # checkpoint at step 10 survives. The batch sampler is called once per training step.
    real_batch, calls = patterns_job.random_batch, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20 + 15:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(patterns_job, "random_batch", flaky)
    out = tmp_path / "run"
    assert _run(out, data) == 130
    assert not (out / "metrics.json").exists()
    assert _run(out, data) == 2  # an unfinished run is not thrown away without --resume or --force
    monkeypatch.setattr(patterns_job, "random_batch", real_batch)
    assert _run(out, data, "--resume") == 0
    a, b = json.loads((ref / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    for model in MODELS.split(","):
        assert a[model]["train"]["nll_history"] == b[model]["train"]["nll_history"], model
        assert (ref / f"outputs_{model}.jsonl").read_text() == (out / f"outputs_{model}.jsonl").read_text()
