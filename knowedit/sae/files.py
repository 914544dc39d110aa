"""Reading the two files every SAE directory holds (a JSON config, a safetensors weight file), with
errors that name the file and field at fault."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import KnoweditError


def read_cfg(path: Path) -> dict:
    if not path.is_file():
        raise KnoweditError(f"{path}: missing; an SAE directory needs its cfg.json beside the weights")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KnoweditError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise KnoweditError(f"{path}: expected a JSON object of settings, found {type(cfg).__name__}")
    return cfg


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise KnoweditError(f"{path}: missing; the SAE's weights are expected in this file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise KnoweditError(f"{path}: not a readable safetensors file ({e})") from None


def need(cfg: dict, key: str, path: Path, kind=int):
    if key not in cfg:
        raise KnoweditError(f"{path}: field {key!r} is missing")
    v = cfg[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        raise KnoweditError(f"{path}: field {key!r} is {v!r}; a positive integer is needed")
    return v


def tensor(weights: dict, key: str, path: Path, shape: tuple) -> torch.Tensor:
    if key not in weights:
        raise KnoweditError(f"{path}: tensor {key!r} is missing (found {', '.join(sorted(weights)) or 'none'})")
    t = weights[key]
    if tuple(t.shape) != tuple(shape):
        raise KnoweditError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, but the config implies {tuple(shape)}")
    return t
