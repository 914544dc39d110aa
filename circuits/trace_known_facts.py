"""Causal traces of known facts on the default model, averaged as in ROME's figure.

    OMP_NUM_THREADS=1 python circuits/trace_known_facts.py [--n 50] [--facts PATH] [--work DIR]

Picks the ``--n`` facts of ROME's known-facts file (../shared/datasets/facts/known_1000.json) whose
answer's first token is the model's top prediction, with the highest probability of it; traces each
(every token × layer, hidden / MLP / attention, single layers and windows of 10, 5 noise seeds,
noise 3σ); and writes ``smollm2-135m/traces/``: ``traces.json`` (settings, the facts, each fact's
effects rounded to 4 digits, the bucketed averages) and one averaged heatmap PNG per kind. Per-fact
traces are kept in ``--work`` as they finish, so an interrupted run resumes."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from knowedit import load_model  # noqa: E402
from knowedit.discovery.causal_trace import GRID_KINDS, TraceResult, trace  # noqa: E402
from knowedit.discovery.trace_requests import read_trace_requests  # noqa: E402
from knowedit.discovery.trace_summary import aggregate  # noqa: E402
from knowedit.models.cache import atomic_write_text  # noqa: E402

OUT = ROOT / "circuits" / "smollm2-135m" / "traces"


@torch.no_grad()
def known_facts(h, records, n: int) -> list[dict]:
    """The ``n`` records whose answer (first token of ' ' + attribute) the model predicts, most
    probable first."""
    reqs = read_trace_requests(records)
    scored = []
    for i in range(0, len(reqs), 64):
        chunk = reqs[i:i + 64]
        probs = h.next_token_probs([r.text for r in chunk])
        for j, r in enumerate(chunk):
            tid = h.tokenizer(" " + r.answer, add_special_tokens=False)["input_ids"][0]
            if int(probs[j].argmax()) == tid:
                scored.append((float(probs[j, tid]), i + j))
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [dict(records[i], _p=p) for p, i in scored[:n]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--facts", default=str(ROOT.parent / "shared" / "datasets" / "facts" / "known_1000.json"))
    ap.add_argument("--work", default=str(ROOT / "results" / "known-fact-traces"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--finished-only", action="store_true",
                    help="write the outputs from the traces already in --work, tracing nothing")
    args = ap.parse_args()
    t_start = time.perf_counter()
    h = load_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    picked = work / f"selection-{args.n}-{h.fingerprint}.json"
    if picked.exists():
        facts = json.loads(picked.read_text())
    elif args.finished_only:   # the finished traces, in the selection's order (by p)
        by_id = {r["known_id"]: r for r in json.loads(Path(args.facts).read_text())}
        traced = [(json.loads(p.read_text())["p_clean"], int(p.stem.split("_")[1])) for p in work.glob("known_*.json")]
        facts = [dict(by_id[i], _p=p) for p, i in sorted(traced, key=lambda x: (-x[0], x[1]))]
    else:
        facts = known_facts(h, json.loads(Path(args.facts).read_text()), args.n)
        atomic_write_text(picked, json.dumps(facts) + "\n")
    print(f"{len(facts)} facts picked (p from {facts[0]['_p']:.3f} down to {facts[-1]['_p']:.3f})", flush=True)
    results, done = [], []
    for i, f in enumerate(facts):
        path = work / f"known_{f['known_id']}.json"
        if path.exists():
            results.append(TraceResult.from_dict(json.loads(path.read_text())))
            done.append(f)
            continue
        if args.finished_only:
            continue
        r = trace(h, f["prompt"], f["subject"], f["attribute"], seeds=args.seeds, where=f"known_id {f['known_id']}")
        atomic_write_text(path, json.dumps(r.to_dict()) + "\n")
        results.append(r)
        done.append(f)
        print(f"[{i + 1}/{len(facts)}] {r.prompt!r} -> {r.answer!r}: p {r.p_clean:.3f} / corrupted {r.p_corrupt:.3f}, "
              f"{r.settings['seconds']:.0f} s, MLP(window) peak at layer {r.best_layer('mlp_window')}", flush=True)
    write(h, done, results, args, time.perf_counter() - t_start)


def write(h, facts, results, args, wall: float) -> None:
    summary = aggregate(results)
    OUT.mkdir(parents=True, exist_ok=True)
    from knowedit.report.traces import aggregate_png
    window = results[0].settings["window"]
    for k in GRID_KINDS:
        (OUT / f"average_{k}.png").write_bytes(aggregate_png(summary, k, window))
    s0 = results[0].settings
    trace_s = sum(r.settings.get("seconds", 0) for r in results)
    doc = {
        "description": "Causal traces (Meng et al. 2022) of known facts on the default model; effects are average "
                       "indirect effects on p(first token of ' ' + answer) at the last position, "
                       "p(restored corrupted run) - p(corrupted run), averaged over noise seeds.",
        "command": f"OMP_NUM_THREADS=1 python circuits/trace_known_facts.py --n {args.n} --seeds {args.seeds}",
        "trace_seconds": round(trace_s, 1), "wall_seconds_last_run": round(wall, 1),
        "model": h.name, "fingerprint": h.fingerprint,
        "settings": {k: s0[k] for k in ("noise", "noise_std", "noise_std_source", "seeds", "seed", "window",
                                         "answer_source")},
        "selection": "known_1000 records whose answer's first token is the model's top prediction, highest p first",
        "summary": {**{k: v for k, v in summary.items() if k != "kinds"},
                    "kinds": {k: [[round(float(x), 4) for x in row] for row in v]
                              for k, v in summary["kinds"].items()}},
        "facts": [],
    }
    for r, f in zip(results, facts):
        d = r.to_dict(digits=4)
        d["settings"] = {"seconds": r.settings.get("seconds")}
        doc["facts"].append(dict(d, known_id=f["known_id"]))
    atomic_write_text(OUT / "traces.json", json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}: {len(results)} facts, {trace_s:.0f} s of tracing")
    for k, p in summary["peaks"].items():
        print(f"  {k}: largest average effect {p['effect']:.4f} at the {p['bucket']}, layer {p['layer']}")


if __name__ == "__main__":
    main()
