"""Read and write attention patterns through an attention function of our own.

transformers 5 computes attention through a pluggable function; the default (sdpa) never
materialises the pattern. We register ``knowedit_eager``: plain eager attention (softmax of
scaled scores, grouped-query heads repeated) that lets hooks see and replace the pattern
``[B, n_heads, T_q, T_k]`` before it weights the values. The model uses it only inside
:func:`pattern_hooks`, then goes back to its own implementation."""
from __future__ import annotations

import contextlib
import logging

import torch

IMPL = "knowedit_eager"
_HOOKS: dict[int, list] = {}  # id(attention module) -> [fn(weights) -> weights | None]
log = logging.getLogger("knowedit")


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    for fn in _HOOKS.get(id(module), ()):
        new = fn(weights)
        if new is not None:
            weights = new
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPL, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL, eager_mask)


@contextlib.contextmanager
def pattern_hooks(handle, hooks: dict[int, list], announce: str | None = None):
    """Install pattern hooks ``{layer: [fn(weights)]}`` and switch attention to ``knowedit_eager``."""
    _register()
    model, a = handle.model, handle.adapter
    old = model.config._attn_implementation
    if announce and old != IMPL:
        log.warning("%s: attention switched from %r to eager (%s) while this runs", announce, old, IMPL)
    keys = []
    try:
        if old != IMPL:
            model.set_attn_implementation(IMPL)
        for layer, fns in hooks.items():
            k = id(a.attn(layer))
            _HOOKS.setdefault(k, []).extend(fns)
            keys.append((k, fns))
        yield
    finally:
        for k, fns in keys:
            lst = _HOOKS.get(k, [])
            for f in fns:
                if f in lst:
                    lst.remove(f)
            if not lst:
                _HOOKS.pop(k, None)
        if model.config._attn_implementation != old:
            model.set_attn_implementation(old)


@contextlib.contextmanager
def record_attention(handle, layers=None):
    """Yield a dict ``{layer: pattern [B, n_heads, T_q, T_k]}`` filled by the forward passes inside."""
    layers = range(handle.adapter.n_layers) if layers is None else layers
    out: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(w):
            out[layer] = w.detach()
        return fn

    with pattern_hooks(handle, {l: [keep(l)] for l in layers}):
        yield out
