"""``knowedit report RESULTS_DIR``: rebuild tables and the HTML report from saved results (no model)."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("report", help="rebuild tables and report.html from a results directory")
    p.add_argument("results", help="directory holding results.jsonl, or a lifelong run's rows.jsonl "
                                   "(from knowedit eval; the files of a run split with --shard are merged)")
    p.add_argument("--out", default=None, help="where to write tables/ and report.html (default: RESULTS)")
    p.add_argument("--title", default=None)
    return p


def run(args):
    from ...evaluation.lifelong_checkpoint import read_run
    from ...report import build_report

    if read_run(args.results).get("study") == "lifelong":   # a `knowedit eval evals/lifelong.yaml` directory
        from ...report.lifelong import write_lifelong_report
        paths = write_lifelong_report(args.results, args.out)
    else:
        paths = build_report(args.results, args.out, args.title)
    for k in sorted(paths):
        print(f"{k}: {paths[k]}")
    if "summary.md" in paths:
        print(paths["summary.md"].read_text())
