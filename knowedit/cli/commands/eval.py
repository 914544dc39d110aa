"""``knowedit eval SUITE``: run an evaluation suite (resumable), then write its tables and report."""
from __future__ import annotations

from pathlib import Path

from ..model_options import add_model_args, model_kwargs


def add_parser(sub):
    p = sub.add_parser("eval", help="run an evaluation suite from evals/ (resumes where it stopped)")
    p.add_argument("suite", help="suite file, e.g. evals/editors_x_masks.yaml")
    p.add_argument("--out", default=None, help="results directory (default: results/<suite name>)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N cases (a quick run; lifelong: N edits)")
    p.add_argument("--data", default=None, help="local dataset file (instead of the suite's path or a download)")
    add_model_args(p, model_help="override the suite's model (Hugging Face id or directory)")
    p.add_argument("--no-report", action="store_true", help="only write results.jsonl")
    from ...evaluation.shards import SHARD_HELP
    p.add_argument("--shard", default=None, metavar="INDEX/COUNT", help=SHARD_HELP)
    return p


def run(args):
    from ...evaluation.runner import is_complete, run_suite
    from ...evaluation.shards import resolve_shard
    from ...evaluation.suite import load_suite
    from ...report import build_report

    shard = resolve_shard(getattr(args, "shard", None))   # a bad --shard fails before anything loads
    load_kw = model_kwargs(args)                           # and so do bad --dtype / --device-map
    study = _is_study(args.suite)
    if study:
        return run_study_cli(args, study, shard, load_kw)
    suite = load_suite(args.suite)
    if args.model:
        suite.model = args.model
    out = Path(args.out or Path("results") / suite.name)
    path = run_suite(suite, out, limit=args.limit, data_path=args.data, shard=shard, model_kwargs=load_kw)
    print(f"results: {path}")
    if not args.no_report and _report_now(shard, out, is_complete):
        paths = build_report(out)
        print(f"report: {paths['report.html']}")
        if "summary.md" in paths:
            print(paths["summary.md"].read_text())


def _report_now(shard, out: Path, is_complete) -> bool:
    """One process, or the shard that finds every shard's results in: the last one to finish reports."""
    if shard is None or is_complete(out):
        return True
    print(f"shard {shard} finished; the last shard to finish writes the report (or run: knowedit report {out})")
    return False


def _is_study(path) -> str | None:
    """The ``study:`` field of a suite that runs a dedicated study (e.g. evals/granularity.yaml), else None."""
    import yaml
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) if p.is_file() else None
    except yaml.YAMLError:
        return None   # load_suite reports the YAML error
    return str(data["study"]) if isinstance(data, dict) and "study" in data else None


def _study(name: str):
    """(load, run, report) of the study named by a suite's ``study:`` field."""
    if name == "lifelong":
        from ...evaluation.lifelong import run_lifelong
        from ...evaluation.lifelong_suite import load_lifelong
        from ...report.lifelong import write_lifelong_report
        return load_lifelong, run_lifelong, write_lifelong_report
    if name == "restricted-edits":
        from ...evaluation.granularity import load_study, run_study
        from ...report.granularity import write_study_report
        return load_study, run_study, write_study_report
    from ...errors import KnoweditError
    raise KnoweditError(f"study: {name!r} is unknown; use restricted-edits (evals/granularity.yaml) or lifelong "
                        "(evals/lifelong.yaml), or drop the field for an ordinary suite")


def run_study_cli(args, study: str = "restricted-edits", shard=None, load_kw=None):
    if shard is not None and study != "lifelong":
        from ...errors import KnoweditError
        raise KnoweditError(f"study: {study} runs in one process (its records go through one results file and "
                            "shared neuron circuits, with no shards); drop --shard, or start it without torchrun / "
                            "accelerate launch")
    load, run_study, write_report = _study(study)
    st = load(args.suite)
    if args.model:
        st.model = args.model
    out = Path(args.out or Path("results") / st.name)
    # lifelong: each shard runs whole editors (an editor's edits are sequential)
    kw = {"shard": shard} if shard is not None else {}
    if load_kw and any(v is not None for v in load_kw.values()):
        kw["model_kwargs"] = load_kw
    print(f"results: {run_study(st, out, limit=args.limit, data_path=args.data, **kw)}")
    from ...evaluation.lifelong import is_complete
    if not args.no_report and _report_now(shard, out, is_complete):
        paths = write_report(out)
        print(paths["table.md"].read_text())
        for k in ("plot.png", "report.html"):
            if k in paths:
                print(f"{k.split('.')[0]}: {paths[k]}")
