"""A task from a JSONL file, one ``{"clean", "corrupt", "answer", "distractor"}`` object per line.

``answer`` and ``distractor`` are texts as they follow the prompt (usually with a leading space, " Paris")."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import KnoweditError
from .base import METRICS, Task
from .vocab import answer_tokens

FIELDS = ("clean", "corrupt", "answer", "distractor")


def custom_task(tokenizer, path, metric: str = "logit_diff", name: str | None = None) -> Task:
    """Malformed lines raise KnoweditError naming the line and field; lines whose answer or distractor is
    not one token for ``tokenizer`` are dropped and listed in ``meta['dropped_lines']``."""
    path = Path(path)
    if not path.exists():
        raise KnoweditError(f"task file: {path} does not exist")
    if metric not in METRICS:
        raise KnoweditError(f"metric: {metric!r} is unknown; use one of {METRICS}")
    items, dropped = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rec = _parse(line, lineno, path)
        got = answer_tokens(tokenizer, rec["clean"], [rec["answer"], rec["distractor"]])
        if got is None:
            dropped.append(lineno)
            continue
        head, (a, d) = got
        items.append((head, rec["corrupt"] + head[len(rec["clean"]):], a, d))
    if not items:
        why = f"all {len(dropped)} lines have a multi-token or identical answer/distractor" if dropped else "it has no items"
        raise KnoweditError(f"task file {path}: no valid items ({why}); write answers as single tokens, "
                            f"e.g. \" Paris\"")
    return Task(name or path.stem, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                [i[3] for i in items], metric,
                meta={"n": len(items), "dropped": len(dropped), "dropped_lines": dropped, "source": str(path)})


def _parse(line: str, lineno: int, path: Path) -> dict:
    where = f"task file {path}, line {lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise KnoweditError(f"{where}: not valid JSON ({e.msg}); write one JSON object per line") from None
    if not isinstance(rec, dict):
        raise KnoweditError(f"{where}: expected a JSON object with fields {FIELDS}")
    for f in FIELDS:
        if f not in rec:
            raise KnoweditError(f"{where}: field {f!r} is missing; each line needs {FIELDS}")
        if not isinstance(rec[f], str) or not rec[f]:
            raise KnoweditError(f"{where}: field {f!r} must be a non-empty string")
    return rec
