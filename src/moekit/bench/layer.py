"""Benchmark moekit's MoE layer against the dense-FLOPs limit and the baselines, side by side.

Run: ``moekit bench [--json FILE]`` or ``python -m moekit.bench.layer``. Prints a Markdown table;
with ``--json`` writes the raw timings. Ratios only: efficiency = t(limit) / t(moekit) where the
limit is a dense FFN applied to T*k tokens (the same active FLOPs); speedup(b) = t(b) / t(moekit).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

import moekit
from moekit.bench import hf, roofline
from moekit.bench.baselines import DenseFFN, MaskedLoopMoE, NonzeroSplitMoE, OneHotEinsumMoE
from moekit.bench.timing import machine_tag, peak_memory, results_path, time_interleaved, write_json
from moekit.memory import keep_freed_memory

BASELINES = {"masked_loop": MaskedLoopMoE, "onehot_einsum": OneHotEinsumMoE, "nonzero_split": NonzeroSplitMoE}


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    tokens: int = 8192
    dim: int = 512
    hidden: int = 1024
    experts: int = 32
    k: int = 4
    dtype: str = "float32"
    backward: bool = True
    router: str = "noisy_topk"
    capacity_factor: float | None = None
    baselines: tuple[str, ...] = ()
    memory: bool = False
    compile: bool = False  # also time torch.compile(moe)
    activation: str = "relu"
    bias: bool = True
    roofline: bool = False  # also the memory roofline of the forward pass (moekit.bench.roofline)
    hf: bool = False  # a Mixtral block: moekit vs transformers' experts implementations, the same weights

    @property
    def name(self) -> str:
        mode = "fwd+bwd" if self.backward else "fwd"
        cap = "dropless" if self.capacity_factor is None else f"cf={self.capacity_factor}"
        act = "" if self.activation == "relu" else f" {self.activation}"
        # D and F are named where they are not the CPU grid's 512 and 1024.
        dims = "" if (self.dim, self.hidden) == (512, 1024) else f" D={self.dim} F={self.hidden}"
        return (f"T={self.tokens} E={self.experts} k={self.k}{dims}{act} {self.dtype} {mode} {self.router} {cap}")


PRESETS = ("auto", "cpu", "gpu")


def default_cases(quick: bool, preset: str = "cpu") -> list[Case]:
    """The configurations of a preset: "cpu" (the grid the README quotes, D=512, F=1024) or "gpu"
    (``gpu_cases``); ``quick``: tiny shapes of the same kinds, to check that the benchmark runs."""
    if preset not in ("cpu", "gpu"):
        raise ValueError(f"preset {preset!r}: one of 'cpu', 'gpu'")
    if preset == "gpu":
        return gpu_cases(quick)
    if quick:
        base = Case(tokens=64, dim=16, hidden=32, experts=4, k=2)
        mix = replace(base, activation="swiglu", bias=False, router="topk", hf=hf.available())
        return [replace(base, baselines=tuple(BASELINES), memory=True), replace(base, experts=8),
                replace(base, experts=8, capacity_factor=1.25, router="topk"), mix,
                replace(mix, tokens=4, backward=False, roofline=True)]
    head = Case(baselines=tuple(BASELINES), memory=True, compile=True)
    cases = [replace(head, experts=e) for e in (4, 32, 256)]
    e32 = Case(experts=32)
    cases += [replace(e32, dtype="bfloat16"), replace(e32, router="topk"), replace(e32, capacity_factor=1.25),
              replace(e32, backward=False), replace(e32, k=2), replace(e32, experts=256, k=2)]
    small = Case(tokens=16, backward=False, baselines=tuple(BASELINES))
    cases += [replace(small, experts=e) for e in (32, 256)]
    # Mixtral-shaped blocks (SwiGLU experts without biases, softmax top-2): large batches against the
    # dense SwiGLU limit, small ones against the memory roofline; transformers' implementations beside.
    mix = Case(tokens=4096, k=2, activation="swiglu", bias=False, router="topk", hf=hf.available())
    cases += [replace(mix, experts=e, backward=b) for e in (8, 64) for b in (False, True)]
    cases += [replace(mix, tokens=t, experts=e, backward=False, roofline=True)
              for t in (1, 4, 16, 64) for e in (8, 64)]
    cases += [replace(mix, tokens=16, experts=e) for e in (8, 64)]
    return cases


def gpu_cases(quick: bool) -> list[Case]:
    """bfloat16 blocks at GPU sizes, forward and forward+backward, T=8192, against the dense
    bfloat16 SwiGLU FFN of the same active FLOPs and transformers' experts implementations on the
    same weights: Mixtral-8x7B's experts (D=4096, F=14336, E=8, k=2) and a fine-grained shape
    (OLMoE's D=2048, F=1024, E=64, k=8). ``quick``: the same kinds at D=64, F=128, T=64."""
    mix = Case(tokens=8192, dim=4096, hidden=14336, experts=8, k=2, dtype="bfloat16", activation="swiglu",
               bias=False, router="topk", hf=hf.available(), memory=True)
    fine = replace(mix, dim=2048, hidden=1024, experts=64, k=8)
    if quick:
        mix, fine = (replace(c, tokens=64, dim=64, hidden=128) for c in (mix, fine))
    return [replace(c, backward=b) for c in (mix, fine) for b in (False, True)]


def _build(case: Case, device: str):
    dtype = getattr(torch, case.dtype)
    hf_blocks: dict[str, Any] = {}
    if case.hf:  # the same weights in moekit and in transformers' block
        moe, hf_blocks = hf.mixtral_candidates(case.dim, case.hidden, case.experts, case.k, case.tokens, dtype)
        moe = moe.to(device)
    else:
        moe = moekit.MoE(case.dim, case.experts, case.k, case.hidden, router=case.router,
                         capacity_factor=case.capacity_factor, activation=case.activation, bias=case.bias,
                         device=device, dtype=dtype)
    limit = DenseFFN(case.dim, case.hidden, dtype=dtype, activation=case.activation, bias=case.bias)
    models: dict[str, Any] = {"moekit": moe, "limit": limit.to(device)}
    models.update({name: block.to(device) for name, block in hf_blocks.items()})
    if case.roofline and not case.backward:  # serving: the same layer (same weights) without statistics
        serving: Any = copy.copy(moe)
        serving.routing_stats = False
        models["moekit_serving"] = serving
    if case.compile:
        models["compiled"] = torch.compile(moe)
    for name in case.baselines:
        models[name] = BASELINES[name](case.dim, case.experts, case.k, case.hidden, dtype=dtype).to(device)
    x = torch.randn(case.tokens, case.dim, dtype=dtype, device=device)
    x_limit = torch.randn(case.tokens * case.k, case.dim, dtype=dtype, device=device)
    return models, x, x_limit


def _step(model, x, backward: bool):
    params = [p for p in model.parameters()]
    x = x.detach().requires_grad_(backward)

    def run():
        for p in params:
            p.grad = None  # optimizer.zero_grad(set_to_none=True): every step allocates fresh grads
        if not backward:
            with torch.no_grad():
                return model(x)
        out = model(x)
        if isinstance(out, moekit.MoEOutput):
            loss = out.y.float().sum() + out.aux_loss
        else:
            loss = (out[0] if isinstance(out, tuple) else out).float().sum()
        loss.backward()

    return run


def run_case(case: Case, device: str, repeats: int) -> dict:
    models, x, x_limit = _build(case, device)
    for m in models.values():
        m.train(case.backward)
    inputs = {"limit": x_limit, **{name: x[None] for name in models if name.startswith("hf_")}}  # HF: [1, T, D]
    fns = {name: _step(m, inputs.get(name, x), case.backward) for name, m in models.items()}
    # Rounds of at least 50 ms: a millisecond call is timed in a steady loop (see time_interleaved).
    timings = time_interleaved(fns, repeats=repeats, warmup=2, device=device, budget_s=20.0, min_round_s=0.05)
    t = {name: r["median_s"] for name, r in timings.items()}
    row = {"case": asdict(case), "name": case.name, "median_s": t,
           "samples": {n: r["samples"] for n, r in timings.items()},
           "times_s": {n: r["times_s"] for n, r in timings.items()},
           "efficiency": t["limit"] / t["moekit"],
           "speedup": {b: t[b] / t["moekit"] for b in case.baselines},
           "hf_speedup": {n: t[n] / t["moekit"] for n in t if n.startswith("hf_")}}
    if "moekit_serving" in t:
        row["serving"] = {"speedup": t["moekit"] / t["moekit_serving"],
                          "hf_speedup": {n: t[n] / t["moekit_serving"] for n in t if n.startswith("hf_")}}
    if case.roofline:
        dtype = getattr(torch, case.dtype)
        bandwidth, rate = roofline.read_bandwidth(dtype), roofline.matmul_rate(dtype, dim=case.dim, hidden=case.hidden)
        row["roofline"] = {"read_bytes_per_s": bandwidth, "matmul_flop_per_s": rate,
                           "touched_experts": roofline.touched_experts(models["moekit"], x),
                           "seconds": roofline.roofline_seconds(models["moekit"], x, bandwidth, rate)}
        row["roofline_ratio"] = t["moekit"] / row["roofline"]["seconds"]
        if "serving" in row:
            row["serving"]["roofline_ratio"] = t["moekit_serving"] / row["roofline"]["seconds"]
    if case.compile:
        row["compile_speedup"] = t["moekit"] / t["compiled"]
    if case.memory:
        mem = {n: peak_memory(fns[n], device) for n in ("moekit", "limit")}
        row["peak_memory_bytes"] = mem
        moekit_bytes, limit_bytes = mem["moekit"], mem["limit"]
        row["memory_vs_limit"] = moekit_bytes / limit_bytes if moekit_bytes is not None and limit_bytes else None
    return row


def scaling(rows: list[dict]) -> dict:
    """t(E=max)/t(E=min) among the rows that differ from the first only in the number of experts."""
    def key(r):
        return {**r["case"], "experts": None, "baselines": None, "memory": None}

    same = [r for r in rows if key(r) == key(rows[0])] if rows else []
    if len(same) < 2:
        return {}
    lo = min(same, key=lambda r: r["case"]["experts"])
    hi = max(same, key=lambda r: r["case"]["experts"])
    return {"experts": [lo["case"]["experts"], hi["case"]["experts"]],
            "ratio": hi["median_s"]["moekit"] / lo["median_s"]["moekit"]}


def markdown(rows: list[dict], scale: dict) -> str:
    """One table of every ratio: efficiency against the dense limit, the memory roofline of small
    batches, speedups over the baselines and over transformers' experts implementations."""
    names = list(BASELINES)
    hf_names = [f"hf_{i}" for i in hf.IMPLEMENTATIONS]
    lines = ["| configuration | moekit ms | efficiency (limit/moekit) | moekit/roofline | "
             + " | ".join(f"x vs {b}" for b in names + hf_names) + " | memory vs limit | torch.compile speedup |",
             "|---" * (6 + len(names) + len(hf_names)) + "|"]
    for r in rows:
        sp = [f"{r['speedup'][b]:.1f}x" if b in r["speedup"] else "" for b in names]
        sp += [f"{r['hf_speedup'][b]:.2f}x" if b in r.get("hf_speedup", {}) else "" for b in hf_names]
        mem, roof = r.get("memory_vs_limit"), r.get("roofline_ratio")
        lines.append(f"| {r['name']} | {1e3 * r['median_s']['moekit']:.1f} | {r['efficiency']:.2f} | "
                     f"{'' if roof is None else f'{roof:.2f}'} | "
                     + " | ".join(sp) + f" | {'' if mem is None else f'{mem:.2f}'} | "
                     + (f"{r['compile_speedup']:.2f}x |" if "compile_speedup" in r else " |"))
    served = [r for r in rows if "serving" in r]
    if served:
        lines += ["", "Serving without routing statistics (`routing_stats=False`, eval mode; same layer and weights):",
                  "", "| configuration | ms | x vs with statistics | /roofline | "
                  + " | ".join(f"x vs {b}" for b in hf_names) + " |", "|---" * (4 + len(hf_names)) + "|"]
        for r in served:
            sv = r["serving"]
            roof = sv.get("roofline_ratio")
            lines.append(f"| {r['name']} | {1e3 * r['median_s']['moekit_serving']:.2f} | {sv['speedup']:.2f}x | "
                         f"{'' if roof is None else f'{roof:.2f}'} | "
                         + " | ".join(f"{sv['hf_speedup'][b]:.2f}x" if b in sv["hf_speedup"] else "" for b in hf_names)
                         + " |")
    if scale:
        lo, hi = scale["experts"]
        lines.append(f"\nScaling: t(E={hi}) / t(E={lo}) = {scale['ratio']:.2f}")
    roofs = [r["roofline"] for r in rows if "roofline" in r]
    if roofs:
        lines.append(f"\nRoofline: read bandwidth {roofs[0]['read_bytes_per_s'] / 1e9:.1f} GB/s, dense matmul "
                     f"{roofs[0]['matmul_flop_per_s'] / 1e9:.0f} GFLOP/s (measured in this run).")
    return "\n".join(lines)


def resolve_preset(preset: str, device: str) -> str:
    """``--preset auto``: the GPU configurations on a CUDA device, the CPU grid elsewhere."""
    if preset != "auto":
        return preset
    return "gpu" if torch.device(device).type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moekit bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path,
                   help="write raw results here (default: benchmarks/results/<tag>.json under the current directory)")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    p.add_argument("--no-save", action="store_true", help="do not write a results file")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the benchmark runs, measures nothing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=PRESETS, default="auto",
                   help="the configurations: cpu (D=512, F=1024, float32 and bfloat16), gpu (bfloat16 at "
                        "Mixtral-8x7B's and a fine-grained E=64, k=8 size); auto: gpu on a CUDA device, else cpu")
    p.add_argument("--only", help="run only cases whose name contains this text")
    p.add_argument("--no-baselines", action="store_true", help="time moekit against the limit only")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory for every candidate (moekit.memory.keep_freed_memory), "
                        "as jemalloc/tcmalloc do; default: glibc as configured, fresh pages every step")
    args = p.parse_args(argv)
    kept = args.malloc == "keep" and keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = resolve_preset(args.preset, args.device)
    cases = [c for c in default_cases(args.quick, preset) if not args.only or args.only in c.name]
    if args.no_baselines:
        cases = [replace(c, baselines=(), memory=False, compile=False) for c in cases]
    if args.device.startswith("cuda"):
        cases = [replace(c, dtype="bfloat16") if c.dtype == "float32" else c for c in cases]
    rows = []
    for case in cases:
        rows.append(run_case(case, args.device, 1 if args.quick else args.repeats))
        print(f"  {case.name}: efficiency {rows[-1]['efficiency']:.2f}", file=sys.stderr, flush=True)
    scale = scaling(rows)
    tag = {**machine_tag(args.device), "malloc": "keep" if kept else "default", "preset": preset}
    table = markdown(rows, scale)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"{table}\n\n{json.dumps(tag)}\n")
    if not args.no_save:
        path = args.json or results_path(Path("benchmarks") / "results", "layer" if kept else "layer-malloc-default",
                                         tag)
        write_json(path, {"tag": tag, "rows": rows, "scaling": scale})
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
