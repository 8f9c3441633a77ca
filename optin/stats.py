"""Statistics of a comparison (``optin compare``): bootstrap confidence intervals over test examples,
paired differences on the same examples, and the spread of measured speedups.

Pure functions on numpy arrays. Per-example results come in two kinds (``optin.measure.per_example``):
(N,) 0/1 correctness, whose metric is the mean, and (N, C, C) confusion matrices, whose metric is the mIoU
of their sum. A configuration evaluated with S calibration seeds on the same N examples is an array
(S, N) or (S, N, C, C); its point estimate is the mean over seeds of the per-seed metric, and every
bootstrap resample draws N examples with replacement, recomputes each seed's metric on them and averages
over the seeds (for correctness: the mean of the examples averaged over the seeds). Two configurations
resampled with the same draws give a paired difference: the noise of the test sample cancels.
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
CHUNK = 256  # resamples per matrix product for confusion matrices (bounds the memory)


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) how often each of ``n`` examples is drawn in each bootstrap resample (n draws with
    replacement, a fixed ``seed``: the same draws serve every configuration, which pairs them)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need at least one example and one resample, got n={n}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def miou(conf: np.ndarray) -> np.ndarray | float:
    """mIoU of confusion matrices (..., C, C) (rows: target, columns: prediction) over the classes present
    in the target or the prediction; 1.0 where none is (``optin.measure.miou_of``, batched)."""
    conf = np.asarray(conf, dtype=np.float64)
    inter = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(-2) + conf.sum(-1) - inter
    present = union > 0
    iou = np.where(present, inter / np.where(present, union, 1.0), 0.0)
    n = present.sum(-1)
    out = np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), 1.0)
    return float(out) if out.ndim == 0 else out


def metric(examples: np.ndarray, counts: np.ndarray | None = None) -> float | np.ndarray:
    """The metric of per-example results (N,) or (N, C, C); with ``counts`` (R, N), the metric of each of
    the R resamples, shape (R,)."""
    x = np.asarray(examples, dtype=np.float64)
    n = x.shape[0]
    if x.ndim == 1:
        return float(x.mean()) if counts is None else counts @ x / n
    flat = x.reshape(n, -1)
    c = x.shape[-1]
    if counts is None:
        return miou(flat.sum(0).reshape(c, c))
    return np.concatenate([miou((counts[i:i + CHUNK] @ flat).reshape(-1, c, c))
                           for i in range(0, len(counts), CHUNK)])


def seed_mean(per_seed: np.ndarray, counts: np.ndarray | None = None) -> float | np.ndarray:
    """The mean over seeds (axis 0) of the per-seed metric, per resample when ``counts`` is given."""
    per_seed = np.asarray(per_seed)
    if per_seed.ndim == 2:  # correctness: averaging the examples over the seeds first is the same number
        return metric(per_seed.astype(np.float64).mean(0), counts)
    values = [metric(s, counts) for s in per_seed]
    return float(np.mean(values)) if counts is None else np.mean(values, axis=0)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval holding ``level`` of ``samples``."""
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [tail, 1.0 - tail])
    return float(lo), float(hi)


def summarize(per_seed: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> dict:
    """Mean over seeds, its bootstrap ``level`` interval over the examples, and the per-seed metrics with
    their min and max."""
    per = [float(metric(s)) for s in np.asarray(per_seed)]
    lo, hi = interval(seed_mean(per_seed, counts), level)
    return {"mean": float(np.mean(per)), "ci": [lo, hi], "min": min(per), "max": max(per), "per_seed": per}


def paired_difference(a: np.ndarray, b: np.ndarray, counts: np.ndarray, level: float = LEVEL) -> dict:
    """``a`` minus ``b`` (each (S, N, ...) on the same N examples): the difference of the means, the
    bootstrap ``level`` interval of the difference with both resampled on the same draws, and whether that
    interval excludes 0."""
    diff = seed_mean(a, counts) - seed_mean(b, counts)
    lo, hi = interval(diff, level)
    return {"mean": float(seed_mean(a) - seed_mean(b)), "ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}


def speedup(base_seconds: list[float], pruned_seconds: list[float]) -> dict:
    """The per-round time ratio base/pruned of interleaved timings (``optin.measure.timings``): its median
    and interquartile range."""
    ratios = np.asarray(base_seconds, dtype=np.float64) / np.asarray(pruned_seconds, dtype=np.float64)
    if ratios.size == 0:
        raise ValueError("no timing rounds")
    q1, med, q3 = np.quantile(ratios, [0.25, 0.5, 0.75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "rounds": int(ratios.size)}
