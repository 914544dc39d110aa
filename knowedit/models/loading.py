"""``load_model``: the default offline model, a hub id or a local directory."""
from __future__ import annotations

import os

import torch

from ..errors import ModelLoadError
from . import default_model
from .handle import ModelHandle


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    try:
        return getattr(torch, str(dtype))
    except AttributeError:
        raise ModelLoadError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'") from None


def load_model(name_or_path: str | None = None, device: str | None = None, dtype=None,
               attn_implementation: str | None = None) -> ModelHandle:
    """Load a causal LM as a :class:`ModelHandle`.

    ``None`` loads the default model (SmolLM2-135M-Instruct, offline). Anything else is a
    Hugging Face id or a local directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _resolve_dtype(dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path is None or name_or_path in ("default", default_model.DEFAULT_MODEL_NAME):
        path = default_model.ensure_converted()
        name, source = default_model.DEFAULT_MODEL_NAME, f"{default_model.PACKAGE_PIN}:{default_model.GGUF_FILE}"
    else:
        path, name, source = name_or_path, os.path.basename(str(name_or_path).rstrip("/")), str(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("the hub is switched off (HF_HUB_OFFLINE=1) and" if offline else "the hub could not be reached or")
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: {hint} no local copy was found. "
            f"Point load_model() / --model at a local directory holding config.json, the weights and the "
            f"tokenizer (e.g. one written by save_pretrained), or call load_model() with no name for the "
            f"offline default model. Cause: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if device:
        model.to(device)
    return ModelHandle(model, tok, name=name, source=source)
