"""Loader for Lan & Barez's sequence-continuation JSON (records ``S1..S4, corr, incorr, text``).

``{kind}_prompts_{variant}.json`` holds the clean prompts; ``randDS_{kind}.json`` holds out-of-order
versions of (part of) them, matched here by their non-member words."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import KnoweditError
from .base import Task
from .datafile import read_json
from .vocab import answer_tokens

KINDS = ("numerals", "numwords", "months")
VARIANTS = ("done", "lost", "names")


def _skeleton(text: str) -> str:
    # "Van done in 1. Hat done in 2. Sun done in" -> "Van done in _. Hat done in _. Sun done in"
    return re.sub(r" in [^.]+\.", " in _.", text)


def load_seqcont(tokenizer, root, kind: str = "numerals", variant: str = "done", n: int | None = None) -> Task:
    """``root`` is the ``seqcont`` directory (with ``numerals/``, ``numwords/``, ``months/``) or one kind's
    directory. Clean prompts without an out-of-order partner in ``randDS_*`` are skipped."""
    if kind not in KINDS or variant not in VARIANTS:
        raise KnoweditError(f"seqcont: kind must be one of {KINDS} and variant one of {VARIANTS}")
    root = Path(root)
    folder = root / kind if (root / kind).is_dir() else root
    clean = read_json(folder / f"{kind}_prompts_{variant}.json", "seqcont clean file")
    rand = read_json(folder / f"randDS_{kind}.json", "seqcont corrupt (randDS) file")
    partners: dict[tuple, list[str]] = {}
    for i, r in enumerate(rand):
        _check(r, i, "randDS")
        partners.setdefault((_skeleton(r["text"]), r["corr"], r["incorr"]), []).append(r["text"])
    items, dropped, unpaired = [], 0, 0
    for i, r in enumerate(clean):
        if n is not None and len(items) == n:
            break
        _check(r, i, f"{kind}_prompts_{variant}")
        pool = partners.get((_skeleton(r["text"]), r["corr"], r["incorr"]))
        if not pool:
            unpaired += 1
            continue
        corrupt = pool.pop(0)
        got = answer_tokens(tokenizer, r["text"], [r["corr"], r["incorr"]])
        if got is None:
            dropped += 1
            continue
        head, (a, d) = got
        items.append((head, corrupt + head[len(r["text"]):], a, d))
    if not items:
        raise KnoweditError(f"seqcont {kind}/{variant}: no usable item ({dropped} with multi-token answers, "
                            f"{unpaired} without an out-of-order partner)")
    return Task(f"seq-{kind}", [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                [i[3] for i in items], "logit_diff",
                meta={"n": len(items), "dropped": dropped, "unpaired": unpaired, "kind": kind,
                      "variant": variant, "source": str(folder)})


def _check(r, i, name):
    if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("text", "corr", "incorr")):
        raise KnoweditError(f"seqcont {name} record {i}: needs string fields 'text', 'corr' and 'incorr'")
