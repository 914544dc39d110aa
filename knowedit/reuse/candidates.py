"""Which heads to consider: the heads in both tasks' circuits, or, without circuits, each task's
most important heads by a cheap one-pass score (attention to the answer/distractor tokens at the
final position plus |direct logit attribution|)."""
from __future__ import annotations

from ..circuit import Circuit
from ..errors import KnoweditError
from .roles import head_profiles


def head_names(handle, heads, field: str = "heads") -> list[str]:
    """Validated head names from a Circuit, names or Components (order kept, duplicates dropped)."""
    if isinstance(heads, Circuit):
        heads = heads.heads()  # node circuits and the heads at the ends of an edge circuit's edges
    if isinstance(heads, str):
        heads = [h for h in heads.split(",") if h.strip()]
    out = []
    for h in heads:
        try:
            c = handle.component(h.strip() if isinstance(h, str) else h)
        except KnoweditError as e:
            raise KnoweditError(f"{field}: {e}") from None
        if getattr(c, "kind", None) != "head" or c.port:
            raise KnoweditError(f"{field}: {h!r} is not an attention head; name heads like 'a12.h3'")
        if c.name not in out:
            out.append(c.name)
    if not out:
        raise KnoweditError(f"{field}: no heads given")
    return out


def important_heads(handle, task, k: int = 20, profiles=None, batch_size: int = 16) -> list[str]:
    """The ``k`` heads with the largest attention-to-answer/distractor share plus normalised |DLA|.

    A fallback for a discovered circuit: one forward pass instead of a patching sweep."""
    df = profiles if profiles is not None else head_profiles(handle, task, batch_size=batch_size)
    attn = df["attn_answer"] + df["attn_distractor"]
    dla = df["dla"].abs()
    score = attn / max(attn.max(), 1e-9) + dla / max(dla.max(), 1e-9)
    return list(df.assign(score=score).sort_values("score", ascending=False, kind="stable")["component"][:k])


def shared_heads(source_heads, target_heads) -> list[str]:
    """Heads in both sets, in the source set's order."""
    tgt = set(target_heads)
    return [h for h in source_heads if h in tgt]


def overlap(source_heads, target_heads) -> dict:
    """Counts and the share of the target's heads that the source also uses (Merullo et al.'s figure)."""
    s, t = set(source_heads), set(target_heads)
    both = s & t
    return {"source": len(s), "target": len(t), "shared": len(both),
            "share_of_target": len(both) / len(t) if t else 0.0, "iou": len(both) / len(s | t) if s | t else 0.0}
