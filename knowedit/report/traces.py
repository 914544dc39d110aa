"""Causal-trace heatmaps (PNG) and a self-contained HTML page of them."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..models.cache import atomic_write_text  # noqa: E402
from .html import esc, page  # noqa: E402

# ROME's colours: purple for hidden states, green for MLPs, red for attention
CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "mlp_window": "Greens", "attn_window": "Reds"}
TITLES = {"hidden": "hidden state (residual after the block)", "mlp": "MLP output, single layer",
          "attn": "attention output, single layer", "mlp_window": "MLP output, window of {w} layers",
          "attn_window": "attention output, window of {w} layers"}
FIGURE_KINDS = ("hidden", "mlp_window", "attn_window")   # ROME's Figure 1


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _panel(ax, grid, labels, kind, title, window):
    im = ax.imshow(np.nan_to_num(grid, nan=0.0), aspect="auto", cmap=CMAPS.get(kind, "viridis"),
                   interpolation="nearest", vmin=min(0.0, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("layer" + (" (window centre)" if kind.endswith("_window") else ""), fontsize=8)
    ax.set_title(TITLES.get(kind, kind).format(w=window) if title is None else title, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)


def trace_png(result, kinds=FIGURE_KINDS) -> bytes:
    """One prompt's heatmaps side by side, tokens × layers; subject tokens are starred."""
    kinds = [k for k in kinds if k in result.effects]
    labels = list(result.tokens)
    for i in range(*result.subject_range):
        labels[i] = labels[i] + "*"
    labels = [repr(t)[1:-1] for t in labels]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.25 * len(labels) + 1.4), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        _panel(ax, result.effects[k], labels, k, None, result.settings.get("window"))
    fig.suptitle(f"{result.prompt!r} → {result.answer!r}: p = {result.p_clean:.3f}, corrupted {result.p_corrupt:.3f} "
                 f"(indirect effects; {result.settings.get('seeds')} seeds, noise {result.settings.get('noise')}σ)",
                 fontsize=8)
    fig.tight_layout()
    return _png(fig)


def aggregate_png(summary: dict, kind: str, window: int = 10) -> bytes:
    """The averaged heatmap of one kind over many facts, positions bucketed as in ROME's figure."""
    grid = np.asarray(summary["kinds"][kind], dtype=float)
    fig, ax = plt.subplots(figsize=(5.2, 2.2))
    labels = [f"{b} ({summary['counts'][b]})" for b in summary["buckets"]]
    _panel(ax, grid, labels, kind, f"average indirect effect, {TITLES[kind].format(w=window)}\n"
                                   f"{summary['n']} facts (facts per row in brackets)", window)
    fig.tight_layout()
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def trace_sections(results, summary: dict | None = None) -> list[tuple[str, str]]:
    """(heading, HTML) sections: the averaged heatmaps (with ``summary`` over several prompts), then
    each prompt's heatmaps and its largest MLP effect at the subject's last token."""
    sections = []
    if summary is not None and summary["n"] > 1:
        w = results[0].settings.get("window", 10)
        body = "".join(_img(aggregate_png(summary, k, w), k) for k in FIGURE_KINDS if k in summary["kinds"])
        sections.append((f"Causal traces: average over {summary['n']} prompts", body))
    for r in results:
        kind = "mlp_window" if "mlp_window" in r.effects else "mlp"
        prof = r.profile(kind)
        note = (f"<p class='note'>largest MLP effect ({kind}) at the subject's last token: layer "
                f"{int(np.nanargmax(prof))} ({np.nanmax(prof):.4f})</p>")
        sections.append((f"Causal trace: {r.prompt} → {r.answer}", _img(trace_png(r), r.prompt) + note))
    return sections


def write_trace_page(results, out_dir, summary: dict | None = None, title: str = "knowedit causal traces") -> Path:
    """``out_dir/index.html``: the averaged heatmaps (when ``summary`` is given), then each prompt's."""
    s = results[0].settings
    meta = {"model": s.get("model"), "noise": f"{s.get('noise')} × σ = {s.get('noise_std', 0):.4f} "
            f"({s.get('noise_std_source')})", "seeds": s.get("seeds"), "window": s.get("window"),
            "effect": "p(answer | corrupted, state restored) - p(answer | corrupted), averaged over seeds"}
    path = Path(out_dir) / "index.html"
    atomic_write_text(path, page(title, trace_sections(results, summary), meta))
    return path
