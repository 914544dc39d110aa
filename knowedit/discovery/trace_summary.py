"""Causal traces summarised over many facts, as in ROME's averaged figure: token positions bucketed
relative to the subject, effects averaged over facts, and the layer where an effect peaks."""
from __future__ import annotations

import warnings

import numpy as np

BUCKETS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
           "further tokens", "last token")


def bucket_positions(subject_range, n_tokens: int) -> dict[str, list[int]]:
    """Token positions of each bucket for one prompt. A one-token subject counts as both its first and
    its last token; a bucket with no token (e.g. no token between the subject and the last one) is
    empty, and the fact then does not count towards that bucket's average."""
    a, b = subject_range
    last = n_tokens - 1
    out = {"first subject token": [a], "middle subject tokens": list(range(a + 1, b - 1)),
           "last subject token": [b - 1],
           "first subsequent token": [b] if b < last else [],
           "further tokens": list(range(b + 1, last)), "last token": [last]}
    return out


def bucketed(effects: np.ndarray, subject_range) -> np.ndarray:
    """``[len(BUCKETS), layers]``: the mean effect over each bucket's positions (NaN when empty)."""
    pos = bucket_positions(subject_range, effects.shape[0])
    out = np.full((len(BUCKETS), effects.shape[1]), np.nan)
    for i, name in enumerate(BUCKETS):
        if pos[name]:
            out[i] = effects[pos[name]].mean(0)
    return out


def aggregate(results) -> dict:
    """Average bucketed effects over ``results`` (TraceResults or their dicts), per kind.

    Returns ``{"buckets", "kinds": {kind: [buckets × layers] mean}, "counts": {bucket: facts},
    "peaks": {kind: {"layer", "bucket", "effect"}}, "mean_p_clean", "mean_p_corrupt", "n"}``."""
    from .causal_trace import TraceResult

    rs = [r if isinstance(r, TraceResult) else TraceResult.from_dict(r) for r in results]
    if not rs:
        raise ValueError("aggregate: no traces")
    kinds = [k for k in rs[0].effects if all(k in r.effects for r in rs)]
    out_kinds, peaks = {}, {}
    for k in kinds:
        stack = np.stack([bucketed(r.effects[k], r.subject_range) for r in rs])
        with warnings.catch_warnings():   # a bucket no fact has stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(stack, axis=0)
        out_kinds[k] = mean
        if np.isfinite(mean).any():
            i, layer = np.unravel_index(np.nanargmax(mean), mean.shape)
            peaks[k] = {"bucket": BUCKETS[i], "layer": int(layer), "effect": float(mean[i, layer])}
    counts = {name: int(sum(bool(bucket_positions(r.subject_range, len(r.tokens))[name]) for r in rs))
              for name in BUCKETS}
    return {"buckets": list(BUCKETS), "kinds": out_kinds, "counts": counts, "peaks": peaks, "n": len(rs),
            "mean_p_clean": float(np.mean([r.p_clean for r in rs])),
            "mean_p_corrupt": float(np.mean([r.p_corrupt for r in rs]))}


def last_subject_profile(results, kind: str = "mlp") -> np.ndarray:
    """Mean effect of ``kind`` per layer at the subject's last token, over ``results``."""
    return np.mean([r.profile(kind) for r in results], axis=0)
