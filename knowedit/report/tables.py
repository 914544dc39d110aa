"""Result tables from saved records: a long table (one row per edit × condition × metric) and an
aggregated view (editor × condition), written as CSV, Markdown and LaTeX."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ..errors import KnoweditError
from ..evaluation.edit_metrics import aggregate_cf_s
from ..evaluation.results import RESULTS, load_records, result_files

UNEDITED = "(unedited)"
# Column order of the aggregated view; other metrics follow alphabetically.
ORDER = ["cf_es", "cf_ps", "cf_ns", "cf_s", "cf_em", "cf_pm", "cf_nm", "cf_gen_entropy",
         "ee_rewrite_acc", "ee_rephrase_acc", "ee_locality_acc", "ee_portability_acc", "ppl_heldout",
         "edit_norm_total"]


def load_results(directory) -> tuple[list[dict], dict]:
    """The records of ``directory`` (its shard files merged, each record once) and its ``run.json``."""
    directory = Path(directory)
    if not result_files(directory):
        raise KnoweditError(f"{directory}: no {RESULTS} (nor results.shard-*.jsonl) here; run "
                            f"'knowedit eval SUITE --out {directory}' first")
    meta_p = directory / "run.json"
    meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
    return load_records(directory), meta


def long_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        before = r.get("before") or {}
        for k, v in (r.get("metrics") or {}).items():
            b = before.get(k)
            rows.append({"case_id": r["case_id"], "editor": r["editor"], "condition": r["condition"], "metric": k,
                         "before": b, "after": v, "delta": (v - b) if b is not None and v is not None else None})
    cols = ["case_id", "editor", "condition", "metric", "before", "after", "delta"]
    return pd.DataFrame(rows, columns=cols)


def _ordered(cols):
    first = [c for c in ORDER if c in cols]
    return first + sorted(c for c in cols if c not in first)


def summary_table(records: list[dict], include_unedited: bool = True) -> pd.DataFrame:
    """Mean of each metric per (editor, condition); ``cf_s`` is the harmonic mean of the mean ES, PS
    and NS (ROME's aggregate), not the mean of per-edit S. A first row gives the unedited model."""
    ok = [r for r in records if not r.get("error")]
    rows = []
    if include_unedited and ok:
        seen, befores = set(), []
        for r in ok:
            if r["case_id"] not in seen:
                seen.add(r["case_id"])
                befores.append({k: v for k, v in (r.get("before") or {}).items()})
        rows += [{"editor": UNEDITED, "condition": "-", **b} for b in befores]
    rows += [{"editor": r["editor"], "condition": r["condition"], **r["metrics"]} for r in ok]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    keys = ["editor", "condition"]
    g = df.groupby(keys, sort=False)
    out = g.mean(numeric_only=True)
    if {"cf_es", "cf_ps", "cf_ns"} <= set(out.columns):
        out["cf_s"] = [aggregate_cf_s(a, b, c) if not any(map(_nan, (a, b, c))) else float("nan")
                       for a, b, c in zip(out["cf_es"], out["cf_ps"], out["cf_ns"])]
    out = out[_ordered([c for c in out.columns if not c.endswith("_delta") and c != "edit_n_matrices"])]
    out.insert(0, "n", g.size())
    errs = pd.Series({(r["editor"], r["condition"]): 0 for r in records})
    for r in records:
        if r.get("error"):
            errs[(r["editor"], r["condition"])] += 1
    if errs.sum():
        # A condition whose every edit was refused still gets a row (n = 0), so a reader sees that
        # the editor could not write there rather than a silently missing condition.
        missing = [k for k in errs.index if k not in out.index]
        if missing:
            out = pd.concat([out, pd.DataFrame({"n": [0] * len(missing)},
                                               index=pd.MultiIndex.from_tuples(missing, names=keys))])
        out["errors"] = [int(errs.get(i, 0)) for i in out.index]
    return out


def _nan(x):
    return x is None or (isinstance(x, float) and math.isnan(x))


def collateral_table(records: list[dict]) -> pd.DataFrame:
    """Mean change of each task's score per (editor, condition), plus the unedited score."""
    rows = [{"editor": r["editor"], "condition": r["condition"],
             **{k[:-len("_delta")]: v for k, v in r["metrics"].items() if k.startswith("task_") and k.endswith("_delta")}}
            for r in records if not r.get("error")]
    rows = [r for r in rows if len(r) > 2]
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(rows).groupby(["editor", "condition"], sort=False).mean(numeric_only=True)
    out.columns = [f"{c}_delta" for c in out.columns]
    return out


def _numeric(col) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    d = df.reset_index() if df.index.names[0] is not None else df
    head = "| " + " | ".join(map(str, d.columns)) + " |"
    sep = "|" + "|".join("---:" if _numeric(d[c]) else "---" for c in d.columns) + "|"
    body = ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in d.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def to_latex(df: pd.DataFrame, caption: str | None = None) -> str:
    d = df.reset_index() if df.index.names[0] is not None else df
    align = "".join("r" if _numeric(d[c]) else "l" for c in d.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(_tex(c) for c in d.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(_fmt(v)) for v in row) + r" \\" for row in d.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, stem: Path, caption: str | None = None) -> list[Path]:
    from ..models.cache import atomic_write_text
    stem = Path(stem)
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".md"), stem.with_suffix(".tex")]
    atomic_write_text(paths[0], df.to_csv())
    atomic_write_text(paths[1], to_markdown(df))
    atomic_write_text(paths[2], to_latex(df, caption))
    return paths
