"""Where knowedit keeps converted models and statistics, atomic writes, and a lock that lets
processes share a cache file that only one of them should compute."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent processes may then compute a file twice (writes stay atomic)
    fcntl = None


def cache_root() -> Path:
    """``$KNOWEDIT_CACHE``, else ``$XDG_CACHE_HOME/knowedit``, else ``~/.cache/knowedit``."""
    if os.environ.get("KNOWEDIT_CACHE"):
        return Path(os.environ["KNOWEDIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "knowedit"


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds.

    A crash leaves a ``.tmp-*`` directory that is never read, so a half-written cache cannot load."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file owner-only; give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_held: dict[str, list] = {}          # lock file -> [this process's RLock for it, nesting depth]
_held_guard = threading.Lock()


@contextlib.contextmanager
def file_lock(path, wait_message: str | None = None):
    """Hold an exclusive lock on ``<path>.lock`` for the block, across processes (``fcntl.flock``).

    Use it as check, lock, check again, compute, write atomically: the first process computes the file,
    the others wait and then read it. Nesting the same lock in one process is allowed (flock is held
    per open file, so a second ``open`` + ``flock`` of it would wait on itself forever); threads of one
    process take turns on it. ``wait_message`` is printed to stderr when another process holds it."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.abspath(lock)
    with _held_guard:
        entry = _held.setdefault(key, [threading.RLock(), 0])
    with entry[0]:
        if entry[1]:
            entry[1] += 1
            try:
                yield
            finally:
                entry[1] -= 1
            return
        # The lock file stays after use: unlinking it would let a newcomer lock a fresh file while a
        # waiter still holds the old one, and both would compute.
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if wait_message:
                        print(f"[knowedit] {wait_message}", file=sys.stderr, flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            entry[1] = 1
            try:
                yield
            finally:
                entry[1] = 0
        finally:
            os.close(fd)   # closing the file releases the flock
