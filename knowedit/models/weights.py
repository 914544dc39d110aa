"""Reading and writing a parameter's real value wherever it lives.

A model dispatched by accelerate may keep a layer's weights outside the module: the parameter is then
an empty ``meta`` tensor and the values sit in the offload hook's ``weights_map`` (a CPU state dict
for CPU offload, ``.dat`` memory maps for disk offload), copied in for each forward and dropped after.
Everything above ``models`` reads and writes weights through :func:`read_param` and
:func:`write_param`, so edits land where the forward pass will find them and nothing else has to know
about devices or offloading.

``dim``/``index`` select whole lines of a tensor (rows or columns, the unit edits and masks work in);
only those are read or written, so a disk-offloaded matrix is never loaded whole to change a slice.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import KnoweditError


@dataclass(frozen=True)
class _Offloaded:
    store: Mapping        # the base map under any PrefixedDataset wrappers
    key: str              # the tensor's key in ``store``
    device: torch.device  # where the module runs


def _hooks(module) -> list:
    h = getattr(module, "_hf_hook", None)
    if h is None:
        return []
    return list(getattr(h, "hooks", [h]))   # accelerate's SequentialHook holds several


def _unwrap(weights_map, key: str) -> tuple[Mapping, str]:
    # PrefixedDataset only prepends the module path; resolving it avoids its __contains__, which
    # loads the tensor from disk just to answer.
    while hasattr(weights_map, "prefix") and hasattr(weights_map, "dataset"):
        key = weights_map.prefix + key
        weights_map = weights_map.dataset
    return weights_map, key


def _is_loader(store) -> bool:
    """accelerate's OffloadedWeightsLoader: an in-memory ``state_dict`` over an on-disk ``index``."""
    return hasattr(store, "state_dict") and hasattr(store, "index") and hasattr(store, "save_folder")


def _holds(store, key: str) -> bool:
    if _is_loader(store):
        return key in store.state_dict or key in store.index
    return key in store


def _device(d) -> torch.device:
    return torch.device(f"cuda:{d}" if isinstance(d, int) else d)


def _offloaded(model, name: str) -> _Offloaded | None:
    """Where accelerate keeps ``name``'s values when an offload hook owns it, else None."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):   # the owning module first, then its parents
        try:
            mod = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        for h in _hooks(mod):
            if not getattr(h, "offload", False) or getattr(h, "weights_map", None) is None:
                continue
            if i < len(parts) - 1 and not getattr(h, "place_submodules", False):
                continue   # this hook only offloads its own module's tensors
            store, key = _unwrap(h.weights_map, ".".join(parts[i:]))
            if _holds(store, key):
                dev = h.execution_device
                return _Offloaded(store, key, _device(dev) if dev is not None else torch.device("cpu"))
    return None


def _tensor(model, name: str) -> torch.Tensor:
    mod, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(mod)
        t = getattr(owner, leaf)
    except AttributeError:
        t = None
    if not isinstance(t, torch.Tensor):
        raise KnoweditError(f"parameter {name!r}: the model has no such parameter or buffer; names are those of "
                            "model.named_parameters(), e.g. 'model.layers.0.mlp.down_proj.weight'")
    return t


def is_offloaded(model, name: str) -> bool:
    """Whether ``name``'s values live in an accelerate offload map (CPU or disk) between forwards."""
    return _offloaded(model, name) is not None


def offloaded_names(model) -> list[str]:
    """Parameters that are empty ``meta`` tensors between forwards (accelerate keeps their values in an
    offload map): code that substitutes or trains parameters directly cannot use them."""
    return [n for n, p in model.named_parameters() if p.is_meta]


def param_device(model, name: str) -> torch.device:
    """The device ``name`` computes on: its execution device when offloaded, else where it is."""
    off = _offloaded(model, name)
    return off.device if off is not None else _tensor(model, name).device


def _dat(store, key: str, mode: str) -> tuple[torch.Tensor, np.memmap]:
    """The ``.dat`` memory map accelerate wrote for ``key``, and a tensor sharing its memory."""
    info = store.index[key]
    dtype = info["dtype"]
    np_dtype = "int16" if dtype == "bfloat16" else ("int8" if dtype.startswith("float8_") else dtype)
    shape = tuple(info["shape"]) or (1,)   # accelerate stores 0-d tensors as 1-d
    arr = np.memmap(os.path.join(store.save_folder, f"{key}.dat"), dtype=np_dtype, mode=mode, shape=shape)
    t = torch.from_numpy(arr)
    if np_dtype != dtype:
        t = t.view(getattr(torch, dtype))
    return t.view(tuple(info["shape"])), arr


def _on_disk(store, key: str) -> bool:
    return _is_loader(store) and key not in store.state_dict and store.index.get(key, {}).get("safetensors_file") is None


def _select(t: torch.Tensor, dim, index) -> torch.Tensor:
    return t if dim is None else t.index_select(dim, index.to(t.device))


@torch.no_grad()
def read_param(model, name: str, dim: int | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
    """``name``'s values (the lines ``index`` along ``dim`` when given), wherever they are kept.

    Without ``index`` the values are returned detached, not copied (a disk-offloaded tensor as a memory
    map, read as it is used): clone them before keeping them across a write. Offloaded values come
    back on the device they are stored on."""
    off = _offloaded(model, name)
    if off is None:
        return _select(_tensor(model, name).detach(), dim, index)
    if _on_disk(off.store, off.key):
        # a private (copy-on-write) map of the file: only the lines used are read from disk, and
        # nothing done to the returned tensor is written back
        t, _ = _dat(off.store, off.key, "c")
        return _select(t, dim, index)
    return _select(off.store[off.key].detach(), dim, index)


def _put(t: torch.Tensor, value: torch.Tensor, dim, index) -> None:
    v = value.detach().to(device=t.device, dtype=t.dtype)
    if dim is None:
        if tuple(v.shape) != tuple(t.shape):
            raise KnoweditError(f"write_param: a value of shape {tuple(v.shape)} for a tensor of shape {tuple(t.shape)}")
        t.copy_(v)
    else:
        t.index_copy_(dim, index.to(t.device), v)


@torch.no_grad()
def write_param(model, name: str, value: torch.Tensor, dim: int | None = None,
                index: torch.Tensor | None = None) -> None:
    """Write ``value`` into ``name`` (only the lines ``index`` along ``dim`` when given) where the
    model keeps it: in place into the parameter, or into accelerate's offload map, so the next
    forward pass computes with it. Written bits are kept exactly (no arithmetic on the way)."""
    off = _offloaded(model, name)
    t = _tensor(model, name)
    if off is None:
        _put(t, value, dim, index)
        return
    if t.device.type != "meta":   # materialised inside a forward right now: keep both copies equal
        _put(t, value, dim, index)
    store, key = off.store, off.key
    if _on_disk(store, key):
        mm, arr = _dat(store, key, "r+")
        _put(mm, value, dim, index)
        arr.flush()
        return
    if _is_loader(store) and key not in store.state_dict:
        # the index points into the model's own safetensors checkpoint, which an edit must never
        # overwrite: the changed tensor is kept in the loader's state dict, which takes precedence
        full = store[key].clone()
        _put(full, value, dim, index)
        store.state_dict[key] = full
        return
    held = store.state_dict if _is_loader(store) else store
    cur = held[key]
    if not isinstance(cur, torch.Tensor) or cur.is_meta:
        raise KnoweditError(f"parameter {name!r}: its offload map ({type(held).__name__}) holds no values for it; "
                            "dispatch the model with accelerate's CPU (dict) or disk offload")
    _put(cur, value, dim, index)   # in place: tied or shared entries stay shared


def execution_value(model, name: str) -> torch.Tensor:
    """``name``'s values on the device it computes on: what a forward pass multiplies with."""
    return read_param(model, name).to(param_device(model, name))


def state_dict_with_values(model) -> dict[str, torch.Tensor] | None:
    """``model.state_dict()`` with each offloaded entry's values in place of its empty meta tensor
    (disk-offloaded ones as memory maps, so a save streams them from disk); None when nothing is
    offloaded. transformers' own save looks for the values only on a single accelerate hook."""
    state = model.state_dict()
    if not any(t.is_meta for t in state.values()):
        return None
    return {k: (read_param(model, k) if t.is_meta else t) for k, t in state.items()}
