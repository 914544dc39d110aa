"""ParameterMask: which slices of which weight matrices belong to a set of components.

A mask is built from *units*: a head (its q/k/v/o slices, as selected by ``ports``), an MLP neuron
(its rows in the input projections and its column in the output projection), or a whole named
parameter (a norm, say). Boolean tensors per parameter are derived from the units, so set algebra
and random controls stay structured (whole heads, whole neurons) rather than scattering elements.

With grouped-query attention a KV head is shared by several query heads, so the k/v slices of a
mask and of its complement can overlap; :meth:`ParameterMask.overlap_params` reports it.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable

import torch

from ..errors import KnoweditError
from ..models.weights import param_device

PORTS = "qkvo"


@dataclass(frozen=True)
class MaskUnits:
    heads: frozenset = frozenset()      # {(layer, head)}
    neurons: frozenset = frozenset()    # {(layer, neuron)}
    params: frozenset = frozenset()     # {parameter name} taken whole
    ports: str = PORTS


@dataclass
class ParameterMask:
    handle: object
    units: MaskUnits
    meta: dict = field(default_factory=dict)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_components(cls, handle, components: Iterable, ports: str = PORTS, include_norms: bool = False,
                        mlp_neurons: dict[int, Iterable[int]] | None = None) -> "ParameterMask":
        """Heads and MLPs (names or Components) to a mask. ``mlp_neurons`` restricts an MLP to some
        hidden units; otherwise an MLP contributes all of them."""
        if not ports or set(ports) - set(PORTS):
            raise KnoweditError(f"ports: {ports!r} must be a non-empty subset of 'qkvo'")
        a = handle.adapter
        heads, neurons = set(), set()
        for c in handle.components(list(components)):
            if c.kind == "head":
                heads.add((c.layer, c.head))
            elif c.kind == "mlp":
                sel = (mlp_neurons or {}).get(c.layer)
                neurons.update((c.layer, int(n)) for n in (range(a.d_mlp) if sel is None else sel))
        params = set(a.norm_params()) if include_norms else set()
        return cls(handle, MaskUnits(frozenset(heads), frozenset(neurons), frozenset(params), ports))

    # ---- views ----------------------------------------------------------------------------
    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        """``{param name: bool tensor of the parameter's shape}`` for every touched parameter."""
        a = self.handle.adapter
        params = dict(self.handle.model.named_parameters())
        out: dict[str, torch.Tensor] = {}

        def mark(sl):
            p = params[sl.param]
            if sl.param not in out:   # where the weight computes, also when accelerate offloads it
                out[sl.param] = torch.zeros(p.shape, dtype=torch.bool, device=param_device(self.handle.model, sl.param))
            m = out[sl.param]
            if sl.dim is None:
                m[...] = True
            else:
                m.index_fill_(sl.dim, torch.tensor(sl.indices, device=m.device), True)

        for layer, h in sorted(self.units.heads):
            for sl in a.head_slices(layer, h, self.units.ports):
                mark(sl)
        by_layer = defaultdict(list)
        for layer, n in self.units.neurons:
            by_layer[layer].append(n)
        for layer, ns in sorted(by_layer.items()):
            for sl in a.mlp_slices(layer, sorted(ns)):
                mark(sl)
        from ..models.adapters import ParamSlice
        for name in sorted(self.units.params):
            mark(ParamSlice(name))
        return out

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def mlp_layers(self) -> list[int]:
        return sorted({l for l, _ in self.units.neurons})

    def mlp_neurons(self, layer: int) -> torch.Tensor:
        """Masked hidden units of one MLP (the key dimension of ROME/MEMIT), sorted."""
        return torch.tensor(sorted(n for l, n in self.units.neurons if l == layer), dtype=torch.long)

    def heads(self) -> list[tuple[int, int]]:
        return sorted(self.units.heads)

    def n_params(self) -> int:
        return int(sum(int(m.sum()) for m in self.tensors.values()))

    # ---- set algebra ------------------------------------------------------------------------
    def _check(self, other: "ParameterMask"):
        if other.handle is not self.handle:
            raise KnoweditError("masks belong to different model handles; build both on the same model")
        if other.units.ports != self.units.ports:
            raise KnoweditError(f"masks use different head ports ({self.units.ports!r} vs {other.units.ports!r})")

    def _combine(self, other, op) -> "ParameterMask":
        self._check(other)
        u, v = self.units, other.units
        return ParameterMask(self.handle, MaskUnits(op(u.heads, v.heads), op(u.neurons, v.neurons),
                                                    op(u.params, v.params), u.ports))

    def __or__(self, other):
        return self._combine(other, frozenset.__or__)

    def __and__(self, other):
        return self._combine(other, frozenset.__and__)

    def __sub__(self, other):
        return self._combine(other, frozenset.__sub__)

    union, intersection, difference = __or__, __and__, __sub__

    def universe(self) -> "ParameterMask":
        """Every head and every MLP neuron; norms only if this mask includes norms."""
        a = self.handle.adapter
        heads = frozenset((l, h) for l in range(a.n_layers) for h in range(a.n_heads))
        neurons = frozenset((l, n) for l in range(a.n_layers) for n in range(a.d_mlp))
        params = frozenset(a.norm_params()) if self.units.params else frozenset()
        return ParameterMask(self.handle, MaskUnits(heads, neurons, params, self.units.ports))

    def complement(self) -> "ParameterMask":
        out = self.universe() - self
        out.meta = {"control": "complement"}
        return out

    def random_like(self, seed: int = 0, same_layers: bool = False) -> "ParameterMask":
        """A random control with the same number of heads and of MLP neurons (hence the same
        parameter count per matrix type, up to shared GQA k/v slices). ``same_layers`` keeps each
        layer's head and neuron counts."""
        a = self.handle.adapter
        rng = random.Random(seed)
        if same_layers:
            hc, nc = Counter(l for l, _ in self.units.heads), Counter(l for l, _ in self.units.neurons)
            heads = {(l, h) for l, k in sorted(hc.items()) for h in rng.sample(range(a.n_heads), k)}
            neurons = {(l, n) for l, k in sorted(nc.items()) for n in rng.sample(range(a.d_mlp), k)}
        else:
            all_h = [(l, h) for l in range(a.n_layers) for h in range(a.n_heads)]
            heads = set(rng.sample(all_h, len(self.units.heads)))
            # Neurons are drawn as whole layers' worth where the mask holds whole MLPs, so a
            # mask of k MLPs gets k random MLPs rather than neurons scattered over every layer.
            per_layer = Counter(l for l, _ in self.units.neurons)
            if per_layer and all(k == a.d_mlp for k in per_layer.values()):
                layers = rng.sample(range(a.n_layers), len(per_layer))
                neurons = {(l, n) for l in layers for n in range(a.d_mlp)}
            else:
                all_n = [(l, n) for l in range(a.n_layers) for n in range(a.d_mlp)]
                neurons = set(rng.sample(all_n, len(self.units.neurons)))
        out = ParameterMask(self.handle, MaskUnits(frozenset(heads), frozenset(neurons), self.units.params,
                                                   self.units.ports))
        out.meta = {"control": "random", "seed": seed, "same_layers": same_layers}
        return out

    # ---- reporting --------------------------------------------------------------------------
    def overlap_params(self, other: "ParameterMask") -> int:
        n = 0
        for name, m in self.tensors.items():
            o = other[name]
            if o is not None:
                n += int((m & o).sum())
        return n

    def density(self) -> dict:
        """Share of the model covered, by parameter count and by module count (a module counts
        when any of its parameters is touched), with the norm share shown separately."""
        params = dict(self.handle.model.named_parameters())
        total = sum(p.numel() for p in params.values())
        masked = self.n_params()
        norm_names = set(self.handle.adapter.norm_params())
        norm_masked = sum(int(m.sum()) for n, m in self.tensors.items() if n in norm_names)
        modules = {n.rsplit(".", 1)[0] for n in params}
        touched = {n.rsplit(".", 1)[0] for n in self.tensors}
        return {
            "params": masked, "params_total": total, "param_density": masked / total,
            "modules": len(touched), "modules_total": len(modules), "module_density": len(touched) / len(modules),
            "norm_params": norm_masked, "norm_share_of_mask": norm_masked / masked if masked else 0.0,
            "heads": len(self.units.heads), "mlp_neurons": len(self.units.neurons),
        }
