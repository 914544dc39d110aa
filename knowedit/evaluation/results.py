"""The results file of a run: JSON lines, one record per (case, editor, condition), appended with a
single write and fsync each, so a kill loses at most the record being written. A partial last line
(the trace of a kill mid-write) is cut off when the file is opened again.

A run split between processes has one such file per shard (``results.shard-0-of-2.jsonl``, ...);
:func:`load_records` merges a directory's files."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import KnoweditError
from .shards import Shard, merge, shard_files

RESULTS = "results.jsonl"


def record_key(case_id, editor: str, condition: str) -> str:
    return f"{case_id}|{editor}|{condition}"


class ResultStore:
    def __init__(self, directory, shard: Shard | None = None):
        self.dir = Path(directory)
        self.path = self.dir / (shard.file_name(RESULTS) if shard else RESULTS)

    def repair(self) -> int:
        """Cut a partial last line; returns the number of bytes removed."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return len(data) - keep

    def load(self, repair: bool = True) -> list[dict]:
        """The records; ``repair=False`` reads only (a partial last line, perhaps being written by a running
        process, is skipped rather than cut)."""
        if not self.path.exists():
            return []
        if repair:
            self.repair()
        out = []
        with open(self.path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip() or not line.endswith("\n"):
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise KnoweditError(f"{self.path}, line {i}: not valid JSON ({e}); remove that line to resume") from None
        return out

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.load()}

    def append(self, rec: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(rec, sort_keys=True, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def result_files(directory) -> list[tuple[Shard | None, Path]]:
    """``results.jsonl`` (shard None) and the shard files in ``directory``, the ones that exist."""
    d = Path(directory)
    return ([(None, d / RESULTS)] if (d / RESULTS).exists() else []) + shard_files(d, RESULTS)


def load_records(directory) -> list[dict]:
    """Every record in ``directory``: its results file and shard files merged, each key once, in the
    order one process would have written them. Reads only, so it is safe while shards still run."""
    parts = [(sh, ResultStore(directory, sh).load(repair=False)) for sh, _ in result_files(directory)]
    return merge(parts, group=lambda r: r["case_id"], key=lambda r: r["key"])
