"""All-to-all overhead of expert parallelism vs tokens per rank, on local CPU processes (gloo).

Run: ``python benchmarks/bench_all_to_all.py [--world 2] [--tokens 64 256 1024 4096] [--forward-only]``.
Prints a Markdown table and writes ``benchmarks/results/all_to_all[_forward]_<machine>_<torch>_<date>.json``
and ``.md`` beside it.

For each number T of tokens per rank, every rank times, interleaved (see ``timing.py``):
- ``local``: the single-device MoE layer with all E experts on its own T tokens (what a data-parallel
  replica without expert parallelism computes: the same expert FLOPs per rank);
- ``expert_parallel``: the same layer after ``apply_expert_parallel`` (E/W experts per rank, tokens
  exchanged all-to-all), on the same T tokens;
- ``all_to_all``: one bare ``all_to_all_single`` of the k*T token rows, evenly split;
- ``all_reduce``: one all-reduce of E floats, the latency of the small collectives (statistics,
  counts) that an expert-parallel layer adds.
Each candidate starts with a barrier, so ranks start together; the slowest rank's median and
best time are reported. On a shared machine the best time is the better estimate of what a step
costs when both ranks are running: a collective waits for the last rank to be scheduled, and the
median then measures the scheduler. The overhead of expert parallelism is ``expert_parallel - local``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# The spawned ranks import this script's worker by module name: its folder must be on their path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import moekit  # noqa: E402
from moekit.bench.timing import machine_tag, results_path, time_interleaved, write_json  # noqa: E402
from moekit.parallel import apply_expert_parallel, spawn_local  # noqa: E402

CANDIDATES = ("local", "expert_parallel", "all_to_all", "all_reduce")


def _layer_step(moe, x, backward: bool):
    def run():
        dist.barrier()
        for p in (x, *moe.parameters()):
            p.grad = None
        if not backward:
            with torch.no_grad():
                return moe(x)
        out = moe(x)
        (out.y.sum() + out.aux_loss).backward()

    return run


def _all_to_all_step(rows_KT_D: torch.Tensor, world: int):
    splits = [len(part) for part in rows_KT_D.tensor_split(world)]
    out = torch.empty_like(rows_KT_D)

    def run():
        dist.barrier()
        dist.all_to_all_single(out, rows_KT_D, splits, splits)

    return run


def _all_reduce_step(num_experts: int):
    stats_E = torch.zeros(num_experts)

    def run():
        dist.barrier()
        dist.all_reduce(stats_E)

    return run


def measure_rank(rank: int, world: int, cfg: dict) -> list[dict]:
    """Per token count: this rank's median seconds of each candidate."""
    results = []
    for tokens in cfg["tokens"]:
        torch.manual_seed(0)  # the same weights on every rank, as after parallelize's broadcast
        local = moekit.MoE(cfg["dim"], cfg["experts"], cfg["k"], cfg["hidden"], router="topk")
        expert_parallel = apply_expert_parallel(copy.deepcopy(local))
        torch.manual_seed(1 + rank)
        # Inside a network the layer's input needs a gradient (it comes from trainable layers).
        x = torch.randn(tokens, cfg["dim"]).requires_grad_(cfg["backward"])
        fns = {"local": _layer_step(local, x, cfg["backward"]),
               "expert_parallel": _layer_step(expert_parallel, x, cfg["backward"]),
               "all_to_all": _all_to_all_step(torch.randn(cfg["k"] * tokens, cfg["dim"]), world),
               "all_reduce": _all_reduce_step(cfg["experts"])}
        timings = time_interleaved(fns, repeats=cfg["repeats"], warmup=2)
        results.append({"tokens": tokens, "median_s": {n: t["median_s"] for n, t in timings.items()},
                        "best_s": {n: min(t["times_s"]) for n, t in timings.items()}})
    return results


def bytes_per_rank(tokens: int, k: int, dim: int, world: int, itemsize: int, backward: bool) -> int:
    """Bytes of token rows one rank sends to other ranks in one step: k*T slots, (W-1)/W of them
    remote under uniform routing, there and back (2 all-to-alls), and twice that with the backward."""
    one_way = k * tokens * dim * itemsize * (world - 1) / world
    return int(one_way * 2 * (2 if backward else 1))


def summarise(per_rank: list[list[dict]], cfg: dict) -> list[dict]:
    rows = []
    for i, tokens in enumerate(cfg["tokens"]):
        median = {n: max(r[i]["median_s"][n] for r in per_rank) for n in CANDIDATES}
        best = {n: max(r[i]["best_s"][n] for r in per_rank) for n in CANDIDATES}
        rows.append({
            "tokens_per_rank": tokens, "median_s": median, "best_s": best,
            "overhead_s": {"median": median["expert_parallel"] - median["local"],
                           "best": best["expert_parallel"] - best["local"]},
            "ratio": {"median": median["expert_parallel"] / median["local"],
                      "best": best["expert_parallel"] / best["local"]},
            "bytes_sent_per_rank": bytes_per_rank(tokens, cfg["k"], cfg["dim"], cfg["world"], 4, cfg["backward"]),
        })
    return rows


def markdown(rows: list[dict], cfg: dict) -> str:
    mode = "forward+backward" if cfg["backward"] else "forward"
    head = (f"W={cfg['world']} ranks (gloo, {cfg['threads']} thread each), E={cfg['experts']} k={cfg['k']} "
            f"D={cfg['dim']} F={cfg['hidden']}, float32, {mode}; machine load average "
            f"{cfg['load_average_1min'][0]:.1f} -> {cfg['load_average_1min'][1]:.1f}\n\n"
            "Milliseconds, best (median) of the repeats, slowest rank.\n\n"
            "| tokens/rank | local | expert-parallel | overhead | EP/local | one all-to-all | one small all-reduce "
            "| MB sent/rank/step |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        b, m = r["best_s"], r["median_s"]
        cells = [f"{1e3 * b[n]:.2f} ({1e3 * m[n]:.2f})" for n in ("local", "expert_parallel")]
        cells += [f"{1e3 * r['overhead_s']['best']:.2f} ({1e3 * r['overhead_s']['median']:.2f})",
                  f"{r['ratio']['best']:.2f} ({r['ratio']['median']:.2f})"]
        cells += [f"{1e3 * b[n]:.2f} ({1e3 * m[n]:.2f})" for n in ("all_to_all", "all_reduce")]
        lines.append(f"| {r['tokens_per_rank']} | " + " | ".join(cells) + f" | {r['bytes_sent_per_rank'] / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="processes (ranks)")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096], help="tokens per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the benchmark runs, measures nothing")
    p.add_argument("--out", type=Path, help="results directory (default: benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    cfg = {"world": args.world, "tokens": args.tokens, "dim": args.dim, "hidden": args.hidden,
           "experts": args.experts, "k": args.k, "threads": args.threads, "repeats": args.repeats,
           "backward": not args.forward_only}
    if args.quick:
        cfg.update(tokens=[8, 32], dim=16, hidden=32, experts=4, repeats=1)
    if cfg["experts"] % cfg["world"]:
        p.error(f"--experts {cfg['experts']} must be divisible by --world {cfg['world']}")
    # The machine's load average before and after: on a shared machine, it says what the timings are worth.
    load_before = os.getloadavg()[0]
    per_rank = spawn_local(measure_rank, cfg["world"], (cfg,), timeout_s=600.0, threads=cfg["threads"])
    cfg["load_average_1min"] = [load_before, os.getloadavg()[0]]
    rows = summarise(per_rank, cfg)
    table = markdown(rows, cfg)
    print(table)
    if not args.no_save:
        tag = {**machine_tag("cpu"), "threads": cfg["threads"], "world": cfg["world"]}
        stem = "all_to_all" if cfg["backward"] else "all_to_all_forward"
        path = results_path(args.out or Path(__file__).resolve().parent / "results", stem, tag)
        write_json(path, {"tag": tag, "config": cfg, "rows": rows, "per_rank": per_rank})
        path.with_suffix(".md").write_text(table + "\n")
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
