"""AlphaEdit's null-space threshold and L2 on the default model, beside MEMIT, on one batch of known
CounterFact records (no earlier edits).

z (the value targets) depends on neither the threshold nor L2, so it is computed once (batched) and
every setting's update is built from it, applied, scored and undone. Protocol as in bench_rome.py:
efficacy = P(new) > P(true) on the prompt, paraphrase = the same on rephrase_prompt,
neighbourhood = P(true) > P(new) on locality_prompt after the edit.

    python benchmarks/bench_alphaedit.py --n 100 --thresholds 2e-2,1e-2,5e-3 --l2 10,1
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rome import known_records, scores  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.editing import read_requests  # noqa: E402
from knowedit.editing.alphaedit import apply_alphaedit  # noqa: E402
from knowedit.editing.hparams import editor_kwargs, load_hparams  # noqa: E402
from knowedit.editing.memit import apply_memit, memit_targets  # noqa: E402


def evaluate(h, recs) -> dict:
    s = scores(h, recs)
    return {k: float(v.mean()) for k, v in s.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--thresholds", default="2e-2,1e-2,5e-3")
    ap.add_argument("--l2", default="10,1")
    args = ap.parse_args()
    h = load_model()
    recs = known_records(h, args.n)
    reqs = read_requests(recs)
    hp = editor_kwargs(load_hparams("alphaedit", h))
    t0 = time.perf_counter()
    targets = memit_targets(h, reqs, hp)
    print(f"{len(reqs)} known records; targets in {time.perf_counter() - t0:.0f} s")
    print(f"{'editor':<10} {'threshold':>9} {'L2':>5} {'null dims':>10} {'efficacy':>8} {'paraphrase':>10} "
          f"{'neighbourhood':>13} {'|ΔW|':>7}")
    mp = editor_kwargs(load_hparams("memit", h))
    e = apply_memit(h, reqs, mp, targets=targets)
    s = evaluate(h, recs)
    norm = sum(v * v for v in e.norms().values()) ** 0.5
    e.undo()
    print(f"{'memit':<10} {'-':>9} {'-':>5} {'-':>10} {s['efficacy']:>8.3f} {s['paraphrase']:>10.3f} "
          f"{s['neighbourhood']:>13.3f} {norm:>7.2f}", flush=True)
    for thr in [float(x) for x in args.thresholds.split(",")]:
        for l2 in [float(x) for x in args.l2.split(",")]:
            e = apply_alphaedit(h, reqs, dict(hp, nullspace_threshold=thr, L2=l2), targets=targets)
            s = evaluate(h, recs)
            norm = sum(v * v for v in e.norms().values()) ** 0.5
            dims = "/".join(str(v["null_dims"]) for v in e.info["null_space"].values())
            e.undo()
            print(f"{'alphaedit':<10} {thr:>9.0e} {l2:>5g} {dims:>10} {s['efficacy']:>8.3f} {s['paraphrase']:>10.3f} "
                  f"{s['neighbourhood']:>13.3f} {norm:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
