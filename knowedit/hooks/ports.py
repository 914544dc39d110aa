"""The per-head query, key and value inputs (``a9.h6.q`` / ``.k`` / ``.v``), which edge-level
discovery reads gradients at and rewrites.

A head's q/k/v port is its slice of the q/k/v projection's output, before rotary embeddings. With
grouped-query attention several query heads share one key/value head, so a key input of *one* query
head does not exist in the model. Inside :func:`head_ports` the attention is run ungrouped: the
k/v projections' outputs are repeated per query head (exactly what the attention does anyway, so
nothing changes numerically) and each query head gets its own k and v slices, which can then be
read and replaced one query head at a time. This is the ungrouping TransformerLens offers for GQA.

Supported layouts: the Llama family (separate q/k/v projections) and GPT-2 (fused ``c_attn``).
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import KnoweditError
from .hookset import HookSet

PORTS = "qkv"
FAMILIES = ("llama", "gpt2")


def check_supported(adapter) -> None:
    if adapter.family not in FAMILIES:
        raise KnoweditError(f"level 'edge': per-head q/k/v inputs are implemented for the {', '.join(FAMILIES)} "
                            f"layouts, not {adapter.family!r}; use level='node' for this model")


def port_weight(adapter, layer: int, port: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W [n_heads, d_model, d_head]`` and bias ``[n_heads, d_head]`` (or None) of one port letter,
    per query head (a GQA key/value head's weights repeated for each query head reading it)."""
    dh, H = adapter.d_head, adapter.n_heads
    if adapter.family == "gpt2":
        mod = adapter.attn(layer).c_attn
        off = PORTS.index(port) * adapter.d_model
        w = adapter.weight_in_out(mod)[:, off:off + H * dh]
        b = adapter.value(mod, "bias")[off:off + H * dh]
        heads = torch.arange(H)
    else:
        mod = getattr(adapter.attn(layer), f"{port}_proj")
        w, b = adapter.weight_in_out(mod), adapter.value(mod, "bias")
        heads = torch.arange(H) if port == "q" else torch.tensor([adapter.kv_head(h) for h in range(H)])
    W = w.reshape(adapter.d_model, -1, dh).permute(1, 0, 2)[heads]
    B = None if b is None else b.reshape(-1, dh)[heads]
    return W, B


@contextlib.contextmanager
def head_ports(handle, fn):
    """While the block runs, ``fn(layer, port, x)`` sees every layer's per-head port outputs
    ``x [B, T, n_heads, d_head]`` (port ``'q'``, ``'k'`` or ``'v'``; k and v ungrouped) and may return
    a replacement of the same shape."""
    a = handle.adapter
    check_supported(a)
    H, dh = a.n_heads, a.d_head
    saved = {}

    def split_hook(layer, port):
        def hook(mod, args, out):
            x = out.view(*out.shape[:-1], -1, dh)
            if x.shape[-2] != H:  # a GQA key/value projection: one slice per query head
                x = x.repeat_interleave(H // x.shape[-2], dim=-2)
            new = fn(layer, port, x)
            return (new if new is not None else x).reshape(*out.shape[:-1], H * dh)
        return hook

    def fused_hook(layer):
        def hook(mod, args, out):
            parts = out.split(a.d_model, dim=-1)
            new = []
            for port, p in zip(PORTS, parts):
                x = p.view(*p.shape[:-1], H, dh)
                r = fn(layer, port, x)
                new.append((r if r is not None else x).reshape(p.shape))
            return torch.cat(new, -1)
        return hook

    try:
        with HookSet() as hs:
            for l in range(a.n_layers):
                attn = a.attn(l)
                if a.family == "gpt2":
                    hs.post(attn.c_attn, fused_hook(l))
                    continue
                if getattr(attn, "num_key_value_groups", 1) != 1:
                    saved[l] = attn.num_key_value_groups
                    attn.num_key_value_groups = 1
                for port in PORTS:
                    hs.post(getattr(attn, f"{port}_proj"), split_hook(l, port))
            yield
    finally:
        for l, g in saved.items():
            a.attn(l).num_key_value_groups = g
