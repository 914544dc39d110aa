"""``layers: auto`` for ROME and MEMIT: the edit layers chosen from a causal trace of the requests.

Each request's prompt is traced (Meng et al. 2022: subject embeddings corrupted with 3σ Gaussian
noise, 5 seeds) at the subject's last token only, where ROME and MEMIT read their keys, and the
indirect effect of restoring MLP outputs is averaged over the requests, per layer. The answer traced
is the request's true answer (``target_true``), else the model's own prediction.

* ROME edits the critical layer: the layer with the largest average effect of restoring a window of
  ``window`` (ROME's 10) MLP layers centred on it. ROME located its edit layer on this windowed trace
  (single-layer MLP effects are small and noisy, since neighbouring MLPs can stand in for each other);
  the single-layer profile is recorded too.
* MEMIT edits ``count`` consecutive layers (5, MEMIT's default count) ending at the critical layer,
  as MEMIT's GPT-2 XL range 13-17 ends at ROME's layer 17; near the bottom the range is moved up.

Candidates are the layers below ``v_loss_layer`` (a change there cannot reach the prediction) and,
with a circuit mask, the MLP layers in the mask. Traces are cached in memory per (model weights,
requests, settings), so repeated edits of the same requests do not trace again.
"""
from __future__ import annotations

import numpy as np

from ..errors import KnoweditError
from .fields import field

AUTO = "auto"
TRACE_SEEDS = 5
TRACE_NOISE = 3.0
TRACE_WINDOW = 10
MEMIT_COUNT = 5
_cache: dict = {}


def is_auto(hp: dict) -> bool:
    v = hp.get("layers")
    return isinstance(v, str) and v.strip().lower() == AUTO


def trace_profile(handle, requests) -> dict:
    """Average MLP indirect effects per layer at the subject's last token over ``requests``."""
    from ..discovery.causal_trace import trace   # discovery is a sibling package: imported when used

    key = (handle.current_fingerprint(), handle.dtype, tuple((r.text, r.subject, r.target_true) for r in requests),
           TRACE_SEEDS, TRACE_NOISE, TRACE_WINDOW)
    if key not in _cache:
        per = [trace(handle, r.prompt, r.subject, r.target_true, kinds=("mlp", "mlp_window"), positions="last_subject",
                     seeds=TRACE_SEEDS, noise=TRACE_NOISE, window=TRACE_WINDOW, where=r.label) for r in requests]
        s = per[0].settings
        _cache[key] = {
            "mlp_window_last_subject": np.mean([p.profile("mlp_window") for p in per], axis=0).round(6).tolist(),
            "mlp_last_subject": np.mean([p.profile("mlp") for p in per], axis=0).round(6).tolist(),
            "per_request_peak": [p.best_layer("mlp_window") for p in per],
            "p_clean": [round(p.p_clean, 6) for p in per], "p_corrupt": [round(p.p_corrupt, 6) for p in per],
            "n_requests": len(per), "seeds": TRACE_SEEDS, "noise": TRACE_NOISE, "noise_std": s["noise_std"],
            "noise_std_source": s["noise_std_source"], "window": TRACE_WINDOW,
            "answer": "target_true where given, else the model's top prediction",
        }
    return _cache[key]


def resolve(handle, requests, hp: dict, method: str, mask=None) -> tuple[dict, dict | None]:
    """``hp`` with ``layers`` replaced by the traced choice when it is ``auto``, and the record of the
    choice (None when ``layers`` was given)."""
    if not is_auto(hp):
        return hp, None
    n = handle.adapter.n_layers
    loss = field(hp, "v_loss_layer", int, lambda v: -n <= v < n, f"the model has {n} layers") % n
    allowed = set(range(loss))
    if mask is not None:
        allowed &= set(mask.mlp_layers())
    if not allowed:
        raise KnoweditError(f"hparams: layers 'auto' has no layer to choose: none is below v_loss_layer {loss}"
                            + (" and in the circuit's MLPs" if mask is not None else "") + "; give 'layers' explicitly")
    prof = trace_profile(handle, requests)
    effect = np.asarray(prof["mlp_window_last_subject"])
    critical = max(sorted(allowed), key=lambda l: effect[l])
    if method == "rome":
        layers, rule = [critical], ("the layer with the largest average indirect effect of restoring a window of "
                                    f"{TRACE_WINDOW} MLP layers at the subject's last token, below v_loss_layer")
    else:
        count = min(MEMIT_COUNT, loss)
        top = max(critical, count - 1)
        layers = list(range(top - count + 1, top + 1))
        rule = (f"{count} consecutive layers ending at the critical layer (largest windowed MLP indirect effect at "
                "the subject's last token), moved up where they would start below layer 0")
    info = {"layers": layers, "critical_layer": int(critical), "rule": rule,
            "candidates": sorted(allowed), "trace": prof}
    return {**hp, "layers": layers}, info
