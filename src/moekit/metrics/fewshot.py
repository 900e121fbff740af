"""Few-shot linear probes on frozen features: closed-form ridge regression, as in E^3's evaluation.

Legend: N examples, F feature dims, C classes, n shots in all (shots per class times C).

Allingham et al. (after the ViT and V-MoE papers) measure how well a representation transfers by
fitting a linear classifier to the frozen pre-logits of a few labelled examples per class, in
closed form: ridge regression onto one-hot targets, the predicted class being the largest output.
An ensemble's features are its members' pre-logits side by side.

The protocol here, fixed so that every model is probed the same way:

1. The labelled set is split once (a permutation drawn with ``seed``) into a *pool* half, from
   which shots are drawn, and an *evaluation* half, never used to choose anything.
2. For each draw, ``shots`` examples per class are drawn from the pool; features are standardised
   with the shots' own mean and standard deviation (the probe sees nothing else).
3. The ridge coefficient is chosen from ``l2_grid`` by the mean accuracy, over the draws, on the
   pool examples that are not shots of that draw; accuracy is then reported on the evaluation half
   at that coefficient, as the mean and standard deviation over draws.

The intercept is not regularised (the features and targets are centred on the shots' means), so
one-hot targets in {0, 1} and the paper's {-1, 1} give the same classifier.
"""

from __future__ import annotations

import numpy as np

DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_L2_GRID = tuple(2.0**e for e in range(-6, 13, 2))
"""Ridge coefficients 1/64 ... 4096 on standardised features (whose squared norm is about F)."""


def ridge_fit(x_nF: np.ndarray, y_n: np.ndarray, num_classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """``(W [F, C], b [C])`` minimising ``||x W + b - onehot(y)||^2 + l2 ||W||^2`` (b not penalised).

    Solved in the smaller of the two equivalent forms: ``(X^T X + l2 I)^-1 X^T Y`` over features, or
    ``X^T (X X^T + l2 I)^-1 Y`` over examples (few shots, many features: the usual case here).
    """
    if l2 <= 0 or not np.isfinite(l2):
        raise ValueError(f"l2={l2} must be a finite number > 0")
    x = np.asarray(x_nF, dtype=np.float64)
    onehot_nC = np.eye(num_classes)[np.asarray(y_n)]
    x_mean, y_mean = x.mean(0), onehot_nC.mean(0)
    xc, yc = x - x_mean, onehot_nC - y_mean
    n, f = xc.shape
    if n < f:
        w = xc.T @ np.linalg.solve(xc @ xc.T + l2 * np.eye(n), yc)
    else:
        w = np.linalg.solve(xc.T @ xc + l2 * np.eye(f), xc.T @ yc)
    return w, y_mean - x_mean @ w


def _standardiser(shots_nF: np.ndarray):
    mean, std = shots_nF.mean(0), shots_nF.std(0) + 1e-6
    return lambda x: (x - mean) / std


def _draw_shots(rng: np.random.Generator, pool_labels: np.ndarray, shots: int, num_classes: int) -> np.ndarray:
    """Indices into the pool: ``shots`` per class (without replacement)."""
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(pool_labels == c)
        if len(members) < shots + 1:
            raise ValueError(f"class {c} has {len(members)} pool examples: too few for {shots} shots and a "
                             "validation example")
        picks.append(rng.choice(members, shots, replace=False))
    return np.concatenate(picks)


def fewshot_accuracy(features_NF: np.ndarray, labels_N: np.ndarray, shots: int, draws: int = 5, seed: int = 0,
                     l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
                     num_classes: int | None = None) -> dict[str, float | list[float]]:
    """The protocol of the module docstring for one shot count.

    Returns ``{"accuracy": mean over draws, "std": their standard deviation, "per_draw": [...],
    "l2": the chosen coefficient}`` (accuracy on the evaluation half). The split and the draws
    depend only on ``labels_N`` and ``seed``, so every model is probed on the same examples.
    """
    x = np.asarray(features_NF, dtype=np.float64)
    y = np.asarray(labels_N)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be [N, F] and labels [N], got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or Inf")
    if shots < 1 or draws < 1:
        raise ValueError(f"shots={shots} and draws={draws} must be >= 1")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    perm = np.random.default_rng(seed).permutation(len(y))
    pool, held_out = perm[: len(y) // 2], perm[len(y) // 2:]
    rng = np.random.default_rng(seed + 1)
    val_acc = np.zeros((draws, len(l2_grid)))
    eval_acc = np.zeros((draws, len(l2_grid)))
    for d in range(draws):
        chosen = _draw_shots(rng, y[pool], shots, num_classes)
        train_idx = pool[chosen]
        val_idx = np.delete(pool, chosen)
        scale = _standardiser(x[train_idx])
        xs_train, xs_val, xs_eval = scale(x[train_idx]), scale(x[val_idx]), scale(x[held_out])
        for j, l2 in enumerate(l2_grid):
            w, b = ridge_fit(xs_train, y[train_idx], num_classes, l2)
            val_acc[d, j] = np.mean((xs_val @ w + b).argmax(1) == y[val_idx])
            eval_acc[d, j] = np.mean((xs_eval @ w + b).argmax(1) == y[held_out])
    best = int(np.argmax(val_acc.mean(0)))  # the first (smallest) coefficient among equals
    per_draw = eval_acc[:, best]
    return {"accuracy": float(per_draw.mean()), "std": float(per_draw.std()), "per_draw": per_draw.tolist(),
            "l2": float(l2_grid[best])}


def max_shots(labels_N: np.ndarray, seed: int = 0, num_classes: int | None = None) -> int:
    """The most shots per class the pool half of ``labels_N`` allows (one pool example of every class
    must be left to choose the ridge coefficient on); 0 when some class has fewer than 2 there."""
    y = np.asarray(labels_N)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    pool = np.random.default_rng(seed).permutation(len(y))[: len(y) // 2]
    return max(0, int(np.bincount(y[pool], minlength=num_classes).min()) - 1)


def fewshot_report(features_NF: np.ndarray, labels_N: np.ndarray, shots: tuple[int, ...] = DEFAULT_SHOTS,
                   draws: int = 5, seed: int = 0, num_classes: int | None = None) -> dict[str, dict | None]:
    """``fewshot_accuracy`` for every shot count: ``{"1": {...}, "5": {...}, "10": {...}}``; None for a
    shot count the set is too small for (``max_shots``)."""
    limit = max_shots(labels_N, seed, num_classes)
    return {str(s): fewshot_accuracy(features_NF, labels_N, s, draws, seed, num_classes=num_classes)
            if s <= limit else None for s in shots}
