"""Record per-head outputs, MLP outputs and the residual stream during a forward pass.

A head's output is read as its slice of the attention output projection's *input* (the
``[B, T, n_heads * d_head]`` tensor before W_O). That works for every layout, grouped-query
attention included, because W_O's input is always one block per query head."""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from ..models.components import Component
from .hookset import HookSet


class Recording:
    """Activations of one forward pass. Keys are component names:

    * ``a{L}.h{H}``: head output before W_O, ``[B, T, d_head]`` (``z``)
    * ``m{L}``: MLP output, ``[B, T, d_model]``
    * ``m{L}.n{i}``: one neuron (the down projection's input coordinate), ``[B, T]``; the whole layer's
      neurons are in ``neurons[L]``, ``[B, T, d_mlp]``
    * ``emb``: embedding output; ``resid{L}``: residual stream entering layer L,
      ``resid{n_layers}`` the stream after the last layer (before the final norm).
    """

    def __init__(self, handle):
        self.handle = handle
        self.z: dict[int, torch.Tensor] = {}
        self.mlp: dict[int, torch.Tensor] = {}
        self.neurons: dict[int, torch.Tensor] = {}
        self.resid: dict[int, torch.Tensor] = {}
        self.emb: torch.Tensor | None = None

    def __getitem__(self, key: str | Component) -> torch.Tensor:
        c = self.handle.component(key) if not str(key).startswith("resid") else None
        if c is None:
            return self.resid[int(str(key)[5:])]
        if c.kind == "head":
            return self.z[c.layer][:, :, c.head]
        if c.kind == "mlp":
            return self.mlp[c.layer]
        if c.kind == "neuron":
            return self.neurons[c.layer][:, :, c.index]
        if c.kind == "emb":
            return self.emb
        raise KeyError(f"{key!r} is not recorded")

    def head_out(self, layer: int, head: int) -> torch.Tensor:
        """What head ``layer.head`` writes to the residual stream, ``[B, T, d_model]`` (no bias)."""
        w = self.handle.adapter.head_o_weight(layer, head)
        return self.z[layer][:, :, head] @ w.to(self.z[layer].dtype)


@contextlib.contextmanager
def record(handle, components: Iterable[str | Component] | None = None, resid: bool = False,
           detach: bool = True):
    """Record the given components (default: every head and MLP) while the block runs. Naming any
    neuron of a layer records all of that layer's neurons (one hook per MLP).

    ``detach=False`` keeps the autograd graph, which attribution patching needs."""
    a = handle.adapter
    comps = handle.components(list(components)) if components is not None else handle.all_heads() + handle.all_mlps()
    head_layers = sorted({c.layer for c in comps if c.kind == "head"})
    mlp_layers = sorted({c.layer for c in comps if c.kind == "mlp"})
    neuron_layers = sorted({c.layer for c in comps if c.kind == "neuron"})
    rec = Recording(handle)
    keep = (lambda t: t.detach()) if detach else (lambda t: t)

    def z_hook(layer):
        def fn(mod, args):
            x = args[0]
            rec.z[layer] = keep(x).view(*x.shape[:-1], a.n_heads, a.d_head)
        return fn

    def mlp_hook(layer):
        def fn(mod, args, out):
            rec.mlp[layer] = keep(out)
        return fn

    def neuron_hook(layer):
        def fn(mod, args):
            rec.neurons[layer] = keep(args[0])
        return fn

    def resid_hook(layer):
        def fn(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            rec.resid[layer] = keep(x)
        return fn

    with HookSet() as hs:
        for l in head_layers:
            hs.pre(a.o_proj(l), z_hook(l))
        for l in mlp_layers:
            hs.post(a.mlp(l), mlp_hook(l))
        for l in neuron_layers:
            hs.pre(a.mlp_out(l), neuron_hook(l))
        if any(c.kind == "emb" for c in comps):
            hs.post(a.embed, lambda m, args, out: setattr(rec, "emb", keep(out)))
        if resid:
            for l in range(a.n_layers):
                hs._handles.append(a.block(l).register_forward_pre_hook(resid_hook(l), with_kwargs=True))
            hs.pre(a.ln_final, lambda m, args: rec.resid.__setitem__(a.n_layers, keep(args[0])))
        yield rec
