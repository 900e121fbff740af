"""The layer benchmark runs end to end and reports what it promises (no timing is asserted)."""

import json

from moekit.bench import layer as bench


def test_quick_benchmark_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert bench.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| configuration | moekit ms | efficiency" in table and "Scaling: t(E=8) / t(E=4)" in table
    data = json.loads(out.read_text())
    assert data["tag"]["torch"] and data["tag"]["threads"] == 1
    head = data["rows"][0]
    assert set(head["speedup"]) == {"masked_loop", "onehot_einsum", "nonzero_split"}
    assert head["efficiency"] > 0 and head["memory_vs_limit"] > 0
    assert data["scaling"]["experts"] == [4, 8]
    # The small forward batch is also timed as served, without routing statistics, beside the rest.
    served = [r for r in data["rows"] if "serving" in r]
    assert served and all(r["serving"]["speedup"] > 0 and r["serving"]["roofline_ratio"] > 0 for r in served)
    assert "Serving without routing statistics" in table


def test_baselines_compute_the_same_function_as_a_dense_ffn_with_one_expert():
    # With one expert and k = 1 every baseline is the dense FFN: checks they are real MoE layers.
    import torch

    torch.manual_seed(0)
    x = torch.randn(10, 8)
    for name, cls in bench.BASELINES.items():
        kwargs = {"capacity_factor": 1.0} if name == "onehot_einsum" else {}
        layer = cls(8, 1, 1, 16, **kwargs)
        if hasattr(layer, "experts"):
            fc1, fc2 = layer.experts[0].fc1, layer.experts[0].fc2
            expected = fc2(torch.relu(fc1(x)))
        else:
            expected = torch.relu(x @ layer.w1[0]) @ layer.w2[0]
        torch.testing.assert_close(layer(x), expected, msg=name)


def test_moekit_bench_command_writes_into_out(tmp_path, capsys):
    from moekit.cli import main

    assert main(["bench", "--quick", "--threads", "1", "--repeats", "1", "--only", "E=8", "--out",
                 str(tmp_path)]) == 0
    assert (tmp_path / "bench.json").is_file() and "efficiency" in (tmp_path / "bench.md").read_text()
    assert "E=8" in capsys.readouterr().out


def test_gpu_preset_names_its_sizes_and_the_cpu_names_stay():
    cpu = [c.name for c in bench.default_cases(False, "cpu")]
    # The names the README's reproduce commands select with --only.
    assert "T=8192 E=32 k=4 float32 fwd+bwd noisy_topk dropless" in cpu
    assert "T=4096 E=64 k=2 swiglu float32 fwd+bwd topk dropless" in cpu
    gpu = bench.default_cases(False, "gpu")
    assert [c.name for c in gpu] == [
        f"T=8192 E={e} k={k} D={d} F={f} swiglu bfloat16 {mode} topk dropless"
        for e, k, d, f in ((8, 2, 4096, 14336), (64, 8, 2048, 1024)) for mode in ("fwd", "fwd+bwd")]
    assert all(c.memory and not c.bias and not c.baselines for c in gpu)
    assert bench.resolve_preset("auto", "cuda:0") == "gpu" and bench.resolve_preset("auto", "cpu") == "cpu"
    assert bench.resolve_preset("cpu", "cuda") == "cpu"


def test_gpu_preset_runs_at_tiny_sizes_on_the_cpu(tmp_path, capsys):
    from moekit.cli import main

    assert main(["bench", "--quick", "--preset", "gpu", "--threads", "1", "--repeats", "1", "--only", "E=64",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["tag"]["preset"] == "gpu"
    assert [r["name"] for r in data["rows"]] == [f"T=64 E=64 k=8 D=64 F=128 swiglu bfloat16 {m} topk dropless"
                                                 for m in ("fwd", "fwd+bwd")]
    assert all(r["efficiency"] > 0 and r["memory_vs_limit"] > 0 for r in data["rows"])
    assert "E=64 k=8 D=64 F=128" in capsys.readouterr().out


def test_only_that_matches_no_configuration_of_the_preset_is_an_error(tmp_path, capsys):
    from moekit.cli import main

    assert main(["bench", "--quick", "--preset", "gpu", "--only", "float32", "--out", str(tmp_path)]) == 2
    assert "matches no configuration" in capsys.readouterr().err
