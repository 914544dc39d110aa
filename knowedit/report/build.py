"""Rebuild tables and the HTML report of a results directory, without running any model."""
from __future__ import annotations

import json
from pathlib import Path

from ..models.cache import atomic_write_text
from . import plots
from .html import esc, img, page, table_html
from .tables import collateral_table, load_results, long_table, summary_table, write_table

NOTES = {
    "cf": "cf_* = CounterFact probability protocol (Meng et al. 2022): P from the mean per-token NLL of ' '+target; "
          "ES/PS/NS are the shares of prompts where the right answer wins, EM/PM/NM the probability margins, "
          "S the harmonic mean of mean ES, PS, NS; cf_gen_entropy is ROME's weighted bigram/trigram entropy.",
    "ee": "ee_* = EasyEdit protocol: teacher-forced token accuracy of the argmax; locality compares post-edit "
          "with pre-edit argmax tokens.",
    "other": "ppl_heldout = perplexity on knowedit's built-in held-out paragraphs; edit_norm_total = Frobenius "
             "norm of all weight changes; task_*_delta = task score after minus before the edit.",
}


def build_report(results_dir, out=None, title: str | None = None) -> dict[str, Path]:
    """Write ``tables/*.{csv,md,tex}`` and ``report.html`` under ``out`` (default: the results dir).

    Optional inputs in the results dir: ``circuits/*.json`` (heatmaps), ``attention.json``
    (a list of ``{"head", "tokens", "before", "after"}`` for steered heads) and ``traces/`` (the output
    of ``knowedit trace``: causal-trace heatmaps)."""
    results_dir = Path(results_dir)
    out = Path(out) if out else results_dir
    records, meta = load_results(results_dir)
    summary = summary_table(records)
    coll = collateral_table(records)
    long = long_table(records)
    paths = {}
    tdir = out / "tables"
    name = meta.get("suite_name", results_dir.name)
    for key, df, cap in (("summary", summary, f"{name}: mean metrics per editor and mask condition"),
                         ("collateral", coll, f"{name}: change of task scores after editing")):
        if not df.empty:
            for p in write_table(df, tdir / key, cap):
                paths[f"{key}{p.suffix}"] = p
    atomic_write_text(tdir / "long.csv", long.to_csv(index=False))
    paths["long.csv"] = tdir / "long.csv"

    sections = [("Summary (editor × mask condition)", table_html(summary) +
                 "".join(f"<p class='note'>{esc(v)}</p>" for v in NOTES.values()))]
    sections.append(("Metrics per editor and mask condition", img(plots.metric_bars(
        summary, ["cf_es", "cf_ps", "cf_ns", "cf_s", "ee_rewrite_acc", "ee_locality_acc"]), "metric bars")))
    sections.append(("Per-edit probability shifts", img(plots.probability_shifts(records), "P(new) before/after")))
    if not coll.empty:
        tasks = meta.get("tasks", {})
        note = "; ".join(f"{k}: {v.get('metric')} over {v.get('n')} prompts" for k, v in tasks.items())
        sections.append(("Collateral effects on circuit tasks", table_html(coll) +
                         img(plots.collateral_bars(coll), "collateral") + f"<p class='note'>{esc(note)}</p>"))
    heat = []
    for p in sorted((results_dir / "circuits").glob("*.json")):
        c = json.loads(p.read_text())
        heat.append(f"<h3>{esc(p.stem)}</h3>" + img(plots.circuit_heatmap(c, f"{p.stem}: {c.get('task', {}).get('name')}"),
                                                    p.stem))
    if heat:
        sections.append(("Circuits used (node scores: layers × heads, MLP last column)", "".join(heat)))
    att = results_dir / "attention.json"
    if att.exists():
        items = json.loads(att.read_text())
        sections.append(("Attention of steered heads, before and after",
                         "".join(img(plots.attention_before_after(it), it.get("head", "head")) for it in items)))
    traced = sorted((results_dir / "traces").glob("*.json")) if (results_dir / "traces").is_dir() else []
    traced = [t for t in traced if t.name != "summary.json"]
    if traced:   # `knowedit trace --out RESULTS/traces`
        from ..discovery.causal_trace import TraceResult
        from ..discovery.trace_summary import aggregate
        from .traces import trace_sections
        trs = [TraceResult.from_dict(json.loads(t.read_text())) for t in traced]
        sections.extend(trace_sections(trs, aggregate(trs)))
    gens = [r for r in records if r.get("generation")]
    if gens:
        rows = "".join(
            f"<tr><td class='t'>{esc(r['editor'])}/{esc(r['condition'])}</td><td class='t'>{esc(r['generation']['prompt'])}"
            f"</td><td class='t'>{esc(r['target_true'])} → {esc(r['target_new'])}</td>"
            f"<td class='t'>{esc(r['generation']['before'])}</td><td class='t'>{esc(r['generation']['after'])}</td></tr>"
            for r in gens[:12])
        sections.append(("Generation examples", "<table><thead><tr><th>edit</th><th>prompt</th><th>fact</th>"
                         f"<th>before</th><th>after</th></tr></thead><tbody>{rows}</tbody></table>"))
    errs = [r for r in records if r.get("error")]
    if errs:
        sections.append(("Edits that failed", "<ul>" + "".join(
            f"<li>{esc(r['key'])}: {esc(r['error'])}</li>" for r in errs[:50]) + "</ul>"))
    info = {"suite": name, "model": meta.get("model"), "fingerprint": meta.get("model_fingerprint"),
            "records": len(records)}
    html_path = out / "report.html"
    atomic_write_text(html_path, page(title or f"knowedit report: {name}", sections, info))
    paths["report.html"] = html_path
    return paths
