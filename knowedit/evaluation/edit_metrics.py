"""Edit metrics under two protocols that never share a column.

* ``cf_*``: the CounterFact probability protocol (Meng et al. 2022). P(x) = exp(-mean per-token NLL
  of " " + x after the prompt). ES/PS/NS are the fractions of prompts where the right target wins,
  EM/PM/NM the mean probability margins, S the harmonic mean of ES, PS and NS.
* ``ee_*``: the EasyEdit protocol: teacher-forced token accuracy of the argmax predictions on the
  target tokens. Locality is the agreement of the post-edit argmax with the pre-edit argmax on the
  neighbourhood prompt + answer tokens.

All (prompt, target) pairs of all requests go through :func:`score_pairs` together, in batches."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .scoring import score_pairs


def harmonic_mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals or len(vals) != len(list(values)):
        return None
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


@dataclass
class RequestEval:
    metrics: dict
    locality_argmax: list[list[int]] = field(default_factory=list)


def _pairs(req):
    """(tag, prompt, target) for every pair one request needs."""
    new, true = " " + req.target_new, (" " + req.target_true if req.target_true else None)
    out = [("rw_new", req.text, new)]
    if true:
        out.append(("rw_true", req.text, true))
    for p in req.paraphrase_prompts:
        out.append(("pa_new", p, new))
        if true:
            out.append(("pa_true", p, true))
    loc = req.locality_answer
    for p in req.neighborhood_prompts:
        if loc:
            out.append(("nb_loc", p, " " + loc.strip()))
        out.append(("nb_new", p, new))
    for item in req.portability:
        out.append(("port", item["prompt"], " " + str(item["answer"]).strip()))
    return out


def evaluate_requests(handle, requests, reference: list[RequestEval] | None = None,
                      batch_size: int = 32) -> list[RequestEval]:
    """Both protocols for every request. ``reference`` is the pre-edit evaluation of the same
    requests (needed for ``ee_locality_acc``; without it locality is measured against itself)."""
    plan = [_pairs(r) for r in requests]
    flat = [(p, t) for pl in plan for _, p, t in pl]
    compare = None
    if reference is not None:
        compare = []
        for pl, ref in zip(plan, reference):
            loc = iter(ref.locality_argmax)
            for tag, _, _ in pl:
                compare.append(next(loc) if tag == "nb_loc" else None)
    s = score_pairs(handle, flat, batch_size=batch_size)
    out, k = [], 0
    for r, pl in zip(requests, plan):
        g: dict[str, list] = {}
        for tag, _, _ in pl:
            g.setdefault(tag, []).append(k)
            k += 1
        prob = lambda i: math.exp(-s.nll[i])  # noqa: E731
        m: dict = {}
        # CounterFact probability protocol
        if "rw_true" in g:
            pn, pt = prob(g["rw_new"][0]), prob(g["rw_true"][0])
            m.update(cf_p_new=pn, cf_p_true=pt, cf_es=float(pn > pt), cf_em=pn - pt)
            pa = list(zip(g.get("pa_new", []), g.get("pa_true", [])))
            m["cf_ps"] = _mean([float(prob(a) > prob(b)) for a, b in pa])
            m["cf_pm"] = _mean([prob(a) - prob(b) for a, b in pa])
        else:
            m["cf_p_new"] = prob(g["rw_new"][0])
        nb = list(zip(g.get("nb_loc", []), g.get("nb_new", [])))
        m["cf_ns"] = _mean([float(prob(a) > prob(b)) for a, b in nb])
        m["cf_nm"] = _mean([prob(a) - prob(b) for a, b in nb])
        if all(m.get(x) is not None for x in ("cf_es", "cf_ps", "cf_ns")):
            m["cf_s"] = harmonic_mean([m["cf_es"], m["cf_ps"], m["cf_ns"]])
        # EasyEdit token-accuracy protocol
        m["ee_rewrite_acc"] = s.token_acc[g["rw_new"][0]]
        m["ee_rephrase_acc"] = _mean([s.token_acc[i] for i in g.get("pa_new", [])])
        loc_idx = g.get("nb_loc", [])
        loc_arg = [s.argmax[i] for i in loc_idx]
        if compare is not None:
            agree = []
            for i in loc_idx:
                a, ref = s.argmax[i], compare[i]
                agree.append(sum(int(u == v) for u, v in zip(a, ref)) / len(a))
            m["ee_locality_acc"] = _mean(agree)
        else:
            m["ee_locality_acc"] = 1.0 if loc_idx else None
        m["ee_portability_acc"] = _mean([s.token_acc[i] for i in g.get("port", [])])
        out.append(RequestEval({k_: v for k_, v in m.items() if v is not None}, loc_arg))
    return out


def aggregate_cf_s(es, ps, ns) -> float | None:
    """S over a set of edits: the harmonic mean of the mean ES, PS and NS (ROME's definition)."""
    return harmonic_mean([es, ps, ns])
