"""benchmarks/fsdp_memory.py on a tiny model: the bytes each rank holds are what the layouts promise."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("fsdp_memory", ROOT / "benchmarks" / "fsdp_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fsdp_memory"] = module  # the spawned ranks import the worker from it by name
    spec.loader.exec_module(module)
    return module


def test_layout_names():
    bench = _load()
    assert bench.parse_layout("single") == (1, None, False)
    assert bench.parse_layout("today-4") == (4, None, False)
    assert bench.parse_layout("2x4-fsdp") == (8, 4, True)
    assert bench.parse_layout("3x1-replicate") == (3, 1, False)
    with pytest.raises(ValueError, match="'2x2-zero'"):
        bench.parse_layout("2x2-zero")
    # torch.chunk pieces: 3 rows over 4 ranks are 1, 1, 1, 0; 13 rows are 4, 4, 4, 1.
    assert [bench._rows_on_rank(3, 4, r) for r in range(4)] == [1, 1, 1, 0]
    assert [bench._rows_on_rank(13, 4, r) for r in range(4)] == [4, 4, 4, 1]


def test_fsdp_ranks_hold_a_partition_of_the_one_process_bytes(tmp_path, capsys):
    bench = _load()
    assert bench.main(["--quick", "--layouts", "single,1x2-fsdp", "--out", str(tmp_path)]) == 0
    assert "| 1x2-fsdp | 2 |" in capsys.readouterr().out
    (path,) = tmp_path.glob("fsdp_memory_*.json")
    rows = {row["layout"]: row["per_rank"] for row in json.loads(path.read_text())["rows"]}

    def held(r):
        return r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"]

    (single,) = rows["single"]
    assert held(single) == single["expected_bytes"]
    # Weights, gradients and moments are cut into pieces that add up to the whole; only Adam's
    # 4-byte step scalar is repeated on the second rank, once per parameter tensor.
    num_tensors = (single["optim_bytes"] - 2 * single["params_bytes"]) // 4  # Adam: 2 moments + a step each
    assert sum(held(r) for r in rows["1x2-fsdp"]) == held(single) + 4 * num_tensors
    for r in rows["1x2-fsdp"]:
        assert held(r) == r["expected_bytes"]
        assert 0.3 * held(single) < held(r) < 0.7 * held(single)  # about half each
