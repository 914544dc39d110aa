"""Reading user-supplied data files with errors that say which file and what to do."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import KnoweditError


def read_json(path, what: str):
    path = Path(path)
    if not path.exists():
        raise KnoweditError(f"{what}: {path} does not exist; pass the path of the downloaded file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KnoweditError(f"{what}: {path} is not valid JSON ({e})") from None


def read_json_or_lines(path, what: str, missing_hint: str = "pass the path of a local copy"):
    """A JSON document, or a list of objects when the file is JSON lines (one object per line)."""
    path = Path(path)
    if not path.exists():
        raise KnoweditError(f"{what}: {path} does not exist; {missing_hint}")
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise KnoweditError(f"{what}: {path} is neither JSON nor JSON lines ({e})") from None
