"""``knowedit demo``: the main job on the default model."""
from __future__ import annotations

import time

from ..model_options import add_model_args, load_from_args


def add_parser(sub):
    p = sub.add_parser("demo", help="run the main job on the default model (offline): circuits, edits, repair, report")
    add_model_args(p)
    p.add_argument("--out", default="results/demo", help="results directory (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repair-n", type=int, default=40, help="Colored Objects prompts for the repair")
    return p


def run(args):
    import logging

    from ...demo import run_demo

    logging.getLogger("knowedit").setLevel(logging.ERROR)  # steering announces the eager switch per call
    t0 = time.time()
    handle = load_from_args(args)
    a = handle.adapter
    print(f"[1/4] model: {handle.name} ({a.family}, {a.n_layers} layers, {a.n_heads} heads / {a.n_kv_heads} KV heads, "
          f"fingerprint {handle.fingerprint})")
    paths = run_demo(handle, out=args.out, repair_n=args.repair_n, seed=args.seed)
    if "summary.md" in paths:
        print("\nEditors x mask conditions (means over the edited facts; cf_* = CounterFact probability protocol, "
              "ee_* = EasyEdit token accuracy; refused = the editor could not edit inside that mask):\n")
        print(paths["summary.md"].read_text())
    if "collateral.md" in paths:
        print("\nCollateral change of the circuit tasks after each edit (after - before, mean):\n")
        print(paths["collateral.md"].read_text())
    print(f"report: {paths.get('report.html')}")
    print(f"done in {time.time() - t0:.0f} s")
