"""The Circuit type: scored components and/or edges, with where they were found and how.

Circuits serialise to versioned JSON (``schema_version``). Writing the same circuit twice gives
byte-identical files: keys are sorted and scores rounded to 6 significant digits.

MLP neurons (``m7.n123``) are held per layer, ``{layer: {index: score}}``, and written as index and
score lists per MLP (``"neurons": {"m7": {"index": [...], "score": [...]}}``) rather than one JSON key
per neuron. Version 1 files (no neurons) still load."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import KnoweditError
from ..models import components as C
from ..models.cache import atomic_write_text
from .mask import PORTS, MaskUnits, ParameterMask

_NUMBER_LIST = re.compile(r"\[\s*(-?[0-9][-0-9.eE+]*(?:,\s*-?[0-9][-0-9.eE+]*)*)\s*\]")

SCHEMA = "knowedit.circuit"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _r(x):
    return float(f"{x:.6g}") if isinstance(x, float) else x


def model_info(handle) -> dict:
    a = handle.adapter
    return {"name": handle.name, "architecture": handle.architecture, "fingerprint": handle.fingerprint,
            "n_layers": a.n_layers, "n_heads": a.n_heads, "d_mlp": a.d_mlp}


def _neuron_table(neurons, n_layers: int, d_mlp: int | None) -> dict[int, dict[int, float]]:
    """``{layer: {index: score}}`` from that form or from the file form ``{"m7": {"index", "score"}}``."""
    out: dict[int, dict[int, float]] = {}
    for key, val in (neurons or {}).items():
        layer = C.validate(key, n_layers, 1).layer if isinstance(key, str) else int(key)
        if isinstance(key, str) and C.parse(key).kind != "mlp":
            raise KnoweditError(f"neurons: key {key!r} must name an MLP such as 'm7'")
        if not 0 <= layer < n_layers:
            raise KnoweditError(f"neurons: layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
        if isinstance(val, dict) and "index" in val:
            idx, sc = list(val["index"]), list(val.get("score") or [1.0] * len(val["index"]))
            if len(idx) != len(sc):
                raise KnoweditError(f"neurons[{key!r}]: {len(idx)} indices but {len(sc)} scores")
            val = dict(zip(idx, sc))
        table = {int(i): float(v) for i, v in dict(val).items()}
        bad = [i for i in table if i < 0 or (d_mlp is not None and i >= d_mlp)]
        if bad:
            raise KnoweditError(f"neurons of m{layer}: index {bad[0]} is out of range; this model's MLPs are "
                                f"{d_mlp} wide (neurons 0..{(d_mlp or 1) - 1})")
        if table:
            out[layer] = table
    return out


@dataclass
class Circuit:
    model: dict
    task: dict
    method: dict
    nodes: dict[str, float] = field(default_factory=dict)
    edges: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    faithfulness: float | None = None
    extra: dict = field(default_factory=dict)
    neurons: dict = field(default_factory=dict)   # {layer: {index: score}}
    source: str | None = field(default=None, compare=False, repr=False)   # the file it was loaded from

    def __post_init__(self):
        n_l, n_h, d = self.model["n_layers"], self.model["n_heads"], self.model.get("d_mlp")
        nodes = {}
        for k, v in self.nodes.items():
            c = C.validate(k, n_l, n_h, d)
            if c.kind == "neuron":   # single neurons given as nodes join the per-layer table
                self.neurons = {**self.neurons}
                self.neurons.setdefault(c.layer, {})[c.index] = float(v)
            else:
                nodes[c.name] = float(v)
        self.nodes = nodes
        self.edges = {C.validate(k, n_l, n_h).name: float(v) for k, v in self.edges.items()}
        self.neurons = _neuron_table(self.neurons, n_l, d)

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_components(cls, handle, names: Iterable, scores: dict | None = None, task: dict | None = None,
                        method: dict | None = None, **kw) -> "Circuit":
        names = [handle.component(n).name if isinstance(n, (str, C.Component, C.Edge)) else n for n in names]
        scores = scores or {}
        nodes = {n: float(scores.get(n, 1.0)) for n in names if "->" not in n}
        edges = {n: float(scores.get(n, 1.0)) for n in names if "->" in n}
        return cls(model_info(handle), task or {"name": "manual"}, method or {"name": "manual"}, nodes, edges, **kw)

    # ---- contents ---------------------------------------------------------------------------
    def components(self) -> list[C.Component]:
        """Nodes, plus the nodes at both ends of every edge (ports dropped), in graph order."""
        out = {C.parse(n) for n in self.nodes}
        for e in self.edges:
            edge = C.parse(e)
            out.update({edge.src, edge.dst.without_port()})
        return sorted((c for c in out if c.kind in ("head", "mlp")), key=C.Component.sort_key)

    def heads(self) -> list[str]:
        return [c.name for c in self.components() if c.kind == "head"]

    def top_heads(self, share: float) -> list[str]:
        """The top ``share`` of all candidate heads by |score| (from the discovery run's
        ``extra['all_scores']``), best first: a fixed-share selection like Merullo et al.'s, whatever
        faithfulness target chose the circuit itself."""
        scores = {n: abs(v) for n, v in (self.extra.get("all_scores") or {}).items() if n.startswith("a")}
        if not scores:
            raise KnoweditError(f"circuit {self.task.get('name')!r} has no per-head scores (extra.all_scores); "
                                "only circuits written by `knowedit discover` at node level have them")
        if not 0 < share <= 1:
            raise KnoweditError(f"share: {share} must be in (0, 1]")
        ordered = sorted(scores, key=lambda n: (-scores[n], C.parse(n).sort_key()))
        return ordered[:max(1, round(share * len(scores)))]

    def mlps(self) -> list[str]:
        return [c.name for c in self.components() if c.kind == "mlp"]

    def neuron_layers(self) -> list[int]:
        return sorted(self.neurons)

    def layer_neurons(self, layer: int) -> list[int]:
        """This circuit's single neurons in one MLP, sorted (a whole MLP in ``nodes`` is not expanded)."""
        return sorted(self.neurons.get(layer, {}))

    def n_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def neuron_names(self) -> list[str]:
        return [f"m{l}.n{i}" for l in sorted(self.neurons) for i in sorted(self.neurons[l])]

    def top_neurons(self, layer: int, share: float, end: str = "top") -> list[int]:
        """The ``share`` of layer ``layer``'s neurons ranked best (``end='bottom'``: worst), in rank order:
        by survival under iterative pruning (``extra['neuron_rank']``) when the circuit was found that
        way, else by |score| from the discovery run's full scores (``extra['neuron_scores']``)."""
        rank = (self.extra.get("neuron_rank") or {}).get(f"m{layer}")
        table = (self.extra.get("neuron_scores") or {}).get(f"m{layer}")
        if rank is not None:   # iterative pruning's survival order (rank 0 = best)
            table = [-float(r) for r in rank]
        if table is None:
            raise KnoweditError(f"circuit {self.task.get('name')!r} has no scores for the neurons of m{layer} "
                                "(extra.neuron_scores); only circuits written by `knowedit discover --level neuron` "
                                "have them")
        if not 0 < share <= 1:
            raise KnoweditError(f"share: {share} must be in (0, 1]")
        if end not in ("top", "bottom"):
            raise KnoweditError(f"end: {end!r} must be 'top' or 'bottom'")
        sign = -1 if end == "top" else 1
        order = sorted(range(len(table)), key=lambda i: (sign * abs(table[i]), i))
        return order[:max(1, round(share * len(table)))]

    def __len__(self) -> int:
        return len(self.nodes) + len(self.edges) + self.n_neurons()

    def __contains__(self, name: str) -> bool:
        if name in self.nodes or name in self.edges:
            return True
        c = C.parse(name)
        return c.kind == "neuron" and c.index in self.neurons.get(c.layer, {})

    # ---- model identity ---------------------------------------------------------------------
    def check_model(self, handle) -> None:
        """Error unless this circuit was found on the model that ``handle`` holds."""
        mine, theirs = self.model, model_info(handle)
        if self.neurons and mine.get("d_mlp") not in (None, theirs["d_mlp"]):
            raise KnoweditError(
                f"circuit: its neurons index MLPs {mine['d_mlp']} wide, but the loaded model's MLPs are "
                f"{theirs['d_mlp']} wide; a neuron circuit only applies to the model it was found on "
                "(rediscover it with `knowedit discover --level neuron`)")
        if (mine.get("architecture"), mine.get("n_layers"), mine.get("n_heads")) != (
                theirs["architecture"], theirs["n_layers"], theirs["n_heads"]) or \
                mine.get("fingerprint") != theirs["fingerprint"]:
            raise KnoweditError(
                f"circuit: found on model {mine.get('name')!r} (fingerprint {mine.get('fingerprint')}), but the "
                f"loaded model is {theirs['name']!r} (fingerprint {theirs['fingerprint']}); rediscover the circuit "
                "on this model with `knowedit discover`, or load the model it was found on")

    # ---- set algebra ------------------------------------------------------------------------
    def _same_model(self, other: "Circuit"):
        if self.model.get("fingerprint") != other.model.get("fingerprint"):
            raise KnoweditError(
                f"circuits come from different models ({self.model.get('name')!r} vs {other.model.get('name')!r})")

    def _derived(self, nodes: dict, edges: dict, op: str, other: "Circuit | None" = None,
                 neurons: dict | None = None) -> "Circuit":
        task = {"name": f"{op}({self.task.get('name')}" + (f", {other.task.get('name')})" if other else ")")}
        return Circuit(dict(self.model), task, {"name": op}, nodes, edges, neurons=neurons or {})

    def _neuron_sets(self) -> dict[int, set[int]]:
        """Neurons per layer with whole MLPs expanded (they hold every neuron of their layer)."""
        d = self.model.get("d_mlp")
        out = {l: set(v) for l, v in self.neurons.items()}
        for m in self.mlps():
            if d is None:
                raise KnoweditError("circuit: its file does not record the MLP width (d_mlp), so whole MLPs cannot "
                                    "be combined with single neurons; rediscover it with this knowedit")
            out[C.parse(m).layer] = set(range(d))
        return out

    def _mlp_op(self, other: "Circuit", nodes: dict, op) -> tuple[dict, dict]:
        """(nodes, neurons) of a set operation where MLPs and neurons meet: the operation runs on each
        layer's neurons (whole MLPs expanded); a whole MLP stays a node where the result holds the whole
        layer, and single neurons are kept unless they only restate a whole MLP of either side."""
        if not (self.neurons or other.neurons):
            return nodes, {}
        a, b = self._neuron_sets(), other._neuron_sets()
        d = self.model.get("d_mlp")
        whole = {C.parse(m).layer for m in self.mlps()} | {C.parse(m).layer for m in other.mlps()}
        out_nodes = {k: v for k, v in nodes.items() if C.parse(k).kind != "mlp"}
        neurons = {}
        for l in set(a) | set(b):
            keep = op(a.get(l, set()), b.get(l, set()))
            if len(keep) == d:
                out_nodes[f"m{l}"] = self.nodes.get(f"m{l}", other.nodes.get(f"m{l}", 0.0))
            if keep and not (l in whole and len(keep) == d):
                neurons[l] = {i: self.neurons.get(l, {}).get(i, other.neurons.get(l, {}).get(i, 1.0)) for i in keep}
        return out_nodes, neurons

    def union(self, other: "Circuit") -> "Circuit":
        self._same_model(other)
        nodes, neurons = self._mlp_op(other, {**other.nodes, **self.nodes}, set.__or__)
        return self._derived(nodes, {**other.edges, **self.edges}, "union", other, neurons)

    def intersection(self, other: "Circuit") -> "Circuit":
        self._same_model(other)
        nodes, neurons = self._mlp_op(other, {k: v for k, v in self.nodes.items() if k in other.nodes}, set.__and__)
        return self._derived(nodes, {k: v for k, v in self.edges.items() if k in other.edges}, "intersection",
                             other, neurons)

    def difference(self, other: "Circuit") -> "Circuit":
        self._same_model(other)
        nodes, neurons = self._mlp_op(other, {k: v for k, v in self.nodes.items() if k not in other.nodes}, set.__sub__)
        return self._derived(nodes, {k: v for k, v in self.edges.items() if k not in other.edges}, "difference",
                             other, neurons)

    __or__, __and__, __sub__ = union, intersection, difference

    def all_nodes(self) -> list[str]:
        n_l, n_h = self.model["n_layers"], self.model["n_heads"]
        return [c.name for c in C.all_heads(n_l, n_h) + C.all_mlps(n_l)]

    def complement(self) -> "Circuit":
        """Every head and MLP of the model that is not among this circuit's components; in an MLP where
        the circuit holds single neurons, the rest of that MLP's neurons."""
        mine = {c.name for c in self.components()} | {f"m{l}" for l in self.neurons}
        d = self.model.get("d_mlp")
        rest = {l: {i: 0.0 for i in range(d) if i not in v} for l, v in self.neurons.items()} if self.neurons else {}
        return self._derived({n: 0.0 for n in self.all_nodes() if n not in mine}, {}, "complement",
                             neurons={l: v for l, v in rest.items() if v})

    def random_like(self, seed: int = 0, same_layers: bool = False) -> "Circuit":
        """As many random heads and MLPs as this circuit has (per layer, with ``same_layers``)."""
        rng = random.Random(seed)
        comps = self.components()
        n_l, n_h = self.model["n_layers"], self.model["n_heads"]
        heads = [c for c in comps if c.kind == "head"]
        mlps = [c for c in comps if c.kind == "mlp"]
        if same_layers:
            chosen = []
            for layer in sorted({c.layer for c in heads}):
                k = sum(c.layer == layer for c in heads)
                chosen += [f"a{layer}.h{h}" for h in rng.sample(range(n_h), k)]
        else:
            chosen = [c.name for c in rng.sample(C.all_heads(n_l, n_h), len(heads))]
        chosen += [c.name for c in rng.sample(C.all_mlps(n_l), len(mlps))]
        neurons: dict[int, dict[int, float]] = {}
        if self.neurons:
            d = self.model["d_mlp"]
            if same_layers:
                for l in sorted(self.neurons):
                    neurons[l] = {i: 0.0 for i in rng.sample(range(d), len(self.neurons[l]))}
            else:
                taken = {C.parse(m).layer for m in chosen if m.startswith("m")}
                pool = [(l, i) for l in range(n_l) if l not in taken for i in range(d)]
                for l, i in rng.sample(pool, self.n_neurons()):
                    neurons.setdefault(l, {})[i] = 0.0
        out = self._derived({n: 0.0 for n in chosen}, {}, "random_like", neurons=neurons)
        out.method.update({"seed": seed, "same_layers": same_layers})
        return out

    def overlap(self, other: "Circuit", kind: str = "head") -> dict:
        """Jaccard of the two component sets, and the share of the union present in both
        (Merullo et al.'s statistic when ``kind='head'``)."""
        a = {c.name for c in self.components() if kind in ("all", c.kind)}
        b = {c.name for c in other.components() if kind in ("all", c.kind)}
        union, inter = a | b, a & b
        return {"kind": kind, "n_a": len(a), "n_b": len(b), "shared": sorted(inter, key=lambda n: C.parse(n).sort_key()),
                "jaccard": len(inter) / len(union) if union else 0.0,
                "share_of_union": len(inter) / len(union) if union else 0.0,
                "share_of_a": len(inter) / len(a) if a else 0.0, "share_of_b": len(inter) / len(b) if b else 0.0}

    # ---- parameters ---------------------------------------------------------------------------
    def weight_mask(self, handle):
        """The element-level mask of a learned-mask circuit, read from its sidecar file (referenced in
        ``extra['weight_mask']`` by file name and sha256, next to the circuit JSON)."""
        from .weight_mask import WeightMask
        entry = self.extra.get("weight_mask")
        if not entry:
            raise KnoweditError(f"circuit {self.task.get('name')!r} has no weight mask; only circuits written by "
                                "`knowedit discover --method mask` have one")
        self.check_model(handle)
        folder = Path(self.source).parent if self.source else Path(".")
        return WeightMask.load(folder / entry["file"], entry["sha256"], handle)

    def parameter_mask(self, handle, ports: str = PORTS, include_norms: bool = False,
                       mlp_neurons: dict | None = None) -> ParameterMask:
        """Heads (their ``ports`` slices), whole MLPs and single neurons as parameter slices.
        ``mlp_neurons={layer: indices}`` restricts those layers' MLPs to the given hidden units. A
        learned weight-mask circuit gives its element-level mask (:meth:`weight_mask`)."""
        if self.extra.get("weight_mask") and self.method.get("level") == "weight":
            m = self.weight_mask(handle)
            m.meta = {**m.meta, "circuit": self.task.get("name"), "method": self.method.get("name")}
            return m
        self.check_model(handle)
        m = ParameterMask.from_components(handle, self.components(), ports=ports, include_norms=include_norms,
                                          mlp_neurons=mlp_neurons)
        if self.neurons:
            extra = {(l, i) for l, idx in self.neurons.items() for i in idx
                     if mlp_neurons is None or l not in mlp_neurons or i in set(mlp_neurons[l])}
            m = ParameterMask(handle, MaskUnits(m.units.heads, m.units.neurons | frozenset(extra), m.units.params,
                                                m.units.ports))
        m.meta = {"circuit": self.task.get("name"), "method": self.method.get("name")}
        return m

    # ---- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "model": self.model, "task": self.task, "method": self.method,
            "threshold": _r(self.threshold), "faithfulness": _r(self.faithfulness),
            "nodes": {k: _r(v) for k, v in sorted(self.nodes.items(), key=lambda kv: C.parse(kv[0]).sort_key())},
            "edges": {k: _r(v) for k, v in sorted(self.edges.items())},
            "neurons": {f"m{l}": {"index": sorted(t), "score": [_r(t[i]) for i in sorted(t)]}
                        for l, t in sorted(self.neurons.items())},
            "extra": self.extra,
        }

    def to_json(self) -> str:
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        # lists of plain numbers (neuron indices and scores: tens of thousands) on one line each
        return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"

    def save(self, path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())
        self.source = str(path)
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "circuit") -> "Circuit":
        if d.get("schema") != SCHEMA:
            raise KnoweditError(f"{source}: not a knowedit circuit file (schema {d.get('schema')!r})")
        if d.get("schema_version") not in READABLE_VERSIONS:
            raise KnoweditError(f"{source}: schema_version {d.get('schema_version')} is not supported "
                                f"(this knowedit reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        for key in ("model", "task", "method"):
            if not isinstance(d.get(key), dict):
                raise KnoweditError(f"{source}: field {key!r} is missing or not an object")
        return cls(d["model"], d["task"], d["method"], d.get("nodes") or {}, d.get("edges") or {},
                   d.get("threshold"), d.get("faithfulness"), d.get("extra") or {}, d.get("neurons") or {})

    @classmethod
    def load(cls, path, handle=None) -> "Circuit":
        """Read a circuit file; with ``handle``, also check it was found on that model."""
        if not Path(path).is_file():
            raise KnoweditError(f"{path}: no such circuit file; write one with `knowedit discover ... --out {path}`")
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise KnoweditError(f"{path}: not valid JSON ({e})") from None
        c = cls.from_dict(d, str(path))
        c.source = str(path)
        if handle is not None:
            c.check_model(handle)
        return c
