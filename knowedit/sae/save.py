"""Write an SAE in sparsify's format, so that sparsify itself (``SparseCoder.load_from_disk``) and any
tool that reads sparsify's files can load what knowedit trains or ships."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import KnoweditError
from ..models.cache import atomic_write_bytes, atomic_write_text
from .load import CARD
from .load_sparsify import CFG, WEIGHTS
from .sae import SAE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sparsify_cfg(sae: SAE) -> dict:
    """The SparseCoderConfig fields (plus ``d_in``) sparsify writes, for this SAE."""
    return {"activation": sae.activation, "expansion_factor": max(sae.width // sae.d_in, 1),
            "normalize_decoder": bool(sae.source.get("config", {}).get("normalize_decoder", True)),
            "num_latents": sae.width, "k": sae.k, "multi_topk": False, "skip_connection": sae.W_skip is not None,
            "transcode": sae.kind == "transcoder", "d_in": sae.d_in}


def check_representable(sae: SAE) -> None:
    why = []
    if sae.activation not in ("topk", "groupmax"):
        why.append(f"activation {sae.activation!r} (sparsify has topk and groupmax)")
    if sae.b_dec_to_input != (sae.kind == "sae"):
        why.append("b_dec applied to the input differently from sparsify (autoencoders subtract it, transcoders not)")
    if sae.normalize != "none" or sae.pre_scale is not None or sae.threshold is not None:
        why.append("run-time normalisation or pre-activation scaling")
    if sae.d_in != sae.d_out:
        why.append(f"d_in={sae.d_in} differs from d_out={sae.d_out}")
    if why:
        raise KnoweditError("this SAE cannot be written in sparsify's format: " + "; ".join(why))


def save_sparsify(sae: SAE, directory, dtype: str = "float32", card: dict | None = None) -> Path:
    """Write ``cfg.json`` and ``sae.safetensors`` (and ``card.json`` when given) into ``directory``,
    each file atomically. ``dtype``: float32, float16 or bfloat16 for the weights."""
    from safetensors.torch import save

    check_representable(sae)
    if dtype not in DTYPES:
        raise KnoweditError(f"dtype: {dtype!r}; use one of {', '.join(DTYPES)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    t = DTYPES[dtype]
    tensors = {"encoder.weight": sae.W_enc.T, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    blob = save({k: v.detach().to("cpu", t).contiguous() for k, v in tensors.items()})
    atomic_write_bytes(d / WEIGHTS, blob)
    atomic_write_text(d / CFG, json.dumps(sparsify_cfg(sae)))
    if card is not None:
        atomic_write_text(d / CARD, json.dumps(card, indent=1) + "\n")
    return d
