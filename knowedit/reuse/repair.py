"""``repair``: find the heads a target task shares with a source task, classify their source-task
roles, rank them by the repair each gives alone when steered to the target's distractors, choose a
set, run the controls, and optionally distil the steering into the heads' q/k weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..errors import KnoweditError
from ..tasks import get_task
from .candidates import head_names, important_heads, overlap, shared_heads
from .controls import correct_answer_steering, random_same_layers, source_steering
from .persistent import WEIGHTS, known_facts
from .roles import head_profiles
from .steering import choose_heads, rank_heads, steered_scores
from .transfer import transfer_repair

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
        lines = [f"repair {self.target} with heads shared with {self.source}"]
        if len(self.table):
            lines += [f"overlap: {self.overlap}", "", "source-task roles of the candidates:",
                      self.roles.to_string(index=False, float_format="%.3f"), "", "each head steered alone:",
                      self.ranking.to_string(index=False, float_format="%.3f"), "",
                      self.table.to_string(index=False, float_format="%.3f")]
        else:
            lines.append(f"heads {', '.join(self.chosen)} (given; ranking and controls skipped)")
        if self.persistent:
            p = self.persistent
            info = p["info"]
            lines += ["", f"persistent repair (q/k of the chosen heads), trained on {info['n_train']} varied-wording "
                      f"prompts over their own colours and objects; scored on held-out prompts (top-1 accuracy):",
                      p["table"].to_string(index=False, float_format="%.3f"),
                      f"  training prompts: unsteered {p['train_unsteered']:.3f}, steered {p['train_steered']:.3f}, "
                      f"repaired {p['train_repaired']:.3f}"]
            for k in p["before"]:
                lines.append(f"  {k:7s} {p['before'][k]:.3f} -> {p['after'][k]:.3f}  (n={p['n'][k]})")
            lines.append(f"  weight change norm {p['weight_change_norm']:.4f}; objective "
                         + ", ".join(f"{w}={info[w]}" for w in WEIGHTS) + f"; {info['steps']} passes, lr {info['lr']}")
        return "\n".join(lines)


def repair(handle, source: str = "ioi", target: str = "colored-objects", heads=None, n: int = 40, seed: int = 0,
           data_dir=None, source_heads=None, target_heads=None, candidates=None, method: str = "greedy",
           k: int = 4, persistent: bool = False, apply: bool = False, facts_n: int = 40,
           persistent_kwargs: dict | None = None, train_n: int = 200, eval_n: int = 50, held_out_data=None,
           persistent_only: bool = False, batch_size: int = 16, progress=None) -> RepairResult:
    """Run the repair. ``heads`` fixes the steered set (skips ranking's choice); ``source_heads`` /
    ``target_heads`` are the tasks' circuits (Circuit objects or head lists); without them each task's
    top ``FALLBACK_K`` heads by :func:`important_heads` stand in. ``candidates`` overrides the set ranked.
    ``persistent`` distils the chosen set's steering into q/k weights on ``train_n`` varied-wording
    prompts over training-only colours and objects, and scores ``eval_n`` held-out prompts per source
    (generated over the evaluation pools; cobjs and BIG-bench from ``held_out_data``, a datasets root);
    see :mod:`.transfer`. ``apply`` leaves that edit applied. ``persistent_only`` (with ``heads``) skips
    the ranking and the controls."""
    tgt = get_task(target, handle.tokenizer, n=n, seed=seed, data_dir=data_dir)
    src = get_task(source, handle.tokenizer, n=n, seed=seed, data_dir=data_dir if source != "ioi" else None)
    for t, role in ((tgt, "target"), (src, "source")):
        if not t.distractor_positions:
            raise KnoweditError(f"{role} task {t.name!r} has no distractor_positions; repair steers heads to the "
                                f"distractor tokens, so both tasks need their positions")
    fixed = head_names(handle, heads) if heads is not None else None
    persist = dict(facts_n=facts_n, persistent_kwargs=persistent_kwargs, train_n=train_n, eval_n=eval_n,
                   held_out_data=held_out_data, seed=seed, batch_size=batch_size, progress=progress)
    if persistent_only:
        if not fixed:
            raise KnoweditError("persistent_only: pass the heads to distil (--heads); the ranking that would "
                                "choose them is skipped")
        none = pd.DataFrame()
        result = RepairResult(src.name, tgt.name, none, none, none, fixed, {},
                              meta={"n": len(tgt), "seed": seed, "method": "fixed"})
        return _add_persistent(result, handle, src, apply, **persist)
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
        return _add_persistent(result, handle, src, apply, **persist)
    return result


def _add_persistent(result, handle, src, apply, facts_n, persistent_kwargs, train_n, eval_n, held_out_data, seed,
                    batch_size, progress):
    facts = known_facts(handle, get_task("facts", handle.tokenizer, n=facts_n, seed=seed), batch_size)
    t = transfer_repair(handle, result.chosen, train_n=train_n, eval_n=eval_n, seed=seed, data_dir=held_out_data,
                        source_task=src, facts=facts, persistent_kwargs=persistent_kwargs,
                        batch_size=batch_size, progress=progress)
    edit = t["edit"]
    result.persistent = {**t["collateral"], "table": t["table"], "info": edit.info,
                         "held_out": {k: v.meta for k, v in t["held_out"].items()}}
    result.edit = edit
    if apply:
        edit.apply()
    return result
