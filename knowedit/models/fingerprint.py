"""A cheap, deterministic fingerprint of a model's weights.

Hashing all 135M parameters would take seconds; a strided sample of every tensor (plus names
and shapes) tells two checkpoints apart just as well for bookkeeping."""
from __future__ import annotations

import hashlib

import torch

_SAMPLES = 4096


@torch.no_grad()
def weight_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step].to(torch.float32).cpu().contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
