"""``knowedit eval SUITE``: run an evaluation suite (resumable), then write its tables and report."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("eval", help="run an evaluation suite from evals/ (resumes where it stopped)")
    p.add_argument("suite", help="suite file, e.g. evals/editors_x_masks.yaml")
    p.add_argument("--out", default=None, help="results directory (default: results/<suite name>)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N cases (a quick run)")
    p.add_argument("--data", default=None, help="local dataset file (instead of the suite's path or a download)")
    p.add_argument("--model", default=None, help="override the suite's model (Hugging Face id or directory)")
    p.add_argument("--no-report", action="store_true", help="only write results.jsonl")
    return p


def run(args):
    from ...evaluation.runner import run_suite
    from ...evaluation.suite import load_suite
    from ...report import build_report

    if _is_study(args.suite):
        return run_study_cli(args)
    suite = load_suite(args.suite)
    if args.model:
        suite.model = args.model
    out = Path(args.out or Path("results") / suite.name)
    path = run_suite(suite, out, limit=args.limit, data_path=args.data)
    print(f"results: {path}")
    if not args.no_report:
        paths = build_report(out)
        print(f"report: {paths['report.html']}")
        if "summary.md" in paths:
            print(paths["summary.md"].read_text())


def _is_study(path) -> bool:
    """Suites with a ``study:`` field run a dedicated study (e.g. evals/granularity.yaml)."""
    import yaml
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) if p.is_file() else None
    except yaml.YAMLError:
        return False   # load_suite reports the YAML error
    return isinstance(data, dict) and "study" in data


def run_study_cli(args):
    from ...evaluation.granularity import load_study, run_study
    from ...report.granularity import write_study_report

    st = load_study(args.suite)
    if args.model:
        st.model = args.model
    out = Path(args.out or Path("results") / st.name)
    print(f"results: {run_study(st, out, limit=args.limit, data_path=args.data)}")
    if not args.no_report:
        paths = write_study_report(out)
        print(paths["table.md"].read_text())
        print(f"plot: {paths['plot.png']}")
