"""Attention steering: force chosen heads to attend with a given distribution at given query
positions (Merullo et al. 2024 repaired Colored Objects this way)."""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Mapping, Sequence

import torch

from ..errors import KnoweditError
from ..models.components import Component
from .attention import pattern_hooks


def even_over(key_positions: Sequence[Sequence[int]], n_keys: int) -> torch.Tensor:
    """``[B, n_keys]`` distributions, uniform over each prompt's listed key positions."""
    d = torch.zeros(len(key_positions), n_keys)
    for b, pos in enumerate(key_positions):
        if len(pos) == 0:
            raise KnoweditError(f"key_positions[{b}] is empty; each prompt needs at least one key position")
        if max(pos) >= n_keys or min(pos) < 0:
            raise KnoweditError(f"key_positions[{b}]={list(pos)} falls outside the {n_keys} key positions")
        d[b, list(pos)] = 1.0 / len(pos)
    return d


@contextlib.contextmanager
def steer_attention(handle, targets: Mapping[str | Component, torch.Tensor], query_positions: torch.Tensor):
    """Replace the attention pattern of each head in ``targets`` at ``query_positions``.

    ``targets[head]`` is ``[B, T_k]`` (one distribution per prompt; rows should sum to 1);
    ``query_positions`` is a LongTensor ``[B]`` (e.g. each prompt's last real token). Other
    heads and other query positions keep their own pattern."""
    per_layer: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, dist in targets.items():
        c = handle.component(key)
        if not isinstance(c, Component) or c.kind != "head" or c.port:
            raise KnoweditError(f"targets: {key!r} is not a head; steering applies to heads such as 'a12.h3'")
        per_layer[c.layer][c.head] = dist
    qpos = torch.as_tensor(query_positions).long()

    def make(layer, heads):
        def fn(w):
            B, H, Tq, Tk = w.shape
            if qpos.numel() != B:
                raise KnoweditError(f"query_positions: {qpos.numel()} positions for a batch of {B} prompts")
            w = w.clone()
            rows = torch.arange(B, device=w.device)
            q = qpos.to(w.device)
            for h, dist in heads.items():
                d = dist.to(device=w.device, dtype=w.dtype)
                if d.shape[0] != B or d.shape[1] > Tk:
                    raise KnoweditError(f"targets[a{layer}.h{h}]: shape {tuple(d.shape)} does not fit [B={B}, T_k={Tk}]")
                full = torch.zeros(B, Tk, device=w.device, dtype=w.dtype)
                full[:, : d.shape[1]] = d
                w[rows, h, q] = full
            return w
        return fn

    with pattern_hooks(handle, {l: [make(l, hs)] for l, hs in per_layer.items()}, announce="steer_attention"):
        yield
