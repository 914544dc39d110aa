"""The options every command that loads a model shares: which model, in which dtype, where."""
from __future__ import annotations

import json

from ..errors import ModelLoadError


def add_model_args(p, model_help: str = "Hugging Face id or local directory (default: SmolLM2-135M)") -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default fp32); statistics and solves "
                                                  "stay in float32/float64 whatever the model's dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--device-map", default=None,
                   help="spread a model over devices: 'auto', or a JSON map such as "
                        "'{\"model.layers.0\": 0, \"\": 1}' (devices: GPU index, cpu, disk)")
    p.add_argument("--max-memory", default=None,
                   help="with --device-map auto: per-device limits as JSON, e.g. '{\"0\": \"20GiB\", \"cpu\": \"60GiB\"}'")
    p.add_argument("--offload-folder", default=None, help="where layers mapped to 'disk' keep their weights")


def _json(value, flag: str):
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{flag}: {value!r} is not valid JSON ({e}); quote it, e.g. "
                             f"{flag} '{{\"model.layers.0\": 0, \"\": \"cpu\"}}'") from None


def model_kwargs(args) -> dict:
    """Keyword arguments for ``load_model`` from the parsed options (checked before any loading)."""
    dm = getattr(args, "device_map", None)
    if dm is not None and dm not in ("auto", "balanced", "balanced_low_0", "sequential"):
        dm = _json(dm, "--device-map") if dm.lstrip().startswith("{") else dm
    from ..models.dtypes import parse_dtype

    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        parse_dtype(dtype, field="--dtype")
    return {"dtype": dtype, "device": getattr(args, "device", None), "device_map": dm,
            "max_memory": _json(getattr(args, "max_memory", None), "--max-memory"),
            "offload_folder": getattr(args, "offload_folder", None)}


def load_from_args(args, name=None):
    from ..models import load_model

    kwargs = model_kwargs(args)
    return load_model(name if name is not None else args.model, **kwargs)
