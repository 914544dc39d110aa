"""EleutherAI sparsify's format: ``cfg.json`` (a SparseCoderConfig plus ``d_in``) and ``sae.safetensors``
(``encoder.weight [width, d_in]``, ``encoder.bias``, ``W_dec [width, d_in]``, ``b_dec``, optionally
``W_skip``), one directory per hookpoint, the directory named after the hookpoint. sparsify's latents
are TopK (or GroupMax) of ReLU pre-activations; an autoencoder subtracts ``b_dec`` from its input
first, a transcoder (``transcode: true``) does not."""
from __future__ import annotations

from pathlib import Path

from ..errors import KnoweditError
from .files import need, read_cfg, read_tensors, tensor
from .sae import SAE

CFG, WEIGHTS = "cfg.json", "sae.safetensors"
_ACTIVATIONS = ("topk", "groupmax")


def read_sparsify(directory: Path) -> SAE:
    cfg_path, w_path = directory / CFG, directory / WEIGHTS
    cfg = read_cfg(cfg_path)
    d_in = need(cfg, "d_in", cfg_path)
    act = cfg.get("activation", "topk")
    if act not in _ACTIVATIONS:
        raise KnoweditError(f"{cfg_path}: field 'activation' is {act!r}; sparsify files use 'topk' or 'groupmax'")
    k = need(cfg, "k", cfg_path) if "k" in cfg else 32
    width = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    w = read_tensors(w_path)
    transcode = bool(cfg.get("transcode", False))
    skip = bool(cfg.get("skip_connection", False))
    if "W_dec" not in w:
        raise KnoweditError(f"{w_path}: tensor 'W_dec' is missing; knowedit needs the decoder (sparsify saves it "
                            "unless the coder was built with decoder=False)")
    return SAE(
        W_enc=tensor(w, "encoder.weight", w_path, (width, d_in)).T,
        b_enc=tensor(w, "encoder.bias", w_path, (width,)),
        W_dec=tensor(w, "W_dec", w_path, (width, d_in)),
        b_dec=tensor(w, "b_dec", w_path, (d_in,)),
        W_skip=tensor(w, "W_skip", w_path, (d_in, d_in)) if skip else None,
        activation=act, k=k, b_dec_to_input=not transcode, kind="transcoder" if transcode else "sae",
        source={"format": "sparsify", "path": str(directory), "config": cfg},
    )
