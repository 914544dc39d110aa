"""Table and plot of the restricted-edits study (``evals/granularity.yaml``): efficacy, paraphrase,
neighbourhood and ‖ΔW‖ against the share of the edit layer's neurons the edit may write."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..evaluation.granularity import summarise
from .plots import plt, to_base64
from .tables import to_markdown

COLORS = {"top": "#1b9e77", "random": "#7570b3", "bottom": "#d95f02", "all": "#333333"}


def plot(rows: list[dict], path: Path) -> None:
    metrics = [("es", "efficacy (ES)"), ("ps", "paraphrase (PS)"), ("ns", "neighbourhood (NS)"), ("dw_norm", "‖ΔW‖")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.0), squeeze=False)
    full = next((r for r in rows if r["selection"] == "all"), None)
    for ax, (m, title) in zip(axes[0], metrics):
        for sel in ("top", "random", "bottom"):
            pts = sorted((r["share"], r[m]) for r in rows if r["selection"] == sel)
            if full:
                pts.append((1.0, full[m]))
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-", ms=3, label=sel, color=COLORS[sel])
        ax.set_xscale("log")
        ax.set_xlabel("% of the edit layer's neurons")
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7, title="neurons", title_fontsize=7)
    fig.tight_layout()
    import base64
    path.write_bytes(base64.b64decode(to_base64(fig)))


def write_study_report(out: Path) -> dict:
    """``table.md``, ``table.csv`` and ``plot.png`` in ``out`` from its ``results.jsonl``."""
    out = Path(out)
    rows = summarise(out)
    meta = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else {}
    df = pd.DataFrame(rows)
    df.to_csv(out / "table.csv", index=False)
    shown = df.rename(columns={"es": "ES", "ps": "PS", "ns": "NS", "dw_norm": "‖ΔW‖", "n_neurons": "neurons"})
    shown["share"] = (shown["share"] * 100).map(lambda x: f"{x:g}%")
    width = meta.get("d_mlp") or (int(df["n_neurons"].max()) if len(df) else "")
    head = (f"ROME at layer {meta.get('layer')} restricted to a share of its {width} neurons "
            f"(CounterFact probability protocol, {int(df['records'].max()) if len(df) else 0} known records; "
            "top = the relation circuit's best-scored neurons, bottom = its worst, random = same count at random; "
            "NS over the edits that were made; a refused edit scores 0 ES and PS; task deltas on the first "
            f"{meta.get('collateral_records', 'few')} records only)\n\n")
    (out / "table.md").write_text(head + to_markdown(shown.round(3)) + "\n")
    plot(rows, out / "plot.png")
    return {"table.md": out / "table.md", "table.csv": out / "table.csv", "plot.png": out / "plot.png"}
