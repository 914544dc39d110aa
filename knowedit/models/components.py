"""Component names shared by circuits, reports and the CLI.

Nodes: ``a{L}.h{H}`` (attention head), ``m{L}`` (MLP), ``m{L}.n{i}`` (neuron i of that MLP: the down
projection's input coordinate i, for gated MLPs the product act(gate)·up), ``emb``, ``logits``,
``r{L}.f{i}`` (latent i of the SAE on the residual stream after block L) and ``m{L}.f{i}`` (latent i
of a transcoder of MLP L); a latent index is checked against the SAE where one is loaded
(:mod:`knowedit.sae`), here only its layer.
Edges: ``src->dst`` where the destination may name a head input port,
``a9.h6.q`` / ``.k`` / ``.v``; e.g. ``a5.h3->m7`` or ``a5.h3->a9.h6.q``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import KnoweditError

_NODE = re.compile(r"^(?:a(\d+)\.h(\d+)(?:\.([qkv]))?|m(\d+)(?:\.n(\d+))?|emb|logits)$")
_LATENT = re.compile(r"^([rm])(\d+)\.f(\d+)$")
LATENT_KINDS = ("resid_latent", "mlp_latent")


@dataclass(frozen=True, order=True)
class Component:
    """One node of the computational graph. ``port`` is only set on head inputs."""

    kind: str  # "head", "mlp", "neuron", "emb", "logits", "resid_latent", "mlp_latent"
    layer: int = -1
    head: int = -1    # the head, or the neuron's / latent's index
    port: str = ""

    @property
    def name(self) -> str:
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}" + (f".{self.port}" if self.port else "")
        if self.kind == "mlp":
            return f"m{self.layer}"
        if self.kind == "neuron":
            return f"m{self.layer}.n{self.head}"
        if self.kind in LATENT_KINDS:
            return f"{self.kind[0]}{self.layer}.f{self.head}"
        return self.kind

    @property
    def index(self) -> int:
        """A neuron's index inside its MLP, or a latent's inside its SAE."""
        return self.head

    @property
    def is_latent(self) -> bool:
        return self.kind in LATENT_KINDS

    def without_port(self) -> "Component":
        return Component(self.kind, self.layer, self.head) if self.port else self

    def __str__(self) -> str:
        return self.name

    def sort_key(self):
        # Graph order: emb first, then by layer with the attention before the MLP, logits last.
        order = {"emb": (-1, 0, 0), "logits": (10**9, 0, 0)}
        if self.kind in order:
            return order[self.kind]
        # an MLP sorts before its own neurons (head = -1 for a whole MLP); a block's residual latents
        # come after everything inside that block
        if self.kind in LATENT_KINDS:
            return (self.layer, 2 if self.kind == "resid_latent" else 1, self.head)
        return (self.layer, 0 if self.kind == "head" else 1, self.head)


@dataclass(frozen=True)
class Edge:
    src: Component
    dst: Component

    @property
    def name(self) -> str:
        return f"{self.src.name}->{self.dst.name}"

    def __str__(self) -> str:
        return self.name

    def sort_key(self):
        # by destination, then port, then source: an edge list reads in forward order
        return (self.dst.without_port().sort_key(), self.dst.port, self.src.sort_key())


def head(layer: int, h: int) -> Component:
    return Component("head", layer, h)


def mlp(layer: int) -> Component:
    return Component("mlp", layer)


def neuron(layer: int, i: int) -> Component:
    return Component("neuron", layer, i)


def latent(layer: int, i: int, site: str = "r") -> Component:
    """Latent ``i`` of the SAE on the residual stream after block ``layer`` (``site='r'``) or of the
    transcoder of MLP ``layer`` (``site='m'``)."""
    return Component("resid_latent" if site == "r" else "mlp_latent", layer, i)


def parse_node(name: str) -> Component:
    lat = _LATENT.match(name.strip())
    if lat:
        return latent(int(lat.group(2)), int(lat.group(3)), lat.group(1))
    m = _NODE.match(name.strip())
    if not m:
        raise KnoweditError(
            f"component {name!r} is not a valid name; use 'a{{L}}.h{{H}}' for a head, "
            "'m{L}' for an MLP, 'm{L}.n{i}' for one MLP neuron, 'r{L}.f{i}' / 'm{L}.f{i}' for an SAE / "
            "transcoder latent, 'emb' or 'logits' (e.g. 'a5.h3', 'm7', 'm7.n123', 'r12.f45')"
        )
    if m.group(1) is not None:
        return Component("head", int(m.group(1)), int(m.group(2)), m.group(3) or "")
    if m.group(5) is not None:
        return Component("neuron", int(m.group(4)), int(m.group(5)))
    if m.group(4) is not None:
        return Component("mlp", int(m.group(4)))
    return Component(name.strip())


def parse(name: str) -> Component | Edge:
    """Parse a node or an edge name."""
    if "->" in name:
        src, dst = name.split("->", 1)
        s, d = parse_node(src), parse_node(dst)
        if s.port:
            raise KnoweditError(f"edge {name!r}: a port (.q/.k/.v) belongs on the destination head only")
        if s.kind == "logits" or d.kind == "emb":
            raise KnoweditError(f"edge {name!r} runs backwards: edges go from emb/heads/MLPs towards logits")
        return Edge(s, d)
    node = parse_node(name)
    return node


def validate(item: Component | Edge | str, n_layers: int, n_heads: int, d_mlp: int | None = None) -> Component | Edge:
    """Parse if needed and check layer, head and neuron indices against a model's shape (neuron
    indices only when ``d_mlp`` is known)."""
    obj = parse(item) if isinstance(item, str) else item
    nodes = [obj.src, obj.dst] if isinstance(obj, Edge) else [obj]
    for c in nodes:
        if isinstance(obj, Edge) and (c.kind == "neuron" or c.is_latent):
            raise KnoweditError(f"edge {obj.name!r}: edges join heads, MLPs, emb and logits, not single neurons "
                                "or SAE latents")
        if (c.kind in ("head", "mlp", "neuron") or c.is_latent) and not 0 <= c.layer < n_layers:
            raise KnoweditError(
                f"component {c.name!r}: layer {c.layer} is out of range; this model has layers 0..{n_layers - 1}"
            )
        if c.kind == "head" and not 0 <= c.head < n_heads:
            raise KnoweditError(
                f"component {c.name!r}: head {c.head} is out of range; this model has heads 0..{n_heads - 1} per layer"
            )
        if c.kind == "neuron" and d_mlp is not None and not 0 <= c.head < d_mlp:
            raise KnoweditError(
                f"component {c.name!r}: neuron {c.head} is out of range; this model's MLPs are {d_mlp} wide "
                f"(neurons 0..{d_mlp - 1})"
            )
    if isinstance(obj, Edge) and obj.src.kind != "emb" and obj.dst.kind != "logits":
        if obj.src.sort_key() >= obj.dst.without_port().sort_key():
            raise KnoweditError(f"edge {obj.name!r}: the source must come before the destination in the forward pass")
    return obj


def all_heads(n_layers: int, n_heads: int) -> list[Component]:
    return [head(l, h) for l in range(n_layers) for h in range(n_heads)]


def all_mlps(n_layers: int) -> list[Component]:
    return [mlp(l) for l in range(n_layers)]
