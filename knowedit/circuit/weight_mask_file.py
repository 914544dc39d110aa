"""The weight-mask sidecar: a safetensors file with one uint8 tensor per parameter holding the
mask bits packed 8 to a byte (numpy ``packbits``, big bit order, row-major flattening), and one
metadata entry ``knowedit`` (JSON) with the format, granularity and every parameter's shape.

A single metadata key keeps the bytes deterministic (the same mask always hashes the same), so the
circuit JSON can pin the sidecar by sha256."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import KnoweditError
from ..models.cache import atomic_write_bytes

FORMAT = "knowedit.weight_mask"
VERSION = 1


def write_mask(mask, path: Path) -> str:
    from safetensors.numpy import save

    arrays, shapes = {}, {}
    for name in sorted(mask.tensors):
        m = mask.tensors[name].detach().cpu().numpy().astype(bool)
        arrays[name] = np.packbits(m.reshape(-1), bitorder="big")
        shapes[name] = list(m.shape)
    info = {"format": FORMAT, "version": VERSION, "granularity": mask.granularity, "shapes": shapes,
            "model": getattr(mask.handle, "name", None)}
    data = save(arrays, metadata={"knowedit": json.dumps(info, sort_keys=True)})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_mask(path: Path, sha256: str, handle) -> tuple[dict, str, dict]:
    from safetensors.numpy import load

    if not path.is_file():
        raise KnoweditError(f"weight-mask sidecar {str(path)!r} is missing (expected sha256 {sha256}); keep the "
                            "sidecar next to its circuit JSON, or rediscover with `knowedit discover --method mask`")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise KnoweditError(f"weight-mask sidecar {str(path)!r}: sha256 is {actual}, but the circuit expects "
                            f"{sha256}; the file was changed or belongs to another circuit")
    try:
        from safetensors import safe_open
        with safe_open(str(path), "np") as f:
            info = json.loads((f.metadata() or {}).get("knowedit", "{}"))
        arrays = load(data)
    except Exception as e:  # a truncated or foreign file that still matches the pinned hash
        raise KnoweditError(f"weight-mask sidecar {str(path)!r} is not a readable safetensors file ({e})") from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise KnoweditError(f"weight-mask sidecar {str(path)!r}: format {info.get('format')!r} v{info.get('version')} "
                            f"is not {FORMAT!r} v{VERSION}")
    params = dict(handle.model.named_parameters())
    out = {}
    for name, shape in info["shapes"].items():
        if name not in params:
            raise KnoweditError(f"weight-mask sidecar {str(path)!r}: parameter {name!r} does not exist in the loaded "
                                "model; the mask belongs to another architecture")
        if tuple(shape) != tuple(params[name].shape):
            raise KnoweditError(f"weight-mask sidecar {str(path)!r}: parameter {name!r} has shape {tuple(shape)} in the "
                                f"mask but {tuple(params[name].shape)} in the loaded model; the mask belongs to a model "
                                "of another width")
        n = int(np.prod(shape))
        bits = np.unpackbits(arrays[name], count=n, bitorder="big").astype(bool).reshape(shape)
        out[name] = torch.from_numpy(bits)
    meta = {"sidecar": path.name, "sha256": sha256}
    return out, info["granularity"], meta
