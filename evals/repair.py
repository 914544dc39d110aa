"""Regenerate the circuit-reuse repair table (README, "Circuit reuse"): Colored Objects on the default
model repaired by steering heads in both shipped circuits (the top 10% of heads of the IOI and the
Colored Objects circuit by |score|), the controls, and the persistent q/k repair: trained on
--train-n varied-wording prompts over training-only colours and objects, scored on --eval-n held-out
prompts per source (generated; cobjs and BIG-bench when --held-out-data has them, by default
../shared/datasets beside the project).

    python evals/repair.py [--n 40] [--seed 0] [--train-n 200] [--eval-n 50] [--out results/repair/table.txt]

It is `knowedit repair` with the shipped circuits; the command it runs is printed first."""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIRCUITS = ROOT / "circuits" / "smollm2-135m"
SHARED = ROOT.parent / "shared" / "datasets"


def main(argv=None):
    from knowedit.cli.main import main as cli

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-share", type=float, default=0.1)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--train-n", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--held-out-data", default=str(SHARED) if SHARED.is_dir() else None)
    p.add_argument("--heads", default=None, help="fix the steered heads (skips the greedy choice)")
    p.add_argument("--distil", default=None, help="distillation settings, as `knowedit repair --distil`")
    p.add_argument("--persistent-only", action="store_true",
                   help="with --heads: only the persistent repair's held-out table (skips ranking and controls)")
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    cmd = ["repair", "--source", "ioi", "--target", "colored-objects",
           "--source-circuit", str((CIRCUITS / "ioi.json").relative_to(ROOT)),
           "--target-circuit", str((CIRCUITS / "colored-objects.json").relative_to(ROOT)),
           "--top-share", str(args.top_share), "--k", str(args.k), "--persistent",
           "--n", str(args.n), "--seed", str(args.seed), "--train-n", str(args.train_n), "--eval-n", str(args.eval_n)]
    if args.held_out_data:
        cmd += ["--held-out-data", args.held_out_data]
    for opt in ("heads", "distil"):
        if getattr(args, opt):
            cmd += [f"--{opt}", getattr(args, opt)]
    if args.persistent_only:
        cmd.append("--persistent-only")
    print("knowedit " + shlex.join(cmd), flush=True)
    buf = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(buf):
        code = cli(cmd)
    sys.stdout.write(buf.getvalue())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("knowedit " + shlex.join(cmd) + "\n" + buf.getvalue())
    return code


if __name__ == "__main__":
    sys.exit(main())
