"""``knowedit`` command line. Each sub-command lives in ``knowedit/cli/commands/<name>.py`` and
defines ``add_parser(subparsers)`` and ``run(args)``; they are found automatically."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import KnoweditError, ModelLoadError
from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowedit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except (KnoweditError, ModelLoadError) as e:
        print(f"knowedit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
