"""Outputs of ``moekit ensemble``: per-model predictions and metrics, plots, report.md.

Legend: N test examples, O OOD examples, C classes.

Every metric is computed from the arrays saved in ``predictions_<model>.npz`` (``probs`` [N, C],
``labels`` [N], ``ood_probs`` [O, C], and for an ensemble ``member_probs`` [N, M, C]), so anyone can
recompute it. ``probs`` is the mean of the members' probabilities. The few-shot accuracies come from
``features_<model>.npz`` (``test`` [N, M, D] float16 pre-logits with ``test_labels`` [N], and when
the OOD images have labels ``ood`` [O, M, D] with ``ood_labels`` [O]) by
``moekit.metrics.fewshot.fewshot_report`` on the members' features side by side, [N, M*D].
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moekit.data.images import ImageSplits
from moekit.jobs.ensemble.config import EnsembleConfig, model_runs
from moekit.metrics.calibration import ECE_BINS, accuracy, brier, ece, nll, reliability_bins
from moekit.metrics.diversity import disagreement, mean_pairwise_kl
from moekit.metrics.fewshot import fewshot_report
from moekit.metrics.ood import ood_auroc
from moekit.train.checkpoint import atomic_write
from moekit.train.outdir import METRICS_FILE, REPORT_FILE, write_json, write_text
from moekit.train.plots import save_figure

METRIC_KEYS = ("accuracy", "nll", "ece", "brier", "ood_auroc_msp", "ood_auroc_entropy", "gflops_per_example", "params")
DESCRIPTIONS = {
    "dense": "ViT, dense MLPs",
    "vmoe": "V-MoE: MoE MLPs in {where}",
    "e3": "E^3: the V-MoE's experts split among M members, trained from scratch",
    "deep-ensemble": "M independently trained V-MoEs, probabilities averaged",
    "e3-init": "E^3 initialised from the trained vmoe, then fine-tuned",
    "soft-moe": "Soft MoE ViT: Soft MoE MLPs (one slot per expert and image) in {where}",
    "vmoe-ec": "V-MoE with expert-choice routing (each expert takes its ceil(K*T/E) best tokens of the batch)",
}
FEWSHOT_SETS = {"test": "the test set's classes", "ood": "the OOD images' classes (transfer)"}


def moe_blocks_in_words(cfg: EnsembleConfig) -> str:
    if cfg.layout == "every_2":
        return "every odd block"
    return f"the last {cfg.last_n} odd block{'s' if cfg.last_n > 1 else ''}"


def describe(cfg: EnsembleConfig, model: str) -> str:
    return DESCRIPTIONS[model].format(where=moe_blocks_in_words(cfg))


def _savez(f: Any, arrays: dict[str, Any]) -> None:
    np.savez_compressed(f, **arrays)


def model_metrics(probs: np.ndarray, labels: np.ndarray, ood_probs: np.ndarray | None) -> dict[str, float | None]:
    """Accuracy, NLL, ECE, Brier and the two OOD AUROCs (None without an OOD set)."""
    out: dict[str, float | None] = {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
                                    "ece": ece(probs, labels), "brier": brier(probs, labels)}
    for score in ("msp", "entropy"):
        out[f"ood_auroc_{score}"] = None if ood_probs is None else ood_auroc(probs, ood_probs, score)
    return out


def combine_runs(runs: list[dict[str, Any]], key: str) -> np.ndarray | None:
    """[N, M, C] the members of all ``runs`` side by side (a deep ensemble's M is its number of runs)."""
    if runs[0][key] is None:
        return None
    return np.concatenate([r[key].numpy() for r in runs], axis=1)


def diversity_metrics(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """The members' mean NLL, top-1 disagreement and mean pairwise KL (None for a single model).

    The ensemble's NLL can beat the members' mean NLL only as far as the members disagree.
    """
    if member_probs.shape[1] < 2:
        return {"member_nll_mean": None, "member_disagreement": None, "member_kl": None}
    member_nll = float(np.mean([nll(member_probs[:, m], labels) for m in range(member_probs.shape[1])]))
    return {"member_nll_mean": member_nll, "member_disagreement": disagreement(member_probs),
            "member_kl": mean_pairwise_kl(member_probs)}


def fewshot_metrics(features: dict[str, np.ndarray], shots: tuple[int, ...], draws: int,
                    num_classes: dict[str, int | None]) -> dict[str, Any]:
    """Few-shot accuracies of every labelled set in ``features`` (a features_<model>.npz's arrays):
    ``{"test": {"1": {...}, "5": ...}, "ood": ...}``, the members' pre-logits side by side."""
    out = {}
    for name in FEWSHOT_SETS:
        if name in features:
            feats = features[name].astype(np.float64)
            out[name] = fewshot_report(feats.reshape(len(feats), -1), features[f"{name}_labels"],
                                       shots, draws, num_classes=num_classes[name])
    return out


def _features(runs: list[dict[str, Any]], data: ImageSplits, y_ood: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    test = combine_runs(runs, "member_features") if "member_features" in runs[0] else None
    if test is not None:
        arrays.update(test=test, test_labels=data.y_test)
    ood = combine_runs(runs, "ood_member_features") if "ood_member_features" in runs[0] else None
    if ood is not None and y_ood is not None:
        arrays.update(ood=ood, ood_labels=y_ood)
    return arrays


def write_outputs(out: Path, cfg: EnsembleConfig, data: ImageSplits, finished: dict[str, dict[str, Any]],
                  env: dict[str, Any], vit: dict[str, Any], y_ood: np.ndarray | None = None) -> dict[str, Any]:
    """Write predictions, features, plots, report.md and (last, the mark of a finished run) metrics.json.

    ``y_ood``: the OOD images' labels when known, for the few-shot transfer probes.
    """
    models: dict[str, Any] = {}
    classes: dict[str, int | None] = {"test": data.num_classes,
                                      "ood": None if y_ood is None else int(y_ood.max()) + 1}
    for model in cfg.models:
        runs = [finished[spec.name] for spec in model_runs(cfg, model)]
        members, ood_members = combine_runs(runs, "member_probs"), combine_runs(runs, "ood_member_probs")
        if members is None:
            raise ValueError(f"model {model}: its runs hold no test predictions")
        arrays: dict[str, Any] = {"probs": members.mean(axis=1, dtype=np.float64).astype(np.float32),
                                  "labels": data.y_test}
        if ood_members is not None:
            arrays["ood_probs"] = ood_members.mean(axis=1, dtype=np.float64).astype(np.float32)
        if members.shape[1] > 1:
            arrays["member_probs"] = members
        atomic_write(out / f"predictions_{model}.npz", functools.partial(_savez, arrays=arrays))
        features = _features(runs, data, y_ood)
        if features:
            atomic_write(out / f"features_{model}.npz", functools.partial(_savez, arrays=features))
        models[model] = {
            # From the saved float32 arrays, so that the file reproduces these numbers exactly.
            **model_metrics(arrays["probs"], data.y_test, arrays.get("ood_probs")),
            **diversity_metrics(members, data.y_test),
            "gflops_per_example": sum(r["flops_per_example"] for r in runs) / 1e9,
            "params": int(sum(r["params"] for r in runs)),
            "runs": [spec.name for spec in model_runs(cfg, model)],
            "seeds": [spec.seed for spec in model_runs(cfg, model)],
            "train_steps": [r["steps"] for r in runs],
            "train_seconds": float(sum(r["seconds"] for r in runs)),
            "final_train_loss": [float(r["losses"][-20:].mean()) if len(r["losses"]) else None for r in runs],
            # From the saved float16 features, so that the file reproduces these numbers exactly.
            "fewshot": fewshot_metrics(features, cfg.fewshot_shots, cfg.fewshot_draws, classes),
        }
        plot_reliability(out / f"reliability_{model}.png", arrays["probs"], data.y_test, model)
    metrics = {
        "models": models,
        "flops_ratios": flops_ratios(models),
        "vit": vit,
        "data": {"source": data.source, "ood_source": data.ood_source, "train_examples": len(data.y_train),
                 "test_examples": len(data.y_test), "ood_examples": None if data.x_ood is None else len(data.x_ood),
                 "num_classes": data.num_classes, "image_shape": list(data.image_shape)},
        "environment": env,
    }
    plot_flops_vs_nll(out / "flops_vs_nll.png", models)
    write_text(out / REPORT_FILE, report(cfg, metrics))
    write_json(out / METRICS_FILE, metrics)
    return metrics


def flops_ratios(models: dict[str, Any]) -> dict[str, float]:
    ratios = {}
    for a, b in (("e3", "deep-ensemble"), ("e3-init", "deep-ensemble"), ("e3", "vmoe"), ("vmoe", "dense")):
        if a in models and b in models:
            ratios[f"{a}/{b}"] = models[a]["gflops_per_example"] / models[b]["gflops_per_example"]
    return ratios


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def metrics_table(metrics: dict[str, Any]) -> str:
    """The results as a Markdown table, one row per model."""
    head = "| model | accuracy | NLL | ECE | Brier | OOD AUROC (MSP) | OOD AUROC (entropy) | MFLOPs/example | params |"
    rows = [head, "|---|" + "---:|" * 8]
    for name, m in metrics["models"].items():
        cells = [_fmt(m[k]) for k in METRIC_KEYS[:6]] + [f"{m['gflops_per_example'] * 1e3:.2f}", _fmt(m["params"])]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fewshot_table(metrics: dict[str, Any], cfg: EnsembleConfig) -> str:
    """Few-shot accuracy per model, set and shot count, as "mean ± std over draws" (n/a: set too small)."""
    sets = [name for name in FEWSHOT_SETS if any(name in m["fewshot"] for m in metrics["models"].values())]
    if not sets:
        return "No few-shot probe: the runs hold no features."
    cols = [(name, shots) for name in sets for shots in cfg.fewshot_shots]
    head = "| model | " + " | ".join(f"{name} {shots}-shot" for name, shots in cols) + " |"
    rows = [head, "|---|" + "---:|" * len(cols)]
    for model, m in metrics["models"].items():
        cells = []
        for name, shots in cols:
            r = m["fewshot"].get(name, {}).get(str(shots))
            cells.append("n/a" if r is None else f"{r['accuracy']:.4f} ± {r['std']:.4f}")
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _comparisons(models: dict[str, Any], ratios: dict[str, float]) -> list[str]:
    lines = []
    for a, b in (("e3", "vmoe"), ("e3-init", "vmoe"), ("e3", "deep-ensemble"), ("e3-init", "deep-ensemble")):
        if a in models and b in models:
            parts = [f"{key} {models[a][key] - models[b][key]:+.4f}" for key in ("accuracy", "nll", "ece", "brier")]
            lines.append(f"- {a} minus {b}: " + ", ".join(parts) + " (lower is better except accuracy).")
    for name, ratio in ratios.items():
        lines.append(f"- FLOPs ratio {name}: {ratio:.3f}.")
    for name, m in models.items():
        if m["member_disagreement"] is not None:
            lines.append(f"- {name} members: mean member NLL {m['member_nll_mean']:.4f} (ensemble {m['nll']:.4f}), "
                         f"top-1 disagreement {m['member_disagreement']:.4f}, mean pairwise KL {m['member_kl']:.4f}.")
    return lines


def report(cfg: EnsembleConfig, metrics: dict[str, Any]) -> str:
    models, data, env = metrics["models"], metrics["data"], metrics["environment"]
    described = "\n".join(f"- `{m}`: {describe(cfg, m)} (runs: {', '.join(models[m]['runs'])}; seeds "
                          f"{models[m]['seeds']}; {sum(models[m]['train_steps'])} steps, "
                          f"{models[m]['train_seconds']:.0f} s)" for m in models)
    plots = "\n".join(f"![reliability {m}](reliability_{m}.png)" for m in models)
    config_rows = "\n".join(f"| {k} | {v} |" for k, v in dataclasses.asdict(cfg).items())
    ood = data["ood_source"] or "none given: OOD metrics left out"
    patch = metrics["vit"]["patch_size"]
    command = (f"moekit ensemble --preset {cfg.preset} --models {','.join(cfg.models)} --seed {cfg.seed} "
               f"--k {cfg.k} --steps {cfg.steps} --finetune-steps {cfg.finetune_steps}"
               + (f" --train-examples {cfg.train_examples}" if cfg.train_examples else "")
               + (f" --ensemble-size {cfg.ensemble_size}" if cfg.ensemble_size != 2 else "")
               + (f" --layout {cfg.layout}" if cfg.layout != "last_n" else "")
               + (f" --last-n {cfg.last_n}" if cfg.layout == "last_n" and cfg.last_n != 2 else "")
               + (f" --data {cfg.data}" if cfg.data else ""))
    sets = "; ".join(f"`{name}`: {what}" for name, what in FEWSHOT_SETS.items())
    return f"""# moekit ensemble: ViT vs V-MoE vs E^3 vs deep ensemble

Reproduce with `{command}` (the numbers below were measured with {env["torch_threads"]} CPU thread(s)).

Data: {data["source"]}; {data["train_examples"]:,} training images, {data["test_examples"]:,} test images,
{data["num_classes"]} classes, images {tuple(data["image_shape"])} (C, H, W).
OOD set: {ood}{"" if data["ood_examples"] is None else f" ({data['ood_examples']:,} images)"}.

Models (E = {cfg.num_experts} experts in {moe_blocks_in_words(cfg)}, K = {cfg.k}, M = {cfg.ensemble_size},
capacity factor {cfg.capacity_factor} rounded up to a multiple of 4, batch-prioritised routing; ViT depth {cfg.depth},
width {cfg.dim}, {cfg.heads} heads, MLP {cfg.mlp_dim}, patches {patch}x{patch}, class-token pooling;
AdamW, batch {cfg.batch_size}, lr {cfg.lr} with warm-up and cosine decay):
{described}

## Results on the test set

{metrics_table(metrics)}

NLL in nats; ECE with {ECE_BINS} equal-width bins; Brier summed over classes (0 best, 2 worst);
OOD AUROC with the OOD images as positives, scored by minus the max-softmax probability or by the
predictive entropy; FLOPs counted by torch's FlopCounterMode on the evaluation forward pass
(multiply-add = 2 FLOPs; a deep ensemble costs the sum of its members).

{chr(10).join(_comparisons(models, metrics["flops_ratios"]))}

### Few-shot linear probes

{fewshot_table(metrics, cfg)}

Closed-form ridge regression on the frozen pre-logits (an ensemble's members side by side), with
{", ".join(map(str, cfg.fewshot_shots))} labelled images per class drawn from one half of each set
and accuracy measured on the other half ({sets}); the ridge coefficient is chosen on the pool half's
remaining images. Mean ± standard deviation over {cfg.fewshot_draws} draws of the shots; every model
sees the same draws (`moekit.metrics.fewshot`).

![FLOPs vs NLL](flops_vs_nll.png)

{plots}

## Files

`predictions_<model>.npz` (probs [N, C], labels [N], ood_probs [O, C]: every number above can be
recomputed from them), `features_<model>.npz` (the members' pre-logits and labels the few-shot
probes read), `metrics.json`, `config.json`, `checkpoints/` (the weights and predictions
of every run). Environment: torch {env["torch"]} on {env["device"]}, {env["torch_threads"]} thread(s).

## Configuration

| key | value |
|---|---|
{config_rows}
"""


def plot_reliability(path: Path, probs: np.ndarray, labels: np.ndarray, title: str) -> None:
    """Accuracy per confidence bin against the diagonal, with the share of examples per bin."""
    bins = reliability_bins(probs, labels)
    centers = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    fig = Figure(figsize=(4.6, 4.6))
    ax = fig.add_subplot()
    used = bins.counts > 0
    ax.bar(centers[used], bins.accuracy[used], width=width * 0.95, color="tab:blue", alpha=0.6, label="accuracy")
    acc, conf = bins.accuracy[used], bins.confidence[used]
    ax.bar(centers[used], np.abs(conf - acc), bottom=np.minimum(acc, conf), width=width * 0.95, fill=False,
           edgecolor="tab:red", hatch="//", linewidth=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    share = ax.twinx()
    share.plot(centers, bins.counts / bins.counts.sum(), "o-", color="tab:gray", markersize=3, linewidth=1)
    share.set_ylabel("share of examples", color="tab:gray")
    share.set_ylim(0, 1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy",
           title=f"{title}: ECE {ece(probs, labels):.4f}")
    ax.legend(loc="upper left")
    save_figure(fig, path, dpi=110)


def plot_flops_vs_nll(path: Path, models: dict[str, Any]) -> None:
    """Each model's test NLL against its FLOPs per example."""
    fig = Figure(figsize=(5.6, 4.2))
    ax = fig.add_subplot()
    for name, m in models.items():
        ax.scatter(m["gflops_per_example"] * 1e3, m["nll"], s=40)
        ax.annotate(name, (m["gflops_per_example"] * 1e3, m["nll"]), textcoords="offset points", xytext=(5, 4))
    ax.set(xlabel="MFLOPs per example (FlopCounterMode)", ylabel="test NLL (nats)", title="cost vs NLL")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
