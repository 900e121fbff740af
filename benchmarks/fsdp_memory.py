"""Memory per rank by layout: parameters, gradients and Adam state of the lm job's moe-256 model.

Run: ``PYTHONPATH=src python benchmarks/fsdp_memory.py [--dim 512 --vocab-size 16000] [--layouts ...]``.
Prints a Markdown table and writes ``benchmarks/results/fsdp_memory_<machine>_<torch>_<date>.json``
and ``.md`` beside it.

The model is ``moekit.models.lstm_lm.LSTMLM`` named ``moe-256`` (256 experts D -> 2D -> D, noisy
top-4), as ``moekit lm`` builds it; the default width is the paper preset's (D = 512, a 16000-word
vocabulary). Each layout runs on W local gloo processes (``spawn_local``): every rank builds the model
on the meta device, parallelizes it, materialises only its own pieces (``to_empty``) and runs one
training step (forward, backward, ``ParallelTraining.clip_and_step`` with Adam) on ``--rows`` rows
of ``--seq-len`` tokens (``single``: one spawned process, plain torch). Then it counts the bytes of
the tensors it holds: its pieces of the parameters, of their gradients and of Adam's state
(DTensors by their local shard). These counts are exact and are checked against a formula from the
shapes alone (``expected_bytes``); the peak resident memory of the process (above what it held
before building the model) is reported beside them and includes the transient buffers of the step
(FSDP's gathered expert block, activations).

Layouts (``--layouts``): ``single`` (one process), ``today-W`` (``parallelize(model)``: experts over
W ranks, the rest replicated), ``RxP-fsdp`` / ``RxP-replicate`` (the ("dp", "ep") mesh, R replicas of
an expert-parallel group of P ranks).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# The spawned ranks import this script's worker by module name: its folder must be on their path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moekit.bench.timing import machine_tag, results_path, write_json  # noqa: E402
from moekit.models.lstm_lm import LSTMLM, LSTMLMConfig  # noqa: E402
from moekit.parallel import ParallelTraining, counting_collectives, spawn_local  # noqa: E402
from moekit.parallel.groups import COLLECTIVES  # noqa: E402

DEFAULT_LAYOUTS = ("single", "today-4", "2x2-replicate", "2x2-fsdp", "1x4-fsdp", "4x1-fsdp")
MIB = 2**20


def parse_layout(name: str) -> tuple[int, int | None, bool]:
    """(ranks W, ep_size or None for today's layout, fsdp) of a layout name."""
    if name == "single":
        return 1, None, False
    if name.startswith("today-"):
        return int(name.removeprefix("today-")), None, False
    grid, _, mode = name.partition("-")
    replicas, _, ep = grid.partition("x")
    if mode not in ("fsdp", "replicate") or not replicas.isdigit() or not ep.isdigit():
        raise ValueError(f"layout {name!r} is not single, today-W, RxP-fsdp or RxP-replicate")
    return int(replicas) * int(ep), int(ep), mode == "fsdp"


def _rows_on_rank(rows: int, ranks: int, rank: int) -> int:
    """Rows of a tensor's dim 0 that FSDP puts on ``rank`` of ``ranks`` (torch.chunk: ceil-sized pieces)."""
    chunk = math.ceil(rows / ranks)
    return max(0, min(chunk, rows - rank * chunk))


def expected_bytes(model: LSTMLM, layout: str, rank: int) -> int:
    """Bytes of parameters + gradients + Adam state that ``rank`` holds, from the shapes alone.

    ``model``: the whole single-process model (any device, meta included). Expert weights are [E, ...]:
    a rank keeps E/P of them (P = W for today's layout), cut further over the R replicas with FSDP;
    a dense parameter is whole on every rank, or one ``torch.chunk`` piece of W with FSDP. Adam holds
    two moments shaped like the parameter and a float32 ``step`` per parameter.
    """
    world, ep, fsdp = parse_layout(layout)
    ep = world if ep is None else ep
    replicas = world // ep
    d_rank = rank // ep
    total = 0
    for name, p in model.named_parameters():
        row_bytes = p[0].numel() * p.element_size() if p.dim() else p.element_size()
        if ".experts." in name:
            rows = p.shape[0] // ep
            rows = _rows_on_rank(rows, replicas, d_rank) if fsdp else rows
        else:
            rows = _rows_on_rank(p.shape[0], world, rank) if fsdp else p.shape[0]
        total += 4 * rows * row_bytes + 4  # weight, gradient, two moments; Adam's step
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from /proc/self/status.

    Not ``getrusage``'s ``ru_maxrss``: after fork + exec it reports the parent's peak too.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(rank: int, world: int, layout: str, cfg: LSTMLMConfig, rows: int, seq_len: int) -> dict:
    """One training step of ``layout`` on this rank: bytes held, peak memory, collectives."""
    torch.set_num_threads(1)
    _, ep, fsdp = parse_layout(layout)
    start_rss = _status_mib("VmRSS")
    model = LSTMLM(cfg, device="meta")
    par = None if layout == "single" else ParallelTraining(ep_size=ep, fsdp=fsdp)
    if par is not None:
        model = par.parallelize(model)
    model.to_empty(device="cpu")
    torch.manual_seed(rank)
    with torch.no_grad():  # values do not matter here, only that the step stays finite
        for p in model.parameters():
            _local(p).normal_(0, 0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (world * rows, seq_len + 1), generator=gen)[rank * rows:(rank + 1) * rows]
    with counting_collectives() as counts:
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        if par is not None:
            par.clip_and_step(model, opt, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    params = list(model.parameters())
    moments = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    peak_rss = _status_mib("VmHWM")
    return {"rank": rank, "params_bytes": _nbytes(params), "grads_bytes": _nbytes(p.grad for p in params),
            "optim_bytes": _nbytes(moments), "expected_bytes": expected_bytes(LSTMLM(cfg, device="meta"), layout, rank),
            "peak_rss_above_start_mib": peak_rss - start_rss, "collectives": dict(counts),
            "loss": float(loss)}


def run_layout(layout: str, cfg: LSTMLMConfig, rows: int, seq_len: int) -> list[dict]:
    world, _, _ = parse_layout(layout)
    # Every layout in fresh processes (one process too): the peaks are then each layout's own.
    return spawn_local(measure, world, (layout, cfg, rows, seq_len), timeout_s=600.0)


def _collectives(calls: dict) -> str:
    total = sum(calls.values())
    parts = ", ".join(f"{calls[n]} {n}" for n in COLLECTIVES if calls.get(n))
    return f"{total} ({parts})" if parts else "0"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "MiB per rank (the largest rank), one training step; 'exact' compares the bytes held with "
             "`expected_bytes`.", "",
             "| layout | ranks | parameters | gradients | Adam state | total | exact | peak RSS above start | "
             "collectives per step (rank 0) |", "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in rows:
        worst = max(row["per_rank"], key=lambda r: r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"])
        total = worst["params_bytes"] + worst["grads_bytes"] + worst["optim_bytes"]
        exact = all(r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"] == r["expected_bytes"]
                    for r in row["per_rank"])
        peak = max(r["peak_rss_above_start_mib"] for r in row["per_rank"])
        lines.append(f"| {row['layout']} | {row['ranks']} | {worst['params_bytes'] / MIB:.0f} | "
                     f"{worst['grads_bytes'] / MIB:.0f} | {worst['optim_bytes'] / MIB:.0f} | {total / MIB:.0f} | "
                     f"{'yes' if exact else 'NO'} | {peak:.0f} | {_collectives(row['per_rank'][0]['collectives'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512, help="model width D (experts D -> 2D -> D)")
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--model", default="moe-256", help="an lm model name (moe-E or moe-E-h)")
    p.add_argument("--rows", type=int, default=2, help="rows per rank")
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="a tiny model (D=16, vocab 50): checks the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.vocab_size = 16, 50
    cfg = LSTMLMConfig(args.model, vocab_size=args.vocab_size, dim=args.dim, dropout=0.0)
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for name in layouts:
        parse_layout(name)  # fail before running anything
    rows = []
    for name in layouts:
        per_rank = run_layout(name, cfg, args.rows, args.seq_len)
        rows.append({"layout": name, "ranks": len(per_rank), "per_rank": per_rank})
    # "threads": each rank runs one (``measure``), whatever this process has.
    tag = {**machine_tag("cpu"), "threads": 1, "model": args.model, "dim": args.dim, "vocab_size": args.vocab_size,
           "rows_per_rank": args.rows, "seq_len": args.seq_len}
    header = (f"{args.model} (D={args.dim}, vocabulary {args.vocab_size}), float32, Adam; torch {torch.__version__}, "
              f"gloo on CPU")
    table = markdown(rows, header)
    print(table)
    path = results_path(Path(args.out), "fsdp_memory", tag)
    write_json(path, {"tag": tag, "rows": rows})
    path.with_suffix(".md").write_text(table + "\n")
    if not all(r["params_bytes"] + r["grads_bytes"] + r["optim_bytes"] == r["expected_bytes"]
               for row in rows for r in row["per_rank"]):
        print("bytes held differ from expected_bytes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
