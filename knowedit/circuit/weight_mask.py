"""WeightMask: an element-level parameter mask (one bit per maskable weight), as learned-mask
circuits (Ge et al.) produce.

It is a :class:`~knowedit.circuit.mask.ParameterMask`, so the editors, ``mask_conditions`` and
``describe_conditions`` take it unchanged: ``tensors`` holds a bool tensor for *every* maskable
parameter (:mod:`knowedit.circuit.maskable`), so ``universe()`` is "every maskable element" and the
FT editors' ``mode="ablate"`` zeroes exactly the maskable elements outside the mask.

For ROME/MEMIT (which rewrite whole down-projection columns of chosen neurons) ``mlp_neurons(layer)``
is the neurons whose down-projection column lies *entirely* in the mask: then a restricted
ROME/MEMIT edit still changes only masked elements. A sparse weight mask may have no such column,
in which case those editors refuse it (``mlp_layers()`` is empty) rather than write outside it.

Storage is a bit-packed safetensors sidecar; see :mod:`knowedit.circuit.weight_mask_file`."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ..errors import KnoweditError
from ..models.weights import param_device
from .mask import MaskUnits, ParameterMask
from .maskable import MODULE_KINDS, maskable_params

GRANULARITIES = ("weight", "neuron", "head")


class WeightMask(ParameterMask):
    """``tensors``: ``{param name: bool tensor}`` over every maskable parameter of ``handle``."""

    def __init__(self, handle, tensors: dict[str, torch.Tensor], granularity: str = "weight",
                 meta: dict | None = None):
        if granularity not in GRANULARITIES:
            raise KnoweditError(f"granularity: {granularity!r} is unknown; use one of {', '.join(GRANULARITIES)}")
        self.handle, self.units, self.meta, self.granularity = handle, MaskUnits(), dict(meta or {}), granularity
        inv = maskable_params(handle)
        self._inventory = {p.name: p for p in inv}
        full = {}
        for p in inv:
            t = tensors.get(p.name)
            if t is None:
                t = torch.zeros(p.shape, dtype=torch.bool)
            elif tuple(t.shape) != p.shape:
                raise KnoweditError(f"mask for parameter {p.name!r} has shape {tuple(t.shape)}, but the model's "
                                    f"parameter has shape {p.shape}; the mask belongs to another model")
            full[p.name] = t.to(device=param_device(handle.model, p.name), dtype=torch.bool)
        unknown = sorted(set(tensors) - set(full))
        if unknown:
            raise KnoweditError(f"mask: {unknown[0]!r} is not a maskable parameter of this model "
                                f"({len(unknown)} such); maskable are the attention, MLP and norm parameters")
        self.tensors = full  # instance attribute shadows ParameterMask's derived cached_property

    def __eq__(self, other):
        return (isinstance(other, WeightMask) and other.handle is self.handle
                and all(torch.equal(m, other.tensors[n]) for n, m in self.tensors.items()))

    __hash__ = None

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_parameter_mask(cls, mask: ParameterMask, granularity: str = "weight") -> "WeightMask":
        """The element mask of a unit-based mask (heads/neurons/whole parameters)."""
        return cls(mask.handle, {n: m for n, m in mask.tensors.items()}, granularity, dict(mask.meta))

    @classmethod
    def full(cls, handle, granularity: str = "weight") -> "WeightMask":
        return cls(handle, {p.name: torch.ones(p.shape, dtype=torch.bool) for p in maskable_params(handle)},
                   granularity)

    # ---- editor views -----------------------------------------------------------------------
    def _down_col_full(self, layer: int) -> torch.Tensor:
        a = self.handle.adapter
        mod = a.mlp_out(layer)
        m = self.tensors[a.name_of(mod.weight)]
        return m.all(dim=a.out_dim(mod))  # one entry per hidden unit: its whole column is masked

    def mlp_layers(self) -> list[int]:
        return [l for l in range(self.handle.adapter.n_layers) if bool(self._down_col_full(l).any())]

    def mlp_neurons(self, layer: int) -> torch.Tensor:
        """Hidden units whose down-projection column is entirely in the mask (see module doc)."""
        return torch.nonzero(self._down_col_full(layer).cpu()).flatten().to(torch.long)

    def heads(self) -> list[tuple[int, int]]:
        """Heads whose every q/k/v/o slice is entirely in the mask."""
        a = self.handle.adapter
        out = []
        for l in range(a.n_layers):
            for h in range(a.n_heads):
                ok = True
                for sl in a.head_slices(l, h):
                    m = self.tensors[sl.param]
                    idx = torch.tensor(sl.indices, device=m.device)
                    if not bool(m.index_select(sl.dim, idx).all()):
                        ok = False
                        break
                if ok:
                    out.append((l, h))
        return out

    # ---- set algebra --------------------------------------------------------------------------
    def _check(self, other):
        if not isinstance(other, WeightMask):
            raise KnoweditError(f"cannot combine a WeightMask with a {type(other).__name__}; convert it with "
                                "WeightMask.from_parameter_mask(mask)")
        if other.handle is not self.handle:
            raise KnoweditError("masks belong to different model handles; build both on the same model")

    def _combine(self, other, op) -> "WeightMask":
        self._check(other)
        ops = {frozenset.__or__: torch.logical_or, frozenset.__and__: torch.logical_and,
               frozenset.__sub__: lambda x, y: x & ~y}
        f = ops[op]
        g = self.granularity if other.granularity == self.granularity else "weight"
        return WeightMask(self.handle, {n: f(m, other.tensors[n]) for n, m in self.tensors.items()}, g)

    def universe(self) -> "WeightMask":
        return WeightMask(self.handle, {n: torch.ones_like(m) for n, m in self.tensors.items()}, self.granularity)

    def complement(self) -> "WeightMask":
        return WeightMask(self.handle, {n: ~m for n, m in self.tensors.items()}, self.granularity,
                          {"control": "complement"})

    def random_like(self, seed: int = 0, same_layers: bool = False) -> "WeightMask":
        """A random control with exactly as many elements per matrix type (q k v o gate up down norm,
        biases separately) as this mask, drawn uniformly over all parameters of that type;
        ``same_layers`` keeps the count of every single parameter tensor instead."""
        gen = torch.Generator().manual_seed(seed)
        groups: dict[str, list[str]] = defaultdict(list)
        for n, p in self._inventory.items():
            groups[n if same_layers else p.matrix_type].append(n)
        out = {}
        for key in sorted(groups):
            names = groups[key]
            sizes = [self.tensors[n].numel() for n in names]
            k = sum(int(self.tensors[n].sum()) for n in names)
            flat = torch.zeros(sum(sizes), dtype=torch.bool)
            flat[torch.randperm(len(flat), generator=gen)[:k]] = True
            for n, part in zip(names, flat.split(sizes)):
                out[n] = part.view(self.tensors[n].shape)
        return WeightMask(self.handle, out, "weight", {"control": "random", "seed": seed, "same_layers": same_layers,
                                                        "matched": "per parameter" if same_layers else "per matrix type"})

    # ---- reporting ----------------------------------------------------------------------------
    def count_by_type(self) -> dict[str, list[int]]:
        """``{matrix type: [masked, total]}``."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for n, m in self.tensors.items():
            t = self._inventory[n].matrix_type
            out[t][0] += int(m.sum())
            out[t][1] += m.numel()
        return dict(out)

    def density(self) -> dict:
        """Density by parameter count over the maskable parameters (``maskable_density``) and over
        all model parameters (``param_density``, the same key :class:`ParameterMask` reports), by
        module, and the share of each module type (attention, MLP, norm, embedding) in the mask."""
        params = dict(self.handle.model.named_parameters())
        total = sum(p.numel() for p in params.values())
        by_kind = {k: [0, 0] for k in MODULE_KINDS}
        for n, p in params.items():
            kind = self._inventory[n].kind if n in self._inventory else "embedding"
            by_kind[kind][1] += p.numel()
            if n in self.tensors:
                by_kind[kind][0] += int(self.tensors[n].sum())
        masked = sum(v[0] for v in by_kind.values())
        maskable = sum(m.numel() for m in self.tensors.values())
        modules = {n.rsplit(".", 1)[0] for n in params}
        touched = {n.rsplit(".", 1)[0] for n, m in self.tensors.items() if m.any()}
        return {
            "granularity": self.granularity,
            "params": masked, "params_total": total, "param_density": masked / total,
            "maskable_params": maskable, "maskable_density": masked / maskable if maskable else 0.0,
            "modules": len(touched), "modules_total": len(modules), "module_density": len(touched) / len(modules),
            "norm_params": by_kind["norm"][0], "norm_share_of_mask": by_kind["norm"][0] / masked if masked else 0.0,
            "share_of_mask": {k: (v[0] / masked if masked else 0.0) for k, v in by_kind.items()},
            "density_by_module_type": {k: (v[0] / v[1] if v[1] else 0.0) for k, v in by_kind.items()},
            "by_matrix_type": self.count_by_type(),
            "heads": len(self.heads()), "mlp_neurons": sum(len(self.mlp_neurons(l)) for l in self.mlp_layers()),
            "heads_rule": "heads whose every q/k/v/o slice is masked",
            "mlp_neurons_rule": "hidden units whose whole down-projection column is masked",
        }

    # ---- files --------------------------------------------------------------------------------
    def save(self, path) -> str:
        """Write the bit-packed sidecar atomically; return its sha256 (hex)."""
        from .weight_mask_file import write_mask
        return write_mask(self, Path(path))

    @classmethod
    def load(cls, path, sha256: str, handle) -> "WeightMask":
        """Read a sidecar written by :meth:`save`, checking its sha256 and every shape against ``handle``."""
        from .weight_mask_file import read_mask
        tensors, granularity, meta = read_mask(Path(path), sha256, handle)
        return cls(handle, tensors, granularity, meta)

    def sidecar_entry(self, file: str, sha256: str) -> dict:
        """What a circuit JSON stores to reference this mask (``file`` relative to the JSON)."""
        d = self.density()
        return {"file": file, "sha256": sha256, "granularity": self.granularity, "format": "knowedit.weight_mask/1",
                "n_params": d["params"], "maskable_params": d["maskable_params"],
                "maskable_density": round(d["maskable_density"], 6), "param_density": round(d["param_density"], 6)}
