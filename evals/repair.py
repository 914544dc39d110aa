"""Regenerate the circuit-reuse repair table (issue 5): Colored Objects repaired with heads shared
with IOI on the default model, controls, and the persistent q/k repair.

    PYTHONPATH=. python evals/repair.py [--n 24] [--seed 0] [--out evals/results/repair.md]

Uses the published Colored Objects prompts from the shared datasets when present."""
from __future__ import annotations

import argparse
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main(argv=None):
    from tqdm.auto import tqdm

    from knowedit.models import load_model
    from knowedit.reuse import repair

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="topk", choices=["topk", "greedy"])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    handle = load_model()
    res = repair(handle, n=args.n, seed=args.seed, data_dir=DATA if DATA.exists() else None, method=args.method,
                 k=args.k, persistent=True,
                 batch_size=args.n, progress=tqdm)
    text = str(res)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
