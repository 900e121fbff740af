"""Collectives one expert-parallel MoE layer makes per training step, by router and dispatch.

Run: ``python benchmarks/count_collectives.py [--world 2]``. Prints a Markdown table.

Each configuration builds a layer on every rank (gloo, CPU), applies ``apply_expert_parallel`` and
runs one forward and one backward of ``y.sum() + aux_loss`` on 24 tokens per rank, counting the
calls of ``torch.distributed``'s collectives. The counts do not depend on the token count: at small
batches each collective costs about one round trip, whatever its size, so this is the latency an
expert-parallel layer adds on top of moving the token rows.
"""

from __future__ import annotations

import argparse

import torch

import moekit
from moekit.parallel import apply_expert_parallel, counting_collectives, spawn_local
from moekit.parallel.groups import COLLECTIVES

DIM, HIDDEN, TOKENS = 16, 32, 24

# name -> (layer arguments, training mode)
CONFIGS = {
    "topk, dropless": (dict(num_experts=4, k=2, router="topk"), True),
    "noisy_topk, eval": (dict(num_experts=4, k=2, router="noisy_topk"), False),
    "noisy_topk, training": (dict(num_experts=4, k=2, router="noisy_topk"), True),
    "noisy_topk, training, capacity 1.25": (dict(num_experts=4, k=2, router="noisy_topk", capacity_factor=1.25), True),
    "noisy_topk, training, capacity, batch-prioritised": (
        dict(num_experts=4, k=2, router="noisy_topk", capacity_factor=1.25, batch_prioritized=True), True),
    "vmoe, training": (dict(num_experts=4, k=2, router="vmoe"), True),
    "e3 (2 members), training": (dict(num_experts=4, k=1, router="e3"), True),
    "hierarchical, training": (dict(router="hierarchical"), True),
    "switch, training": (dict(num_experts=4, k=1, router="switch"), True),
    "batchwise, training": (dict(num_experts=4, k=2, router="batchwise"), True),
}


def count_rank(rank: int, world: int) -> dict[str, tuple[dict, dict]]:
    """Per configuration: (forward, backward) collective calls by name, on this rank."""
    out = {}
    for name, (kwargs, training) in CONFIGS.items():
        torch.manual_seed(0)  # the same layer on every rank
        layer_kwargs = dict(kwargs)
        router = layer_kwargs.pop("router")
        if router == "hierarchical":
            moe = moekit.HierarchicalMoE(DIM, 2, 2, k_primary=2, k_secondary=1, hidden_dim=HIDDEN, **layer_kwargs)
        else:
            moe = moekit.MoE(DIM, hidden_dim=HIDDEN, router=router, **layer_kwargs)
        moe = apply_expert_parallel(moe.train(training))
        torch.manual_seed(1 + rank)
        x = torch.randn(TOKENS, DIM, requires_grad=True)
        with counting_collectives() as counts:
            result = moe(x)
            forward = dict(counts)
            counts.clear()
            (result.y.sum() + result.aux_loss).backward()
            out[name] = (forward, dict(counts))
    return out


def _cell(calls: dict) -> str:
    total = sum(calls.values())
    parts = ", ".join(f"{n} {calls[n]}" for n in COLLECTIVES if calls.get(n))
    return f"{total} ({parts})" if parts else "0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="processes (ranks)")
    args = p.parse_args(argv)
    per_rank = spawn_local(count_rank, args.world, timeout_s=120.0)
    if any(r != per_rank[0] for r in per_rank[1:]):
        raise RuntimeError("ranks made different collectives; they would deadlock in a real run")
    print(f"Collectives per layer and training step, W={args.world} ranks (moekit {moekit.__version__}, "
          f"torch {torch.__version__})\n")
    print("| configuration | forward | backward | total |\n|---|---|---|---:|")
    for name, (forward, backward) in per_rank[0].items():
        print(f"| {name} | {_cell(forward)} | {_cell(backward)} | "
              f"{sum(forward.values()) + sum(backward.values())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
