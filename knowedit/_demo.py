"""The pieces of ``knowedit demo``, kept out of the CLI so they can be called from Python."""
from __future__ import annotations

from .discovery import head_ablation_scan
from .tasks import ioi_task, score


def ioi_section(handle, n: int = 24, seed: int = 0, top: int = 10, progress=None) -> str:
    task = ioi_task(handle.tokenizer, n=n, seed=seed)
    ld = score(handle, task)
    df = head_ablation_scan(handle, task, progress=progress)
    lines = [
        f"\nIOI ({len(task)} prompts, seed {seed}): logit difference logit(IO) - logit(S) = "
        f"{ld.mean():.2f} (IO > S on {(ld > 0).float().mean() * 100:.0f}% of prompts)",
        f"\nHeads whose mean-ablation hurts IOI most (means over the ABC-corrupted prompts; "
        f"single heads scanned in the {df.layer.nunique()} layers whose ablation hurts most):\n",
    ]
    show = df.head(top)[["component", "metric", "delta", "layer_delta"]].rename(
        columns={"metric": "logit diff", "delta": "change", "layer_delta": "whole layer"})
    lines.append(show.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))
    return "\n".join(lines)
