"""MIB faithfulness curves and their areas (Mueller et al. 2025, "MIB: A Mechanistic
Interpretability Benchmark", circuit localization track).

Faithfulness ``f(k)`` is measured for the circuit made of the top ``k`` share of the candidates
at the MIB sizes 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%. The numbers depend on the
protocol, which every record names: knowedit's (node or edge candidates as discovered, curves on the
scoring prompts) or MIB's (edges including the embedding's, counterfactual patching, ``k = int(size n)``
pruned after top-n, curves on held-out prompts; see :func:`~knowedit.discovery.discover.discover`).
* **CPR** (circuit performance ratio) = area under ``f(k)``, candidates ranked by signed score
  (higher is better: the circuit recovers the behaviour).
* **CMD** (circuit-model distance) = area between ``f(k)`` and 1, i.e. ``∫ |1 - f(k)| dk``, candidates
  ranked by ``|score|`` (lower is better: the circuit behaves like the model, whichever direction).
Areas use the trapezoidal rule over ``k`` as a fraction in [0, 1] (so both lie in [0, 1] when f does)."""
from __future__ import annotations

from .evaluate import Evaluator
from .select import ranked

MIB_SIZES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _trapz(xs, ys) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


def faithfulness_curve(ev: Evaluator, scores: dict[str, float], by: str = "signed", sizes=MIB_SIZES,
                       progress=None, floor: bool = False) -> list[dict]:
    """``f`` of the top ``size`` share of ``ev``'s candidates: ``k = max(1, round(size * n))``, or MIB's
    ``k = int(size * n)`` with ``floor`` (then ``kept`` counts the edges left after the evaluator's pruning)."""
    order = ranked({n: scores[n] for n in ev.nodes}, by)
    rows = []
    for s in (progress(sizes, desc=f"curve ({by})") if progress else sizes):
        k = int(s * len(order)) if floor else max(1, round(s * len(order)))
        row = {"size": s, "k": k, "faithfulness": ev.faithfulness(order[:k])}
        if floor and hasattr(ev, "present"):
            row["kept"] = int(ev.present(order[:k]).sum())
        rows.append(row)
    return rows


def mib_areas(ev: Evaluator, scores: dict[str, float], sizes=MIB_SIZES, progress=None, floor: bool = False) -> dict:
    """``{"cpr", "cmd", "cpr_curve", "cmd_curve"}`` for one set of scores."""
    up = faithfulness_curve(ev, scores, "signed", sizes, progress, floor)
    ab = faithfulness_curve(ev, scores, "abs", sizes, progress, floor)
    xs = [r["size"] for r in up]
    return {"cpr": _trapz(xs, [r["faithfulness"] for r in up]),
            "cmd": _trapz(xs, [abs(1 - r["faithfulness"]) for r in ab]),
            "cpr_curve": up, "cmd_curve": ab, "sizes": list(sizes),
            "definition": "MIB (Mueller et al. 2025): CPR = area under f(k) (signed ranking); "
                          "CMD = area of |1 - f(k)| (|score| ranking); trapezoids over k in [0, 1]"}
