"""The Circuit type: scored components and/or edges, with where they were found and how.

Circuits serialise to versioned JSON (``schema_version``). Writing the same circuit twice gives
byte-identical files: keys are sorted and scores rounded to 6 significant digits."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import KnoweditError
from ..models import components as C
from ..models.cache import atomic_write_text
from .mask import PORTS, ParameterMask

SCHEMA = "knowedit.circuit"
SCHEMA_VERSION = 1


def _r(x):
    return float(f"{x:.6g}") if isinstance(x, float) else x


def model_info(handle) -> dict:
    a = handle.adapter
    return {"name": handle.name, "architecture": handle.architecture, "fingerprint": handle.fingerprint,
            "n_layers": a.n_layers, "n_heads": a.n_heads}


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

    def __post_init__(self):
        n_l, n_h = self.model["n_layers"], self.model["n_heads"]
        self.nodes = {C.validate(k, n_l, n_h).name: float(v) for k, v in self.nodes.items()}
        self.edges = {C.validate(k, n_l, n_h).name: float(v) for k, v in self.edges.items()}

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_components(cls, handle, names: Iterable, scores: dict | None = None, task: dict | None = None,
                        method: dict | None = None, **kw) -> "Circuit":
        names = [handle.component(n).name for n in names]
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

    def __len__(self) -> int:
        return len(self.nodes) + len(self.edges)

    def __contains__(self, name: str) -> bool:
        return name in self.nodes or name in self.edges

    # ---- model identity ---------------------------------------------------------------------
    def check_model(self, handle) -> None:
        """Error unless this circuit was found on the model that ``handle`` holds."""
        mine, theirs = self.model, model_info(handle)
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

    def _derived(self, nodes: dict, edges: dict, op: str, other: "Circuit | None" = None) -> "Circuit":
        task = {"name": f"{op}({self.task.get('name')}" + (f", {other.task.get('name')})" if other else ")")}
        return Circuit(dict(self.model), task, {"name": op}, nodes, edges)

    def union(self, other: "Circuit") -> "Circuit":
        self._same_model(other)
        return self._derived({**other.nodes, **self.nodes}, {**other.edges, **self.edges}, "union", other)

    def intersection(self, other: "Circuit") -> "Circuit":
        self._same_model(other)
        return self._derived({k: v for k, v in self.nodes.items() if k in other.nodes},
                             {k: v for k, v in self.edges.items() if k in other.edges}, "intersection", other)

    def difference(self, other: "Circuit") -> "Circuit":
        self._same_model(other)
        return self._derived({k: v for k, v in self.nodes.items() if k not in other.nodes},
                             {k: v for k, v in self.edges.items() if k not in other.edges}, "difference", other)

    __or__, __and__, __sub__ = union, intersection, difference

    def all_nodes(self) -> list[str]:
        n_l, n_h = self.model["n_layers"], self.model["n_heads"]
        return [c.name for c in C.all_heads(n_l, n_h) + C.all_mlps(n_l)]

    def complement(self) -> "Circuit":
        """Every head and MLP of the model that is not among this circuit's components."""
        mine = {c.name for c in self.components()}
        return self._derived({n: 0.0 for n in self.all_nodes() if n not in mine}, {}, "complement")

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
        out = self._derived({n: 0.0 for n in chosen}, {}, "random_like")
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
    def parameter_mask(self, handle, ports: str = PORTS, include_norms: bool = False,
                       mlp_neurons: dict | None = None) -> ParameterMask:
        self.check_model(handle)
        m = ParameterMask.from_components(handle, self.components(), ports=ports, include_norms=include_norms,
                                          mlp_neurons=mlp_neurons)
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
            "extra": self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    def save(self, path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "circuit") -> "Circuit":
        if d.get("schema") != SCHEMA:
            raise KnoweditError(f"{source}: not a knowedit circuit file (schema {d.get('schema')!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise KnoweditError(f"{source}: schema_version {d.get('schema_version')} is not supported "
                                f"(this knowedit reads version {SCHEMA_VERSION})")
        for key in ("model", "task", "method"):
            if not isinstance(d.get(key), dict):
                raise KnoweditError(f"{source}: field {key!r} is missing or not an object")
        return cls(d["model"], d["task"], d["method"], d.get("nodes") or {}, d.get("edges") or {},
                   d.get("threshold"), d.get("faithfulness"), d.get("extra") or {})

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
        if handle is not None:
            c.check_model(handle)
        return c
