"""The results file of a run: JSON lines, one record per (case, editor, condition), appended with a
single write and fsync each, so a kill loses at most the record being written. A partial last line
(the trace of a kill mid-write) is cut off when the file is opened again."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import KnoweditError

RESULTS = "results.jsonl"


def record_key(case_id, editor: str, condition: str) -> str:
    return f"{case_id}|{editor}|{condition}"


class ResultStore:
    def __init__(self, directory):
        self.dir = Path(directory)
        self.path = self.dir / RESULTS

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

    def load(self) -> list[dict]:
        if not self.path.exists():
            return []
        self.repair()
        out = []
        with open(self.path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
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
