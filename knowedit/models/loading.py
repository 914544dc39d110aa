"""``load_model``: the default offline model, a hub id or a local directory, in a chosen dtype, on
one device or spread over several with an accelerate device map."""
from __future__ import annotations

import os

from ..errors import ModelLoadError, UnsupportedArchitecture
from . import default_model
from .adapters import ADAPTERS
from .dtypes import parse_dtype
from .handle import ModelHandle
from .local_dir import check_local_dir
from .placement import check_device, check_device_map


def _load_error(name_or_path, e) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = ("the hub is switched off (HF_HUB_OFFLINE=1) and" if offline else "the hub could not be reached or")
    return ModelLoadError(
        f"could not load model {name_or_path!r}: {hint} no local copy was found. "
        f"Point load_model() / --model at a local directory holding config.json, the weights and the "
        f"tokenizer (e.g. one written by save_pretrained), or call load_model() with no name for the "
        f"offline default model. Cause: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _config(path, name_or_path, is_dir: bool):
    from transformers import AutoConfig

    if is_dir:
        check_local_dir(path, ADAPTERS)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if config.model_type not in ADAPTERS:
        raise UnsupportedArchitecture(f"{name_or_path}: model_type {config.model_type!r} is not supported; "
                                      f"knowedit supports {', '.join(sorted(ADAPTERS))}")
    return config


def _offload_to_disk(model, device_map: dict, folder):
    from accelerate import dispatch_model

    gpus = [v for v in device_map.values() if v not in ("cpu", "disk")]
    main = (f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0]) if gpus else "cpu"
    for hook_holder in model.modules():   # the first dispatch's hooks are replaced, not stacked
        if hasattr(hook_holder, "_hf_hook"):
            from accelerate.hooks import remove_hook_from_module
            remove_hook_from_module(hook_holder)
    # accelerate reuses a folder that already holds an index.json, which would hand this model another
    # load's (or another model's, or edited) weights; each load gets a fresh subfolder instead.
    import tempfile
    from pathlib import Path
    Path(folder).mkdir(parents=True, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix="knowedit-offload-", dir=str(folder))
    return dispatch_model(model, device_map, main_device=main, offload_dir=fresh)


def load_model(name_or_path: str | None = None, device: str | None = None, dtype=None,
               attn_implementation: str | None = None, device_map=None, max_memory: dict | None = None,
               offload_folder: str | None = None) -> ModelHandle:
    """Load a causal LM as a :class:`ModelHandle`.

    ``None`` loads the default model (SmolLM2-135M-Instruct, offline). Anything else is a Hugging Face
    id or a local directory. ``dtype``: ``bf16``, ``fp16`` or ``fp32`` (default); statistics, solves
    and attribution sums run in float32 or float64 whatever the model's dtype. ``device_map``: ``'auto'``
    or ``{module: device}`` (devices ``0``, ``'cuda:1'``, ``'cpu'``, ``'disk'``) to spread a model that
    does not fit one device, with ``max_memory`` per device and ``offload_folder`` for ``'disk'``.
    Every argument is checked before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    device = check_device(device)
    if device and device_map is not None:
        raise ModelLoadError("device and device_map: give one of them (device_map places the model itself)")
    if max_memory is not None:
        if device_map is None:
            raise ModelLoadError("max_memory only applies with device_map='auto'; add device_map='auto'")
        for k in max_memory:
            if k not in ("cpu", "disk"):
                check_device(k, field=f"max_memory[{k!r}]")
    if name_or_path is None or name_or_path in ("default", default_model.DEFAULT_MODEL_NAME):
        path = default_model.ensure_converted()
        name, source = default_model.DEFAULT_MODEL_NAME, f"{default_model.PACKAGE_PIN}:{default_model.GGUF_FILE}"
    else:
        path, name, source = name_or_path, os.path.basename(str(name_or_path).rstrip("/")), str(name_or_path)
    config = _config(path, name_or_path, os.path.isdir(path))
    device_map = check_device_map(device_map, config, offload_folder)

    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # transformers (5.x) fails to dispatch an explicit map with 'disk' entries ("weight is on the meta
    # device"); those layers are read into CPU memory first and moved to disk by accelerate afterwards.
    to_disk = isinstance(device_map, dict) and "disk" in device_map.values()
    if device_map is not None:
        kwargs["device_map"] = {k: ("cpu" if v == "disk" else v) for k, v in device_map.items()} \
            if to_disk else device_map
        if max_memory is not None:
            kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in max_memory.items()}
        if offload_folder:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if to_disk:
        model = _offload_to_disk(model, device_map, offload_folder)
    if device:
        model.to(device)
    return ModelHandle(model, tok, name=name, source=source, checkpoint=path if os.path.isdir(path) else None)
