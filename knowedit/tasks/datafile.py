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
