"""Report figures, each returned as a base64 PNG so the HTML report carries them inline."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..models import components as C  # noqa: E402

COND_COLORS = {"none": "#7f7f7f", "circuit": "#d62728", "complement": "#1f77b4", "random": "#2ca02c"}


def to_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def metric_bars(summary, metrics: list[str]) -> str | None:
    """One panel per metric: a bar per editor, grouped by mask condition."""
    metrics = [m for m in metrics if m in summary.columns]
    if not metrics:
        return None
    df = summary.reset_index()
    df = df[df["editor"] != "(unedited)"]
    editors = list(dict.fromkeys(df["editor"]))
    conds = list(dict.fromkeys(df["condition"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    w = 0.8 / max(len(conds), 1)
    for ax, m in zip(axes[0], metrics):
        for j, c in enumerate(conds):
            vals = [df[(df.editor == e) & (df.condition == c)][m].mean() for e in editors]
            ax.bar(np.arange(len(editors)) + j * w, vals, w, label=c, color=COND_COLORS.get(c))
        ax.set_xticks(np.arange(len(editors)) + w * (len(conds) - 1) / 2, editors, rotation=30)
        ax.set_title(m, fontsize=9)
    axes[0][0].legend(fontsize=7, title="mask", title_fontsize=7)
    fig.tight_layout()
    return to_base64(fig)


def probability_shifts(records: list[dict]) -> str | None:
    """P(new) before vs after, one point per edit, one panel per editor, coloured by condition."""
    pts = [(r["editor"], r["condition"], r["before"].get("cf_p_new"), r["metrics"].get("cf_p_new"))
           for r in records if not r.get("error") and r.get("metrics")]
    pts = [p for p in pts if p[2] is not None and p[3] is not None]
    if not pts:
        return None
    editors = list(dict.fromkeys(p[0] for p in pts))
    fig, axes = plt.subplots(1, len(editors), figsize=(3.4 * len(editors), 3.2), squeeze=False)
    for ax, e in zip(axes[0], editors):
        for c in dict.fromkeys(p[1] for p in pts):
            xs = [p[2] for p in pts if p[0] == e and p[1] == c]
            ys = [p[3] for p in pts if p[0] == e and p[1] == c]
            ax.scatter(xs, ys, s=14, alpha=0.8, label=c, color=COND_COLORS.get(c))
        ax.plot([1e-8, 1], [1e-8, 1], lw=0.6, color="k")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("P(new) before")
        ax.set_ylabel("P(new) after")
        ax.set_title(e, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return to_base64(fig)


def circuit_heatmap(circuit: dict, title: str = "") -> str | None:
    """Head-importance heatmap (layers × heads) from a circuit file's node scores; MLPs as a last column."""
    model = circuit.get("model") or {}
    n_l, n_h = model.get("n_layers"), model.get("n_heads")
    if not n_l or not n_h:
        return None
    grid = np.full((n_l, n_h + 1), np.nan)
    for name, score in (circuit.get("nodes") or {}).items():
        c = C.parse(name)
        if c.kind == "head":
            grid[c.layer, c.head] = score
        elif c.kind == "mlp":
            grid[c.layer, n_h] = score
    fig, ax = plt.subplots(figsize=(0.35 * (n_h + 1) + 1.5, 0.18 * n_l + 1.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n_h + 1), [f"h{h}" for h in range(n_h)] + ["mlp"], fontsize=6)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    return to_base64(fig)


def attention_before_after(item: dict) -> str:
    """Attention of one steered head from the final position: before vs after, per source token."""
    toks = item.get("tokens") or [str(i) for i in range(len(item["before"]))]
    x = np.arange(len(toks))
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(toks)), 2.6))
    ax.bar(x - 0.2, item["before"], 0.4, label="before", color="#7f7f7f")
    ax.bar(x + 0.2, item["after"], 0.4, label="after", color="#d62728")
    ax.set_xticks(x, toks, rotation=90, fontsize=6)
    ax.set_title(f"{item.get('head', '')} attention", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return to_base64(fig)


def collateral_bars(collateral) -> str | None:
    if collateral is None or collateral.empty:
        return None
    df = collateral.reset_index()
    labels = [f"{e}/{c}" for e, c in zip(df.editor, df.condition)]
    tasks = [c for c in df.columns if c.endswith("_delta")]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) * len(tasks)), 3))
    w = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        ax.bar(np.arange(len(labels)) + j * w, df[t], w, label=t)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(labels)) + w * (len(tasks) - 1) / 2, labels, rotation=30, fontsize=7)
    ax.set_ylabel("task score after - before")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return to_base64(fig)
