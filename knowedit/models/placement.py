"""Where a model's weights go: one device, or an accelerate device map (several GPUs, CPU and disk
offload). Everything is checked before a weight is read, so a typo costs nothing."""
from __future__ import annotations

import re

import torch

from ..errors import ModelLoadError

_DEVICE = re.compile(r"^(cpu|meta|mps|cuda|xpu)(:\d+)?$")


def check_device(device, field: str = "device") -> str | None:
    """A device string that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if device is None:
        return None
    d = str(device)
    if isinstance(device, int) or d.isdigit():
        d = f"cuda:{d}"
    if not _DEVICE.match(d) or d.startswith("meta"):
        raise ModelLoadError(f"{field}: {device!r} is not a device; use cpu, cuda, cuda:N or mps")
    kind, _, idx = d.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelLoadError(f"{field}: {device!r} asks for a GPU but torch sees none on this machine; "
                                 "use cpu (or install a CUDA build of torch)")
        if idx and int(idx) >= n:
            raise ModelLoadError(f"{field}: {device!r} does not exist; this machine has cuda:0..cuda:{n - 1}")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"{field}: mps is not available on this machine; use cpu")
    if kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ModelLoadError(f"{field}: xpu is not available on this machine; use cpu")
    return d


def _check_map_device(value, where: str) -> None:
    if value == "disk":
        return
    check_device(value, field=where)


def check_device_map(device_map, config, offload_folder=None):
    """Refuse a device map that names a missing device or leaves some of the model's modules unplaced.

    The module names come from an empty (meta) copy of the model built from ``config``, so nothing is
    loaded to check them."""
    if device_map is None:
        return None
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return device_map
        return {"": check_device(device_map, field="device_map")}
    if not isinstance(device_map, dict) or not device_map:
        raise ModelLoadError("device_map: give 'auto' or a dict {module name: device}, e.g. "
                             "{'model.embed_tokens': 0, 'model.layers.0': 0, ..., 'lm_head': 'cpu'}")
    for k, v in device_map.items():
        _check_map_device(v, f"device_map[{k!r}]")
    if "disk" in device_map.values() and not offload_folder:
        raise ModelLoadError("device_map puts modules on 'disk': pass offload_folder=DIR (--offload-folder) "
                             "for their weights")
    names = [n for n, _ in _empty_model(config).named_parameters()]
    keys = list(device_map)

    def placed(n):
        return any(k == "" or n == k or n.startswith(k + ".") for k in keys)

    missing = _outermost([n for n in names if not placed(n)], names)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ModelLoadError(f"device_map leaves modules unplaced: {shown}. Add them (or a parent module, "
                             "or '' for everything else) to the map, or use device_map='auto'")
    unknown = [k for k in keys if k and not any(n == k or n.startswith(k + ".") for n in names)]
    if unknown:
        raise ModelLoadError(f"device_map names modules this model does not have: {', '.join(unknown[:6])}; "
                             f"its top-level modules are e.g. {', '.join(sorted({n.split('.')[0] for n in names}))}")
    return device_map


def _outermost(unplaced: list[str], names: list[str]) -> list[str]:
    """The shallowest modules all of whose parameters are unplaced (``model.layers.3``, not its 9 weights)."""
    gone, out = set(unplaced), set()
    for n in unplaced:
        parts = n.split(".")
        for i in range(1, len(parts)):
            pre = ".".join(parts[:i])
            if all(m in gone for m in names if m.startswith(pre + ".")):
                out.add(pre)
                break
        else:
            out.add(n.rsplit(".", 1)[0])
    return sorted(out)


def _empty_model(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def input_device(model) -> torch.device:
    """Where token ids must go: the input embedding's execution device under a device map."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap and len(set(dmap.values())) > 1:
        emb = model.get_input_embeddings()
        hook = getattr(emb, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        p = next(emb.parameters())
        if p.device.type != "meta":
            return p.device
        return torch.device("cpu")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
