"""Files of a lifelong run, all written atomically (a kill leaves the previous version):

* ``run.json``: what the run is (the study's content with hparams files read, the model and its weight
  fingerprint, a digest of the selected requests). A restart must match it field by field.
* ``checkpoints/<editor>.pt``: per editor, after each checkpoint: the current values (not deltas, so a
  restore is bit-exact) of every parameter any edit so far changed, the editor's ``state``, the number of
  edits done, the applied and refused cases, the rows so far and the time spent.
* ``rows.jsonl``: one JSON line per checkpoint per editor (the rows of the checkpoints), for reports.
* ``pre.json``: the unedited model's measurements, computed once (the reference for locality).

A run split between processes by editor writes ``rows.shard-<i>-of-<n>.jsonl`` per shard instead of
``rows.jsonl``; :func:`read_rows` merges them."""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import torch

from ..errors import KnoweditError
from ..models.cache import atomic_write_bytes, atomic_write_text
from .shards import Shard, merge, shard_files

RUN, ROWS, PRE, PROGRESS, CKPT_DIR = "run.json", "rows.jsonl", "pre.json", "progress.log", "checkpoints"
FORMAT = 1


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if old == new else [f"{where}: {old!r} in the run there, {new!r} now"]


def verify_run(out: Path, current: dict) -> None:
    """Raise, naming each differing field, if ``out`` holds a run whose ``run.json`` disagrees with
    ``current`` on any of its keys. Reads only; nothing in ``out`` changes."""
    p = Path(out) / RUN
    if not p.exists():
        return
    old = json.loads(p.read_text())
    diffs = _differences({k: old.get(k) for k in current}, current)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise KnoweditError(f"{out} holds a different lifelong run ({shown}). Nothing there was changed: "
                            "pass another --out to start a new run, or restore the study file and model of that run "
                            "to resume it")


def write_run(out: Path, meta: dict) -> None:
    p = Path(out) / RUN
    if not p.exists():
        atomic_write_text(p, json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")


def read_run(out: Path) -> dict:
    p = Path(out) / RUN
    return json.loads(p.read_text()) if p.exists() else {}


def checkpoint_path(out: Path, label: str) -> Path:
    return Path(out) / CKPT_DIR / (re.sub(r"[^\w.-]", "_", label) + ".pt")


def save_checkpoint(path: Path, ck: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **ck}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, run_key: str, device) -> dict | None:
    """The checkpoint at ``path`` (tensors on ``device``), or None if there is none. It must belong
    to the run ``run_key`` names."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  a truncated or foreign file
        raise KnoweditError(f"{path}: not a readable checkpoint ({e}); delete it to restart that editor "
                            "from zero edits") from None
    if ck.get("format") != FORMAT or ck.get("run") != run_key:
        raise KnoweditError(f"{path}: belongs to another run (run key {ck.get('run')!r}, this run {run_key!r}); "
                            "pass another --out, or delete the file to restart that editor")
    return ck


def write_rows(out: Path, rows: list[dict], shard: Shard | None = None) -> None:
    name = shard.file_name(ROWS) if shard else ROWS
    atomic_write_text(Path(out) / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_rows(out: Path) -> list[dict]:
    """The rows of ``out``: ``rows.jsonl`` and the shard files merged (each editor's checkpoint once)."""
    p = Path(out) / ROWS
    files = ([(None, p)] if p.exists() else []) + shard_files(out, ROWS)
    if not files:
        raise KnoweditError(f"{out}: no {ROWS} here; run 'knowedit eval evals/lifelong.yaml --out {out}' first")
    parts = [(sh, [json.loads(x) for x in f.read_text().splitlines() if x.strip()]) for sh, f in files]
    return merge(parts, group=lambda r: r["editor"], key=lambda r: (r["editor"], r["edits"]))


def read_json(path: Path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def write_json(path: Path, obj) -> None:
    atomic_write_text(Path(path), json.dumps(obj, sort_keys=True) + "\n")


def append_log(out: Path, line: str) -> None:
    with open(Path(out) / PROGRESS, "a") as f:
        f.write(line + "\n")
