"""The circuit-preserving projection's guarantee, measured: each edit with and without ``preserve``.

For N known CounterFact records and each editor, the edit is made plain and with ``preserve: TASKS``
(undone in between). Reported per edit and as medians:

* at each edited matrix, the relative change the edit makes to the preserved tasks' keys,
  ‖ΔW K‖_F / (‖ΔW‖_F ‖K‖_F), on the prompts the projection was computed from (seed 0) and on other
  prompts of the same tasks (seed 1);
* downstream, each task's metric change on 100 other prompts (seed 1) and whether the edit succeeded
  (P(new) > P(true) on the prompt);
* the share of the update the projection removed.

    python benchmarks/bench_preserve.py --n 5 --editors rome,memit,alphaedit --tasks ioi
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rome import known_records, scores  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.editing import edit, read_requests  # noqa: E402
from knowedit.editing.hparams import load_hparams  # noqa: E402
from knowedit.editing.preserve import preserve_settings, task_key_moments  # noqa: E402
from knowedit.evaluation.collateral import build_task, task_scores  # noqa: E402


def key_change(h, e, settings: dict) -> dict:
    """{matrix: relative change of the tasks' keys} for the prompts of ``settings``."""
    a = h.adapter
    out = {}
    for name, d in e.deltas.items():
        mod = h.model.get_submodule(name.rsplit(".", 1)[0])
        M, _ = task_key_moments(h, {name: mod}, settings)[name]
        D = d.double() if a.out_dim(mod) == 0 else d.double().T      # [out, in]
        out[name] = float((D @ M @ D.T).trace().clamp_min(0).sqrt() / (D.norm() * M.trace().sqrt()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--editors", default="rome,memit,alphaedit")
    ap.add_argument("--tasks", default="ioi")
    ap.add_argument("--threshold", type=float, default=None, help="preserve_threshold (default: the editor's)")
    ap.add_argument("--out", default="results/bench_preserve.jsonl")
    args = ap.parse_args()
    h = load_model()
    tasks = args.tasks.split(",")
    heldout = {t: build_task(t, h.tokenizer, n=100, seed=1) for t in tasks}
    base = task_scores(h, heldout)
    recs = known_records(h, args.n)
    rows = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for method in args.editors.split(","):
        extra = {"preserve": tasks} if args.threshold is None else {"preserve": tasks, "preserve_threshold": args.threshold}
        s_train = preserve_settings({**load_hparams(method, h), **extra})
        s_held = dict(s_train, seed=1)
        a = h.adapter
        mods = {a.name_of(a.mlp_out(l).weight): a.mlp_out(l) for l in load_hparams(method, h)["layers"]}
        for st in (s_train, s_held):   # read on the unedited model, before any edit
            task_key_moments(h, mods, st)
        for rec in recs:
            req = read_requests([rec])
            row = {"editor": method, "case": rec["case_id"]}
            for cond, hp in (("plain", {}), ("preserved", extra)):
                e = edit(h, req, method, hp)
                try:
                    row[cond] = {"success": float(scores(h, [rec])["efficacy"][0]),
                                 "task_change": {t: v - base[t] for t, v in task_scores(h, heldout).items()},
                                 "keys_train": key_change(h, e, s_train), "keys_heldout": key_change(h, e, s_held),
                                 "norm": sum(v * v for v in e.norms().values()) ** 0.5}
                    if cond == "preserved":
                        info = e.info
                        row[cond]["removed"] = ([r["preserve_removed"] for r in info.get("requests", [])
                                                 if isinstance(r, dict) and "preserve_removed" in r]
                                                or [p["removed"] for p in info.get("preserve", {}).get("projection", [])])
                finally:
                    e.undo()
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\nmean success, medians otherwise, over {len(recs)} edits, tasks {tasks} (task change on 100 held-out prompts each)")
    print(f"{'editor':<10} {'condition':<10} {'success':>7} {'|Δ task|':>9} {'keys (train)':>12} {'keys (held-out)':>15}"
          f" {'removed':>8}")
    for method in args.editors.split(","):
        sub = [r for r in rows if r["editor"] == method]
        ratios = []
        for cond in ("plain", "preserved"):
            med = lambda xs: statistics.median(xs)  # noqa: E731
            dt = med([abs(v) for r in sub for v in r[cond]["task_change"].values()])
            kt = med([v for r in sub for v in r[cond]["keys_train"].values()])
            kh = med([v for r in sub for v in r[cond]["keys_heldout"].values()])
            rem = med([v for r in sub for v in r[cond].get("removed", [])]) if cond == "preserved" else None
            ratios.append(dt)
            print(f"{method:<10} {cond:<10} {statistics.mean([r[cond]['success'] for r in sub]):>7.2f} {dt:>9.2e} {kt:>12.2e} "
                  f"{kh:>15.2e} {'' if rem is None else f'{rem:.1%}':>8}")
        print(f"{method:<10} ratio |Δ task| preserved / plain: {ratios[1] / max(ratios[0], 1e-12):.3f}")


if __name__ == "__main__":
    main()
