"""``moekit patterns`` end to end on tiny JSON-lines data: outputs, metrics, errors, resume."""

import json

import pytest
import torch

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


def test_pretraining_runs_first_and_every_network_starts_from_its_backbone(tmp_path, data, monkeypatch):
    built = []
    real_build = patterns_job.build_network

    def spy(name, cfg, vocab, device=None, backbone_state=None):
        built.append((name, backbone_state))
        return real_build(name, cfg, vocab, device, backbone_state)

    monkeypatch.setattr(patterns_job, "build_network", spy)
    out = tmp_path / "run"
    assert _run(out, data, "--models", "spmoe,hmoe", "--pretrain-steps", "6", "--head", "mlp",
                "--capacity-factor", "none", "--gate-weight", "0.5") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["pretrain"]["steps"] == 6 and metrics["run"]["pretrain"]["texts"] > 0
    cfg = metrics["run"]["config"]
    assert cfg["pretrain_steps"] == 6 and cfg["spmoe"]["head"] == "mlp"
    assert cfg["spmoe"]["capacity_factor"] is None and cfg["spmoe"]["gate_weight"] == 0.5
    assert [name for name, _ in built] == ["pretrain", "spmoe", "hmoe"]
    assert built[0][1] is None
    # SPMoE and hMoEup start from the same pre-trained backbone, the pre-training run's own weights.
    session = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    pretrained = patterns_job.pretrained_backbone(type("S", (), {"finished": session["finished"]})())
    for _, state in built[1:]:
        assert state is not None and state.keys() == pretrained.keys()
        assert all(torch.equal(state[k], pretrained[k]) for k in state)
    assert "pre-trained for 6 steps" in (out / "report.md").read_text()


def test_denoising_batches_depend_only_on_seed_and_step(tmp_path):
    from moekit.data.pairs import pair_vocab
    from moekit.jobs.patterns.config import MASK_TOKEN, make_config, special_tokens

    cfg = make_config(["spmoe"], 2, "tiny", "synthetic", 0, 2, pretrain_steps=5)
    examples = synthetic_examples(30, 2, seed=0)
    vocab = pair_vocab(examples, 400, extra=special_tokens(cfg))
    assert MASK_TOKEN in special_tokens(cfg) and MASK_TOKEN not in special_tokens(make_config(
        ["spmoe"], 2, "tiny", "synthetic", 0, 2))
    texts = patterns_job.pretraining_texts(examples, vocab, cfg.sizes.max_len)
    a, b = (patterns_job.denoising_batch(texts, 3, cfg, vocab) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = patterns_job.denoising_batch(texts, 4, cfg, vocab)
    assert not torch.equal(a.src, c.src)
    mask = vocab.id(MASK_TOKEN)
    assert (a.src == mask).any(dim=1).float().mean() > 0.5  # most texts are noised
    for r in range(len(a.src)):
        # The target is the clean text (tgt_in without its start token, tgt_out without its end), and
        # the noised source keeps the rest of it in order.
        tgt = a.tgt_in[r, 1:][a.tgt_in[r, 1:] != vocab.pad_id].tolist()
        assert a.tgt_out[r][a.tgt_out[r] != vocab.pad_id].tolist() == [*tgt, vocab.eos_id]
        kept = [t for t in a.src[r].tolist() if t not in (mask, vocab.pad_id, vocab.eos_id)]
        it = iter(tgt)
        assert all(any(t == x for x in it) for t in kept)
