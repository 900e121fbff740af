"""The transformers benchmark runs end to end on tiny shapes and reports what it promises (no timing is asserted)."""

import json

import pytest

pytest.importorskip("transformers")




def test_batched_mm_is_skipped_over_the_gather_budget(load_script):
    bench = load_script("bench_hf")
    # 4096 tokens x k=2 slots x (gate, up, down = 3 x 1024 x 512) float32 weights: 51.5 GB gathered.
    assert bench._gather_bytes(4096, bench.FULL) == 4096 * 2 * 3 * 1024 * 512 * 4
    cfg = bench.QUICK
    assert "hf-batched_mm" in bench.block_candidates(cfg, 4, 8, budget_bytes=1e9)
    assert set(bench.block_candidates(cfg, 4, 8, budget_bytes=0)) == {"hf-eager", "hf-grouped_mm", "hf+moekit-experts",
                                                                       "moekit"}


def test_quick_benchmark_writes_markdown_and_json(tmp_path, capsys, load_script):
    bench = load_script("bench_hf")
    assert bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| E | T | pass | hf-eager | hf-grouped_mm | hf-batched_mm | hf+moekit-experts | moekit |" in table
    (path,) = tmp_path.glob("hf_*.json")
    data = json.loads(path.read_text())
    names = {"hf-eager", "hf-grouped_mm", "hf-batched_mm", "hf+moekit-experts", "moekit"}
    assert [(r["experts"], r["tokens"], r["mode"]) for r in data["block"]] == [
        (e, t, m) for e in (4, 8) for t in (8, 32) for m in ("forward", "forward+backward")]
    for row in data["block"]:
        assert set(row["median_s"]) == names and all(v > 0 for v in row["median_s"].values())
    assert [r["experts"] for r in data["generation"]] == [4, 8]
    for row in data["generation"]:
        assert set(row["tokens_per_s"]) == names | {"moekit-serving"}
        # Every implementation generates the tokens transformers' eager one does.
        assert all(row["same_tokens_as_eager"].values()), row["same_tokens_as_eager"]
    assert path.with_suffix(".md").read_text().strip() == table.split("\nresults:")[0].strip()
