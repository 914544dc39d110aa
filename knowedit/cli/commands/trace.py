"""``knowedit trace``: causal tracing (Meng et al. 2022) of facts, with heatmaps."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ...errors import KnoweditError
from ...tasks.datafile import read_json_or_lines
from ..model_options import add_model_args, load_from_args


def add_parser(sub):
    p = sub.add_parser("trace", help="causal tracing of facts: which hidden states, MLPs and attention layers "
                                     "carry them (ROME §2)")
    p.add_argument("--requests", required=True,
                   help="JSON list (or JSONL) of facts: prompt, subject and optionally the answer (edit-request "
                        "formats and ROME's known-facts file work); without an answer the model's prediction is traced")
    add_model_args(p)
    p.add_argument("--out", required=True, help="directory for per-fact JSON + PNG, summary.json and index.html")
    p.add_argument("--seeds", type=int, default=5, help="noise samples per fact (ROME: 10; default 5)")
    p.add_argument("--window", type=int, default=10, help="layers restored together in the windowed MLP/attention "
                                                          "traces (ROME: 10)")
    p.add_argument("--noise", type=float, default=3.0, help="noise scale in units of the embedding std σ (ROME: 3)")
    p.add_argument("--noise-std", type=float, default=None,
                   help="σ itself (default: the std of all token-embedding entries)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    return p


def _slug(i: int, subject: str) -> str:
    return f"{i:03d}-" + (re.sub(r"[^A-Za-z0-9]+", "-", subject).strip("-")[:40] or "fact")


def _check(args) -> None:
    if args.seeds < 1:
        raise KnoweditError(f"--seeds: {args.seeds}; give at least 1 noise seed (ROME uses 10)")
    if args.window < 1:
        raise KnoweditError(f"--window: {args.window}; give a positive number of layers (ROME uses 10)")
    if not args.noise > 0:
        raise KnoweditError(f"--noise: {args.noise}; give a positive multiple of σ (ROME uses 3)")
    if args.noise_std is not None and not args.noise_std > 0:
        raise KnoweditError(f"--noise-std: {args.noise_std}; give a positive σ or leave it out")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise KnoweditError(f"--out: {out} is a file; give a directory")


def run(args):
    from ...discovery.causal_trace import TraceResult, locate_subject, trace
    from ...discovery.trace_requests import read_trace_requests
    from ...discovery.trace_summary import aggregate, last_subject_profile
    from ...models.cache import atomic_write_bytes, atomic_write_text
    from ...report.traces import trace_png, write_trace_page

    _check(args)
    data = read_json_or_lines(args.requests, "--requests", "give a JSON list or JSON lines of facts")
    reqs = read_trace_requests(data)
    handle = load_from_args(args)
    n_layers = handle.adapter.n_layers
    if args.window > n_layers:
        raise KnoweditError(f"--window: {args.window} is more than the model's {n_layers} layers")
    for r in reqs:   # token positions need the tokenizer; still before anything is written
        locate_subject(handle, r.prompt, r.subject, r.label)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {handle.name} ({n_layers} layers); {len(reqs)} fact(s); {args.seeds} seeds, noise {args.noise}σ, "
          f"window {args.window}")
    want = {"seeds": args.seeds, "noise": args.noise, "window": args.window, "seed": args.seed,
            "fingerprint": handle.fingerprint}
    results, rows, t0 = [], [], time.perf_counter()
    for i, r in enumerate(reqs):
        path = out / f"{_slug(i, r.subject)}.json"
        res = None
        if path.exists():   # resume: reuse a finished trace made with the same settings
            old = TraceResult.from_dict(json.loads(path.read_text()))
            if all(old.settings.get(k) == v for k, v in want.items()) and old.prompt == r.text.rstrip() and \
                    (args.noise_std is None or old.settings.get("noise_std") == args.noise_std):
                res = old
        fresh = res is None
        if fresh:
            res = trace(handle, r.prompt, r.subject, r.answer, seeds=args.seeds, noise=args.noise, window=args.window,
                        noise_std=args.noise_std, seed=args.seed, where=r.label)
            atomic_write_text(path, json.dumps(res.to_dict()) + "\n")
            atomic_write_bytes(path.with_suffix(".png"), trace_png(res))
        results.append(res)
        lw, l1 = res.best_layer("mlp_window"), res.best_layer("mlp")
        rows.append({"file": path.name, "label": r.label, "prompt": res.prompt, "answer": res.answer,
                     "p_clean": res.p_clean, "p_corrupt": res.p_corrupt, "mlp_window_peak_layer": lw,
                     "mlp_peak_layer": l1, "seconds": res.settings.get("seconds")})
        print(f"[{i + 1}/{len(reqs)}] {res.prompt!r} -> {res.answer!r} p {res.p_clean:.3f} (corrupted "
              f"{res.p_corrupt:.3f}): largest MLP effect at the last subject token {res.tokens[res.last_subject]!r}: "
              f"layer {lw} (window {args.window}, AIE {res.profile('mlp_window')[lw]:.4f}), single layer {l1} "
              f"(AIE {res.profile('mlp')[l1]:.4f}); " + (f"{res.settings.get('seconds', 0):.1f} s" if fresh else
                                                      f"reused {path.name}"), flush=True)
    summary = aggregate(results)
    prof_w, prof_1 = last_subject_profile(results, "mlp_window"), last_subject_profile(results, "mlp")
    agg = {"n": len(results), "mlp_window_peak_layer": int(prof_w.argmax()), "mlp_peak_layer": int(prof_1.argmax()),
           "mlp_window_last_subject": [round(float(x), 5) for x in prof_w],
           "mlp_last_subject": [round(float(x), 5) for x in prof_1],
           "peaks": summary["peaks"], "counts": summary["counts"],
           "bucketed": {k: [[round(float(x), 5) for x in row] for row in v] for k, v in summary["kinds"].items()}}
    doc = {"settings": {**{k: results[0].settings.get(k) for k in ("noise", "noise_std", "noise_std_source", "seeds",
                                                                    "seed", "window", "model", "fingerprint")}},
           "facts": rows, "aggregate": agg, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "summary.json", json.dumps(doc, indent=1) + "\n")
    write_trace_page(results, out, summary)
    print(f"\naverage over {len(results)} fact(s): largest MLP effect at the last subject token: layer "
          f"{agg['mlp_window_peak_layer']} (window {args.window}, AIE {prof_w.max():.4f}), single layer "
          f"{agg['mlp_peak_layer']} (AIE {prof_1.max():.4f})")
    print(f"wrote {out}/summary.json, index.html and {len(results)} JSON + PNG pair(s)")
