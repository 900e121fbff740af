"""transformers' MoE compute against moekit's in the same model: one Mixtral block, and greedy generation.

Run: ``python benchmarks/bench_hf.py [--threads 2] [--repeats 5]``; ``--quick`` runs tiny shapes to
check that the script works (it measures nothing). Prints Markdown tables and writes
``benchmarks/results/hf_<machine>_<torch>_<date>.json`` and ``.md`` beside it.

Candidates (all float32, on the CPU, timed interleaved: medians of rounds, ``moekit.bench.timing``):
- ``hf-eager``, ``hf-grouped_mm``, ``hf-batched_mm``: transformers' block with each experts
  implementation it offers on the CPU (``batched_mm`` gathers every slot's expert weights, so it is
  skipped where that would take more than ``--gather-budget-gb``);
- ``hf+moekit-experts``: transformers' block, its own router, moekit's expert compute
  (``experts_implementation="moekit"``, registered by ``moekit.hf``);
- ``moekit``: the block replaced by ``moekit.hf.from_hf`` (moekit's router and dispatch too);
- ``moekit-serving`` (generation): the same, its layers built to serve, without routing statistics
  (``replace_moe_blocks(model, routing_stats=False)``: no balancing losses or load counts in eval mode).

1. One block (D=512, F=1024, k=2, SwiGLU: a Mixtral block) at T = 16 and 4096 tokens and E = 8
   and 64, forward (no autograd) and forward+backward.
2. Greedy generation with a Mixtral-shaped model (D=512, 4 layers, E = 8 and 64, vocabulary 1024):
   a 64-token prompt and 64 new tokens, tokens per second of the whole ``generate`` call.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import moekit.hf  # noqa: E402
from moekit.bench.hf import gather_bytes, mixtral_config  # noqa: E402
from moekit.bench.timing import machine_tag, results_path, time_interleaved, write_json  # noqa: E402

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
FULL = {"dim": 512, "hidden": 1024, "k": 2, "tokens": [16, 4096], "experts": [8, 64], "layers": 4, "vocab": 1024,
        "prompt": 64, "new_tokens": 64, "heads": 8}
QUICK = {"dim": 32, "hidden": 64, "k": 2, "tokens": [8, 32], "experts": [4, 8], "layers": 2, "vocab": 64,
         "prompt": 8, "new_tokens": 4, "heads": 4}


def _config(cfg: dict, experts: int, layers: int = 1):
    return mixtral_config(cfg["dim"], cfg["hidden"], experts, cfg["k"], layers=layers, heads=cfg["heads"],
                          vocab=cfg["vocab"], positions=cfg["prompt"] + cfg["new_tokens"])


def _gather_bytes(tokens: int, cfg: dict) -> int:
    return gather_bytes(tokens, cfg["dim"], cfg["hidden"], cfg["k"])


def block_candidates(cfg: dict, experts: int, tokens: int, budget_bytes: float) -> dict[str, torch.nn.Module]:
    """One Mixtral block per candidate, the same weights in all."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = _config(cfg, experts)
    base = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    blocks: dict[str, torch.nn.Module] = {}
    for name in (*HF_IMPLEMENTATIONS, "moekit"):
        if name == "batched_mm" and _gather_bytes(tokens, cfg) > budget_bytes:
            continue
        block = copy.deepcopy(base)
        block.experts.config._experts_implementation_internal = "moekit" if name == "moekit" else name
        blocks["hf+moekit-experts" if name == "moekit" else f"hf-{name}"] = block
    blocks["moekit"] = moekit.hf.from_hf(base)
    return blocks


def _step(block: torch.nn.Module, x: torch.Tensor, backward: bool):
    def run():
        if not backward:
            with torch.no_grad():
                return block(x)
        block.zero_grad(set_to_none=True)
        x.grad = None
        y = block(x)
        (y[0] if isinstance(y, tuple) else y).sum().backward()

    return run


def bench_block(cfg: dict, repeats: int, warmup: int, budget_bytes: float) -> list[dict]:
    rows = []
    for experts in cfg["experts"]:
        for tokens in cfg["tokens"]:
            blocks = block_candidates(cfg, experts, tokens, budget_bytes)
            x = torch.randn(1, tokens, cfg["dim"])
            for backward in (False, True):
                xs = x.clone().requires_grad_(backward)
                fns = {name: _step(block, xs, backward) for name, block in blocks.items()}
                timed = time_interleaved(fns, repeats=repeats, warmup=warmup)
                mode = "forward+backward" if backward else "forward"
                rows.append({"experts": experts, "tokens": tokens, "mode": mode,
                             "median_s": {n: t["median_s"] for n, t in timed.items()},
                             "skipped": sorted({f"hf-{i}" for i in HF_IMPLEMENTATIONS} - set(blocks))})
    return rows


def generation_candidates(cfg: dict, experts: int, budget_bytes: float) -> dict[str, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    base = transformers.MixtralForCausalLM(_config(cfg, experts, cfg["layers"])).eval()
    models: dict[str, torch.nn.Module] = {}
    for name in (*HF_IMPLEMENTATIONS, "moekit"):
        if name == "batched_mm" and _gather_bytes(cfg["prompt"], cfg) > budget_bytes:
            continue
        model = copy.deepcopy(base)
        model.set_experts_implementation(name)
        models["hf+moekit-experts" if name == "moekit" else f"hf-{name}"] = model
    replaced = copy.deepcopy(base)
    moekit.hf.replace_moe_blocks(replaced)
    models["moekit"] = replaced
    serving = copy.deepcopy(base)
    moekit.hf.replace_moe_blocks(serving, routing_stats=False)
    models["moekit-serving"] = serving
    return models


def _generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, outputs: dict, name: str):
    def run():
        with torch.no_grad():
            outputs[name] = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                           do_sample=False)

    return run


def bench_generation(cfg: dict, repeats: int, warmup: int, budget_bytes: float) -> list[dict]:
    rows = []
    prompt = torch.randint(0, cfg["vocab"], (1, cfg["prompt"]), generator=torch.Generator().manual_seed(0))
    for experts in cfg["experts"]:
        models = generation_candidates(cfg, experts, budget_bytes)
        outputs: dict[str, torch.Tensor] = {}
        fns = {name: _generate(model, prompt, cfg["new_tokens"], outputs, name) for name, model in models.items()}
        timed = time_interleaved(fns, repeats=repeats, warmup=warmup)
        reference = outputs["hf-eager"]
        rows.append({"experts": experts, "median_s": {n: t["median_s"] for n, t in timed.items()},
                     "tokens_per_s": {n: cfg["new_tokens"] / t["median_s"] for n, t in timed.items()},
                     "same_tokens_as_eager": {n: bool(torch.equal(o, reference)) for n, o in outputs.items()}})
    return rows


def markdown(block_rows: list[dict], gen_rows: list[dict], cfg: dict, meta: dict) -> str:
    names = ["hf-eager", "hf-grouped_mm", "hf-batched_mm", "hf+moekit-experts", "moekit"]
    lines = [f"Mixtral block D={cfg['dim']} F={cfg['hidden']} k={cfg['k']} SwiGLU, float32, {meta['threads']} "
             f"thread(s), transformers {meta['transformers']}; load average {meta['load_average_1min'][0]:.1f} -> "
             f"{meta['load_average_1min'][1]:.1f}. Milliseconds (median of interleaved rounds); x: time over "
             "hf-eager's. `-`: skipped (batched_mm's gathered weights over the memory budget).", "",
             "| E | T | pass | " + " | ".join(names) + " |", "|---:|---:|---|" + "---:|" * len(names)]
    for r in block_rows:
        eager = r["median_s"]["hf-eager"]
        cells = [f"{1e3 * r['median_s'][n]:.2f} ({r['median_s'][n] / eager:.2f}x)" if n in r["median_s"] else "-"
                 for n in names]
        lines.append(f"| {r['experts']} | {r['tokens']} | {r['mode']} | " + " | ".join(cells) + " |")
    lines += ["", f"Greedy generation, Mixtral-shaped model ({cfg['layers']} layers, D={cfg['dim']}, vocabulary "
                  f"{cfg['vocab']}), prompt {cfg['prompt']}, {cfg['new_tokens']} new tokens: tokens per second "
                  "(and whether the tokens equal hf-eager's).", "",
              "| E | " + " | ".join(names + ["moekit-serving"]) + " |", "|---:|" + "---:|" * (len(names) + 1)]
    for r in gen_rows:
        cells = [f"{r['tokens_per_s'][n]:.1f} ({'same' if r['same_tokens_as_eager'][n] else 'DIFFERENT'})"
                 if n in r["tokens_per_s"] else "-" for n in names + ["moekit-serving"]]
        lines.append(f"| {r['experts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--gather-budget-gb", type=float, default=2.0, help="skip batched_mm above this gather size")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes: checks the benchmark runs, measures nothing (results saved only with --out)")
    p.add_argument("--out", type=Path, help="results directory (default: benchmarks/results)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--skip-block", action="store_true", help="generation only (moekit bench times the blocks too)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    repeats, warmup = (1, 0) if args.quick else (args.repeats, 1)
    budget = args.gather_budget_gb * 1e9
    load_before = os.getloadavg()[0]
    block_rows = [] if args.skip_block else bench_block(cfg, repeats, warmup, budget)
    gen_rows = bench_generation(cfg, repeats, warmup, budget)
    import transformers

    meta = {"threads": args.threads, "transformers": transformers.__version__, "quick": args.quick,
            "load_average_1min": [load_before, os.getloadavg()[0]]}
    table = markdown(block_rows, gen_rows, cfg, meta)
    print(table)
    if not args.no_save and not (args.quick and args.out is None):  # a check run keeps the results as they are
        tag = machine_tag("cpu")
        path = results_path(args.out or Path(__file__).resolve().parent / "results", "hf", tag)
        write_json(path, {"tag": tag, "meta": meta, "config": cfg, "block": block_rows, "generation": gen_rows})
        path.with_suffix(".md").write_text(table + "\n")
        print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
