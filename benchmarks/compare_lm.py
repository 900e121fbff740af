"""Compare two ``moekit lm`` runs model by model: the same steps, and training losses and
perplexities equal up to a relative tolerance.

Run: ``python benchmarks/compare_lm.py RUN_A RUN_B [--rtol R]`` (each the ``--out`` of a run).
Prints the largest relative difference of each model and exits 1 if any exceeds ``--rtol``. Made
for the expert-parallel check of ``benchmarks/gpu_check.sh``: the same job under torchrun with
``--expert-parallel`` and in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SERIES = ("train_loss", "valid_ppl")  # per-step histories
SCALARS = ("valid_ppl", "test_ppl")


def relative(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|): 0 for two zeros, two NaNs or the same infinity; inf when only one
    value is finite."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if math.isinf(a) or math.isinf(b):
        return 0.0 if a == b else math.inf
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare(metrics_a: dict, metrics_b: dict) -> dict[str, float]:
    """{model name: the largest relative difference over its histories and final perplexities}.

    Raises ``ValueError`` when the runs trained different models or different steps.
    """
    models_a, models_b = metrics_a["models"], metrics_b["models"]
    names_a, names_b = [m["name"] for m in models_a], [m["name"] for m in models_b]
    if names_a != names_b:
        raise ValueError(f"the runs trained different models: {names_a} and {names_b}")
    worst: dict[str, float] = {}
    for a, b in zip(models_a, models_b, strict=True):
        if a["history"]["train_step"] != b["history"]["train_step"]:
            raise ValueError(f"{a['name']}: the runs logged different steps")
        pairs = [(x, y) for key in SERIES for x, y in zip(a["history"][key], b["history"][key], strict=True)]
        pairs += [(a[key], b[key]) for key in SCALARS]
        worst[a["name"]] = max((relative(float(x), float(y)) for x, y in pairs), default=0.0)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="largest relative difference allowed (default 1e-3: float32 rounding over a few steps)")
    args = p.parse_args(argv)
    worst = compare(*(json.loads((run / "metrics.json").read_text()) for run in (args.run_a, args.run_b)))
    failed = [name for name, d in worst.items() if not d <= args.rtol]
    for name, d in worst.items():
        print(f"{name}: largest relative difference {d:.2e} ({'FAIL' if name in failed else 'ok'}, rtol {args.rtol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
