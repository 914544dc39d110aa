"""A cheap, deterministic fingerprint of a model's weights.

Hashing all 135M parameters would take seconds; a strided sample of every tensor (plus names
and shapes) tells two checkpoints apart just as well for bookkeeping."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .weights import read_param

_SAMPLES = 4096


def _update(h, name: str, p: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(str(tuple(p.shape)).encode())
    flat = p.detach().reshape(-1)
    if flat.numel() == 0:
        return
    step = max(1, flat.numel() // _SAMPLES)
    h.update(flat[::step].to(torch.float32).cpu().contiguous().numpy().tobytes())


@torch.no_grad()
def weight_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if p.is_meta:   # offloaded by accelerate: the values live in its weights map
            p = read_param(model, name)
        _update(h, name, p)
    return h.hexdigest()[:16]


def _checkpoint_tensors(directory: Path) -> dict[str, tuple[Path, str]]:
    """{tensor name: (safetensors file, dtype as stored)} of a local checkpoint, {} if it has none."""
    import json

    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        (["model.safetensors"] if (directory / "model.safetensors").exists() else [])
    out = {}
    for f in files:
        with safe_open(str(directory / f), framework="pt") as st:
            for k in st.keys():
                out[k] = (directory / f, str(st.get_slice(k).get_dtype()))
    return out


@torch.no_grad()
def checkpoint_fingerprint(model: torch.nn.Module, directory) -> str | None:
    """The fingerprint the model would have if loaded in the dtype its checkpoint stores, read from the
    safetensors files: a float32 checkpoint loaded in bfloat16 keeps the float32 identity, so circuits,
    sampled corpora and run records made on the float32 load apply to it. None when the files cannot
    reproduce every tensor (other names, .bin weights): the loaded weights' fingerprint is used then."""
    from safetensors import safe_open

    where = _checkpoint_tensors(Path(directory))
    if not where:
        return None
    state = model.state_dict()
    by_ptr = {}    # tied weights appear under two names but are stored once
    for n, p in state.items():
        if not p.is_meta:
            by_ptr.setdefault(p.data_ptr(), []).append(n)
    h = hashlib.sha256()
    handles: dict[Path, object] = {}
    try:
        for name, p in sorted(state.items()):
            src = name if name in where else next(
                (t for t in by_ptr.get(p.data_ptr(), []) if t in where), None) if not p.is_meta else None
            if src is None:
                return None
            f = where[src][0]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            t = handles[f].get_tensor(src)
            if tuple(t.shape) != tuple(p.shape):
                return None
            _update(h, name, t)
    finally:
        handles.clear()
    return h.hexdigest()[:16]


def stored_in_other_dtype(model: torch.nn.Module, directory) -> bool:
    """Whether the checkpoint in ``directory`` stores its floating weights in another dtype than the
    model now holds (a float32 checkpoint loaded in bfloat16)."""
    try:
        where = _checkpoint_tensors(Path(directory))
    except Exception:   # unreadable index or file: no claim about the stored dtype
        return False
    have = str(next(model.parameters()).dtype).removeprefix("torch.")
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    stored = {names.get(d, d) for _, d in where.values() if names.get(d, d) in names.values()}
    return bool(stored) and stored != {have}
