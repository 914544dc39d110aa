"""Fetch a public dataset from its original source into the knowedit cache, checking a sha256.

When the checksum of a source is not pinned, the first download records it next to the file and
later reads are checked against that record, so a changed file is caught either way."""
from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

from ...errors import KnoweditError
from ...models.cache import atomic_write_bytes, cache_root, file_lock


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, name: str, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """The cached copy of ``url`` (downloaded once). Errors name the URL and the ``--data`` alternative."""
    dest = cache_root() / "datasets" / name
    stamp = dest.with_name(dest.name + ".sha256")
    if not dest.exists():
        # Processes started together (the shards of a sweep) download once: the others wait, then read it.
        with file_lock(dest, f"waiting for another process to download {name}"):
            if not dest.exists():
                _download(url, name, sha256, timeout, dest, stamp)
    expected = sha256 or (stamp.read_text().strip() if stamp.exists() else None)
    if expected and sha256_file(dest) != expected:
        raise KnoweditError(f"{dest}: sha256 does not match {expected}; delete the file to download it again")
    return dest


def _download(url: str, name: str, sha256: str | None, timeout: float, dest: Path, stamp: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except Exception as e:  # offline, DNS, HTTP error: all the same to the user
        raise KnoweditError(
            f"could not download {name} from {url} ({type(e).__name__}: {e}); download it by hand and pass "
            f"its path (--data PATH, or 'path:' in the suite's dataset section)") from None
    got = hashlib.sha256(data).hexdigest()
    if sha256 and got != sha256:
        raise KnoweditError(f"{url}: sha256 {got} does not match the expected {sha256}; the file changed "
                            "upstream or the download is corrupt. Nothing was saved.")
    atomic_write_bytes(dest, data)
    atomic_write_bytes(stamp, got.encode())
