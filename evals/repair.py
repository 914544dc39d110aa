"""Regenerate the circuit-reuse repair table (README, "Circuit reuse"): Colored Objects on the default
model repaired by steering heads in both shipped circuits (the top 10% of heads of the IOI and the
Colored Objects circuit by |score|), the controls, and the persistent q/k repair.

    python evals/repair.py [--n 40] [--seed 0] [--out results/repair/table.txt]

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


def main(argv=None):
    from knowedit.cli.main import main as cli

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-share", type=float, default=0.1)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    cmd = ["repair", "--source", "ioi", "--target", "colored-objects",
           "--source-circuit", str((CIRCUITS / "ioi.json").relative_to(ROOT)),
           "--target-circuit", str((CIRCUITS / "colored-objects.json").relative_to(ROOT)),
           "--top-share", str(args.top_share), "--k", str(args.k), "--persistent",
           "--n", str(args.n), "--seed", str(args.seed)]
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
