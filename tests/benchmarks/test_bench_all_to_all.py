"""The all-to-all benchmark runs end to end on 2 processes and reports what it promises (no timing is asserted)."""

import json


def test_bytes_sent_per_rank_by_hand(load_script):
    bench = load_script("bench_all_to_all")
    # T=10 tokens, k=2 slots, D=4 floats of 4 bytes: 320 bytes of slot rows, half of them to the other
    # rank (W=2): 160 per all-to-all; dispatch + combine = 320; the backward repeats both: 640.
    assert bench.bytes_per_rank(10, 2, 4, 2, 4, backward=False) == 320
    assert bench.bytes_per_rank(10, 2, 4, 2, 4, backward=True) == 640
    assert bench.bytes_per_rank(10, 2, 4, 1, 4, backward=True) == 0  # one rank sends nothing


def test_quick_benchmark_writes_markdown_and_json(tmp_path, capsys, load_script):
    bench = load_script("bench_all_to_all")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| tokens/rank | local | expert-parallel | overhead | EP/local" in table
    (path,) = tmp_path.glob("all_to_all_*.json")
    data = json.loads(path.read_text())
    assert [r["tokens_per_rank"] for r in data["rows"]] == [8, 32] and data["tag"]["world"] == 2
    assert len(data["per_rank"]) == 2
    for row in data["rows"]:
        assert set(row["median_s"]) == {"local", "expert_parallel", "all_to_all", "all_reduce"}
        assert set(row["best_s"]) == set(row["median_s"])
        assert row["ratio"]["best"] > 0 and row["ratio"]["median"] > 0 and row["bytes_sent_per_rank"] > 0
    assert path.with_suffix(".md").read_text().strip() == table.split("\nresults:")[0].strip()
