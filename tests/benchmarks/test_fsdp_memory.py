"""benchmarks/fsdp_memory.py on a tiny model: the bytes each rank holds are what the layouts promise."""

import json

import pytest

from moekit.models.lstm_lm import LSTMLM, LSTMLMConfig


def test_layout_names(load_script):
    bench = load_script("fsdp_memory")
    assert bench.parse_layout("single") == (1, None, False)
    assert bench.parse_layout("today-4") == (4, None, False)
    assert bench.parse_layout("2x4-fsdp") == (8, 4, True)
    assert bench.parse_layout("3x1-replicate") == (3, 1, False)
    with pytest.raises(ValueError, match="'2x2-zero'"):
        bench.parse_layout("2x2-zero")
    # torch.chunk pieces: 3 rows over 4 ranks are 1, 1, 1, 0; 13 rows are 4, 4, 4, 1.
    assert [bench._rows_on_rank(3, 4, r) for r in range(4)] == [1, 1, 1, 0]
    assert [bench._rows_on_rank(13, 4, r) for r in range(4)] == [4, 4, 4, 1]


def test_fsdp_ranks_hold_a_partition_of_the_one_process_bytes(tmp_path, capsys, load_script):
    bench = load_script("fsdp_memory")
    assert bench.main(["--quick", "--layouts", "1x2-fsdp", "--out", str(tmp_path)]) == 0
    assert "| 1x2-fsdp | 2 |" in capsys.readouterr().out
    (path,) = tmp_path.glob("fsdp_memory_*.json")
    (row,) = json.loads(path.read_text())["rows"]
    # One process holds 16 bytes per float32 parameter (weight, gradient, Adam's two moments) and
    # Adam's 4-byte step per parameter tensor.
    params = list(LSTMLM(LSTMLMConfig("moe-256", vocab_size=50, dim=16, dropout=0.0), device="meta").parameters())
    one_process = 16 * sum(p.numel() for p in params) + 4 * len(params)
    # FSDP cuts weights, gradients and moments into pieces that add up to the whole; only the step
    # is repeated, on the second rank.
    held = [r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"] for r in row["per_rank"]]
    assert sum(held) == one_process + 4 * len(params)
    for r, h in zip(row["per_rank"], held, strict=True):
        assert h == r["expected_bytes"]
        assert 0.3 * one_process < h < 0.7 * one_process  # about half each
