"""The SPMoE-vs-hMoEup study (``python -m moekit.jobs.patterns.study``): its synthetic sets and a
tiny run of every point."""

import json

from moekit.data.pairs import read_jsonl, split_examples, synthetic_examples, write_jsonl
from moekit.jobs.patterns import study


def test_the_synthetic_sets_share_their_test_sources_and_differ_in_references_per_source(tmp_path):
    paths = study.write_synthetic_sets(tmp_path)
    many_train, many_test = split_examples(read_jsonl(paths["one-to-many"]))
    one_train, one_test = split_examples(read_jsonl(paths["one-to-one"]))
    # The job scores 100 test inputs spread evenly over its test split: the same 100 sources here.
    assert len(many_test) == 100 and len(one_test) == 400
    assert [e.source for e in one_test[::4]] == [e.source for e in many_test]
    assert all(len(e.targets) == 4 for e in many_test + one_test)
    # The same number of training pairs: 900 sources x 4 targets against 3,600 sources x 1.
    assert sum(len(e.targets) for e in many_train) == sum(len(e.targets) for e in one_train) == 3600
    assert all(len(e.targets) == 1 for e in one_train) and len({e.source for e in one_train}) == 3600
    # The one target of a one-to-one source is one of its 4 rule rewrites, the rules drawn evenly.
    full = {e.source: e.targets for e in synthetic_examples(4000, 4, seed=0)}
    rules = [full[e.source].index(e.targets[0]) for e in one_train]
    assert all(700 < rules.count(k) < 1100 for k in range(4))
    assert not {e.source for e in many_test} & {e.source for e in one_train + many_train}


def test_tiny_study_runs_every_point_and_gathers_them(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, synthetic_examples(30, 3, seed=0))
    out = tmp_path / "study"
    argv = ["--out", str(out), "--data", str(pairs), "--preset", "tiny", "--steps", "2", "--seeds", "1",
            "--pretrain-steps", "2", "--jobs", "1", "--quiet"]
    assert study.main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    got = sorted((r["group"], r["model"]) for r in summary["rows"])
    assert got == sorted([("baseline", "spmoe"), ("baseline", "hmoe"), ("MLP pattern heads", "spmoe"),
                          ("capacity-factor 1.0", "spmoe"), ("capacity-factor 2.0", "spmoe"),
                          ("gate-weight 0.3", "spmoe"), ("gate-weight 3", "spmoe"),
                          ("pre-trained backbone", "spmoe"), ("pre-trained backbone", "hmoe"),
                          ("pre-trained backbone, capacity-factor 2.0", "spmoe"),
                          ("one-to-many data", "spmoe"), ("one-to-many data", "hmoe"),
                          ("one-to-one data", "spmoe"), ("one-to-one data", "hmoe")])
    # Each point ran with its own change.
    config = json.loads((out / "kjv-capacity-factor-2.0" / "config.json").read_text())
    assert config["spmoe"]["capacity_factor"] == 2.0 and config["preset"] == "tiny"
    assert json.loads((out / "kjv-mlp-head-seed0" / "config.json").read_text())["spmoe"]["head"] == "mlp"
    assert json.loads((out / "kjv-pretrained-seed0" / "config.json").read_text())["pretrain_steps"] == 2
    both = json.loads((out / "kjv-pretrained-capacity-factor-2.0-seed0" / "config.json").read_text())
    assert both["pretrain_steps"] == 2 and both["spmoe"]["capacity_factor"] == 2.0
    synthetic = json.loads((out / "synthetic-one-to-one-seed0" / "config.json").read_text())
    assert synthetic["patterns"] == 4 and synthetic["preset"] == "synthetic"
    md = (out / "study.md").read_text()
    assert "| MLP pattern heads | SPMoE |" in md and "| one-to-one data | hMoEup |" in md
    assert (out / "study.png").stat().st_size > 0
