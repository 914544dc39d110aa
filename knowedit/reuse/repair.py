"""``repair``: find the heads a target task shares with a source task, classify their source-task
roles, rank them by the repair each gives alone when steered to the target's distractors, choose a
set, run the controls, and optionally distil the steering into the heads' q/k weights."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pandas as pd

from ..errors import KnoweditError
from ..tasks import get_task
from .candidates import head_names, important_heads, overlap, shared_heads
from .controls import correct_answer_steering, random_same_layers, source_steering
from .persistent import DEFAULTS, collateral, distil_steering, known_facts
from .roles import head_profiles
from .steering import choose_heads, rank_heads, steered_scores

# Without circuits: each task's top heads by the one-pass importance score, and this many of them.
FALLBACK_K = 20


@dataclass
class RepairResult:
    source: str
    target: str
    table: pd.DataFrame              # condition, heads, metric, delta (vs no steering)
    roles: pd.DataFrame              # source-task roles of the candidate heads
    ranking: pd.DataFrame            # each candidate steered alone on the target
    chosen: list
    overlap: dict
    persistent: dict | None = None
    edit: object = None              # the persistent Edit (applied only if asked)
    meta: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"repair {self.target} with heads shared with {self.source}",
                 f"overlap: {self.overlap}", "", "source-task roles of the candidates:",
                 self.roles.to_string(index=False, float_format="%.3f"), "", "each head steered alone:",
                 self.ranking.to_string(index=False, float_format="%.3f"), "",
                 self.table.to_string(index=False, float_format="%.3f")]
        if self.persistent:
            p = self.persistent
            lines += ["", "persistent repair (q/k of the chosen heads):"]
            for k in p["before"]:
                lines.append(f"  {k:7s} {p['before'][k]:.3f} -> {p['after'][k]:.3f}  (n={p['n'][k]})")
            lines.append(f"  weight change norm {p['weight_change_norm']:.4f}; steered held-out {p['steered_held_out']:.3f}")
        return "\n".join(lines)


def _split(n: int, seed: int, frac: float = 0.5):
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(1, int(round(frac * n)))
    return sorted(idx[:k]), sorted(idx[k:])


def repair(handle, source: str = "ioi", target: str = "colored-objects", heads=None, n: int = 40, seed: int = 0,
           data_dir=None, source_heads=None, target_heads=None, candidates=None, method: str = "greedy",
           k: int = 4, persistent: bool = False, apply: bool = False, facts_n: int = 40,
           persistent_kwargs: dict | None = None, batch_size: int = 16, progress=None) -> RepairResult:
    """Run the repair. ``heads`` fixes the steered set (skips ranking's choice); ``source_heads`` /
    ``target_heads`` are the tasks' circuits (Circuit objects or head lists); without them each task's
    top ``FALLBACK_K`` heads by :func:`important_heads` stand in. ``candidates`` overrides the set ranked.
    ``persistent`` distils the chosen set's steering into q/k weights on half of the target prompts and
    reports the other half; ``apply`` leaves that edit applied."""
    tgt = get_task(target, handle.tokenizer, n=n, seed=seed, data_dir=data_dir)
    src = get_task(source, handle.tokenizer, n=n, seed=seed, data_dir=data_dir if source != "ioi" else None)
    for t, role in ((tgt, "target"), (src, "source")):
        if not t.distractor_positions:
            raise KnoweditError(f"{role} task {t.name!r} has no distractor_positions; repair steers heads to the "
                                f"distractor tokens, so both tasks need their positions")
    fixed = head_names(handle, heads) if heads is not None else None
    src_prof = head_profiles(handle, src, batch_size=batch_size)
    s_heads = head_names(handle, source_heads, "source_heads") if source_heads is not None else \
        important_heads(handle, src, FALLBACK_K, profiles=src_prof)
    t_heads = head_names(handle, target_heads, "target_heads") if target_heads is not None else \
        important_heads(handle, tgt, FALLBACK_K, batch_size=batch_size)
    shared = shared_heads(s_heads, t_heads)
    cand = head_names(handle, candidates, "candidates") if candidates is not None else list(shared)
    if fixed:
        cand += [h for h in fixed if h not in cand]
    roles = src_prof.set_index("component").loc[cand].reset_index() if cand else src_prof.iloc[:0]
    base = steered_scores(handle, tgt, [], batch_size=batch_size).mean().item()
    ranking = rank_heads(handle, tgt, cand, baseline=base, batch_size=batch_size, progress=progress)
    if fixed:
        chosen = fixed
        chosen_metric = steered_scores(handle, tgt, chosen, batch_size=batch_size).mean().item()
    else:
        chosen, chosen_metric = choose_heads(handle, tgt, ranking, method, k, batch_size=batch_size,
                                             progress=progress)
    rows = [("no steering", "", base)]
    rows += [(f"{h} alone", h, m) for h, m in zip(ranking["component"], ranking["metric"])]
    rows.append(("chosen set", ",".join(chosen), chosen_metric))
    ioi_before = ioi_after = None
    if chosen:
        rnd = random_same_layers(handle, chosen, seed)
        rows.append(("control: random heads, same layers", ",".join(rnd),
                     steered_scores(handle, tgt, rnd, batch_size=batch_size).mean().item()))
        rows.append(("control: chosen heads to the answer", ",".join(chosen),
                     correct_answer_steering(handle, tgt, chosen, batch_size=batch_size)))
        ioi_before, ioi_after = source_steering(handle, src, chosen, batch_size=batch_size)
        rows.append((f"control: {src.name} ({src.metric}) unsteered", "", ioi_before))
        rows.append((f"control: {src.name} ({src.metric}) chosen heads steered", ",".join(chosen), ioi_after))
    table = pd.DataFrame(rows, columns=["condition", "heads", "metric"])
    table["delta"] = table["metric"] - base
    for i, cond in enumerate(table["condition"]):
        if cond.startswith(f"control: {src.name}"):
            table.loc[i, "delta"] = table.loc[i, "metric"] - ioi_before
    result = RepairResult(src.name, tgt.name, table, roles, ranking, chosen, overlap(s_heads, t_heads),
                          meta={"n": len(tgt), "seed": seed, "metric": tgt.metric, "source_heads": s_heads,
                                "target_heads": t_heads, "candidates": cand, "method": "fixed" if fixed else method,
                                "circuits": "given" if source_heads is not None and target_heads is not None
                                else f"fallback top-{FALLBACK_K} by attention + |DLA|"})
    if persistent:
        if not chosen:
            raise KnoweditError("persistent: no head improves the target when steered, so there is nothing to "
                                "distil; pass --heads to choose them")
        tr, te = _split(len(tgt), seed)
        train, held = tgt.subset(tr), tgt.subset(te)
        facts = known_facts(handle, get_task("facts", handle.tokenizer, n=facts_n, seed=seed), batch_size)
        edit = distil_steering(handle, train, chosen, progress=progress, **{**DEFAULTS, **(persistent_kwargs or {})})
        p = collateral(handle, edit, held, src, facts, batch_size=batch_size)
        p["steered_held_out"] = steered_scores(handle, held, chosen, batch_size=batch_size).mean().item()
        p["info"] = edit.info
        result.persistent, result.edit = p, edit
        if apply:
            edit.apply()
    return result
