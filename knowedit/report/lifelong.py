"""Report of a lifelong run (``evals/lifelong.yaml``): every measured quantity against the number of
edits, one line per editor, collapse points marked (red crosses); ``table.md`` with each editor's final
row and its last row before the first collapse; ``rows.csv`` with every row. Reads only the run's files."""
from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd

from ..evaluation.lifelong_checkpoint import read_rows, read_run
from ..models.cache import atomic_write_bytes, atomic_write_text
from .build import NOTES
from .html import esc, img, page, table_html
from .plots import plt, to_base64
from .tables import to_markdown

CURVES = [("cf_es", "efficacy, all edits so far (cf_es)"), ("cf_ps", "paraphrase (cf_ps)"),
          ("cf_ns", "neighbourhood (cf_ns)"), ("ee_rewrite_acc", "rewrite token acc. (ee)"),
          ("ee_locality_acc", "locality token acc. (ee)"), ("ppl_heldout", "held-out perplexity"),
          ("gen_entropy", "generation n-gram entropy (bits)")]
TABLE = ["editor", "edits", "applied", "refused", "cf_es", "cf_ps", "cf_ns", "cf_s", "cf_es_latest", "ee_rewrite_acc",
         "ee_rephrase_acc", "ee_locality_acc", "ppl_heldout", "gen_entropy"]
NOTE = ("Each editor starts from the original weights and keeps every edit it makes. Efficacy, paraphrase and "
        "neighbourhood are over all edits applied so far (retention); at 0 edits they are the unedited model's over "
        "all requests. cf_es_latest: efficacy of the edits since the previous checkpoint. Refused edits change "
        "nothing and are left out of these means. Collapse: held-out perplexity >= {ratio} x the unedited value, "
        "or generation entropy < {emin} bits.")


def _tasks(rows: list[dict]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith("task_") and not k.endswith("_delta")})


def curves(rows: list[dict], meta: dict) -> str | None:
    if not rows:
        return None
    tasks = meta.get("tasks", {})
    panels = CURVES + [(k, f"{k[5:]} ({tasks.get(k[5:].replace('_', '-'), {}).get('metric', 'score')})")
                       for k in _tasks(rows)]
    cols = 3
    nrow = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.6 * cols, 2.8 * nrow), squeeze=False)
    rules = (meta.get("suite") or {}).get("collapse", {})
    editors = list(dict.fromkeys(r["editor"] for r in rows))
    for ax, (key, title) in zip(axes.flat, panels):
        for e in editors:
            pts = [(r["edits"], r.get(key), r["collapse"]) for r in rows if r["editor"] == e and r.get(key) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=e)
            bad = [p for p in pts if p[2]]
            if bad:
                ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=45, color="red", zorder=3)
        if key == "ppl_heldout" and rules.get("perplexity_ratio"):
            base = next((r[key] for r in rows if r["edits"] == 0), None)
            if base:
                ax.axhline(rules["perplexity_ratio"] * base, ls="--", lw=0.8, color="red")
        if key == "gen_entropy" and rules.get("entropy_min") is not None:
            ax.axhline(rules["entropy_min"], ls="--", lw=0.8, color="red")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("edits", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7, title="editor (x = collapse)", title_fontsize=7)
    fig.tight_layout()
    return to_base64(fig)


def summary_rows(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each editor's final row, and its last row before the first collapse (the final one if it never
    collapsed; none if it collapsed before any edit)."""
    cols = TABLE + _tasks(rows) + ["collapse", "seconds", "edit_seconds"]
    final, before = [], []
    for e in dict.fromkeys(r["editor"] for r in rows):
        mine = [r for r in rows if r["editor"] == e]
        final.append({**mine[-1], "collapse": ", ".join(mine[-1]["collapse_reasons"]) or "no"})
        first = next((i for i, r in enumerate(mine) if r["collapse"]), None)
        if first is None:
            before.append({**mine[-1], "collapse": "never"})
        elif first > 0:
            before.append({**mine[first - 1], "collapse": f"at {mine[first]['edits']} edits"})
    frame = lambda rs: pd.DataFrame([{c: r.get(c) for c in cols} for r in rs], columns=cols)  # noqa: E731
    return frame(final), frame(before)


def write_lifelong_report(run_dir, out=None) -> dict[str, Path]:
    """``report.html``, ``table.md``, ``rows.csv`` and ``curves.png`` in ``out`` (default: the run's
    directory) from the run's rows."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    rows, meta = read_rows(run_dir), read_run(run_dir)
    rules = (meta.get("suite") or {}).get("collapse", {})
    final, before = summary_rows(rows)
    note = NOTE.format(ratio=rules.get("perplexity_ratio"), emin=rules.get("entropy_min"))
    name = meta.get("suite_name", run_dir.name)
    md = (f"# {name}: lifelong editing ({meta.get('requests', {}).get('n', '?')} edits, model {meta.get('model')})\n\n"
          f"{note}\n\n## Final checkpoint\n\n{to_markdown(final.round(4))}\n"
          f"## Last checkpoint before collapse\n\n{to_markdown(before.round(4))}")
    paths = {"table.md": out / "table.md", "rows.csv": out / "rows.csv", "report.html": out / "report.html"}
    atomic_write_text(paths["table.md"], md)
    table = pd.DataFrame(rows).drop(columns=["refused_new"], errors="ignore")
    atomic_write_text(paths["rows.csv"], table.to_csv(index=False))
    fig = curves(rows, meta)
    if fig:
        paths["curves.png"] = out / "curves.png"
        atomic_write_bytes(paths["curves.png"], base64.b64decode(fig))
    refused = [(r["editor"], x) for r in rows for x in r.get("refused_new", [])]
    sections = [("Curves against the number of edits", img(fig, "lifelong curves") +
                 f"<p class='note'>{esc(note)}</p>"),
                ("Final checkpoint per editor", table_html(final.round(4))),
                ("Last checkpoint before collapse", table_html(before.round(4))),
                ("Protocols", "".join(f"<p class='note'>{esc(v)}</p>" for k, v in NOTES.items() if k != "other"))]
    if refused:
        sections.append(("Refused edits (nothing changed; the run went on)", "<ul>" + "".join(
            f"<li>{esc(e)}: edits {x['at']}+, cases {esc(x['cases'])}: {esc(x['type'])}: {esc(x['error'])}</li>"
            for e, x in refused[:100]) + "</ul>"))
    info = {"model": meta.get("model"), "fingerprint": meta.get("model_fingerprint"),
            "edits": meta.get("requests", {}).get("n"), "checkpoints": meta.get("checkpoints"),
            "tasks": ", ".join(f"{k}: {v.get('metric')} over {v.get('n')} prompts"
                               for k, v in meta.get("tasks", {}).items())}
    atomic_write_text(paths["report.html"], page(f"knowedit lifelong editing: {name}", sections, info))
    return paths
