"""The edge graph of a transformer, as edge-level discovery sees it.

Sources (upstream nodes): every head and every MLP, in forward order (layer by layer, the heads
before the MLP). Destinations: every head's q, k and v input (``a9.h6.q``), every MLP's input and
the logits. An edge ``u->v`` exists when ``u`` runs before ``v``: heads of layer l read the heads and
MLPs of layers < l, MLP l also reads the heads of layer l, and the logits read everything.

The embedding (token and position embeddings, as they enter the first block) is a source too. By
default it is never ablated: its edges are always in the circuit, as the embeddings always stay in
node-level circuits, so it appears in no candidate list. With ``emb=True`` (the MIB protocol) it is
source 0 and its edges ``emb->a0.h1.q`` ... are candidates like any other.
"""
from __future__ import annotations

from functools import cached_property

import torch

from ..hooks.ports import PORTS


class EdgeGraph:
    def __init__(self, n_layers: int, n_heads: int, emb: bool = False):
        self.L, self.H = n_layers, n_heads
        self.stride = n_heads + 1  # sources per layer: H heads, then the MLP
        self.emb = emb
        self.first = int(emb)  # the embedding, when it is a candidate source, comes first

    # ---- sources --------------------------------------------------------------------------
    @property
    def n_sources(self) -> int:
        return self.first + self.L * self.stride

    def head_src(self, layer: int, head: int) -> int:
        return self.first + layer * self.stride + head

    def mlp_src(self, layer: int) -> int:
        return self.first + layer * self.stride + self.H

    @cached_property
    def source_names(self) -> list[str]:
        out = ["emb"] if self.emb else []
        for l in range(self.L):
            out += [f"a{l}.h{h}" for h in range(self.H)] + [f"m{l}"]
        return out

    # ---- destinations ---------------------------------------------------------------------
    # per layer: 3H head ports (port-major: q of every head, then k, then v), then the MLP; logits last
    @property
    def per_layer(self) -> int:
        return 3 * self.H + 1

    @property
    def n_dests(self) -> int:
        return self.L * self.per_layer + 1

    def port_dst(self, layer: int, port: str, head: int) -> int:
        return layer * self.per_layer + PORTS.index(port) * self.H + head

    def mlp_dst(self, layer: int) -> int:
        return layer * self.per_layer + 3 * self.H

    @property
    def logits_dst(self) -> int:
        return self.L * self.per_layer

    @cached_property
    def dest_names(self) -> list[str]:
        out = []
        for l in range(self.L):
            out += [f"a{l}.h{h}.{p}" for p in PORTS for h in range(self.H)] + [f"m{l}"]
        return out + ["logits"]

    def valid_sources(self, dst: int) -> int:
        """Sources ``0 .. n-1`` may feed destination ``dst``."""
        if dst == self.logits_dst:
            return self.n_sources
        layer, k = divmod(dst, self.per_layer)
        return self.first + layer * self.stride + (self.H if k == 3 * self.H else 0)

    @cached_property
    def dest_node(self) -> torch.Tensor:
        """For each destination, the source index of the node it feeds (-1 for the logits)."""
        out = torch.full((self.n_dests,), -1, dtype=torch.long)
        for l in range(self.L):
            for p in PORTS:
                for h in range(self.H):
                    out[self.port_dst(l, p, h)] = self.head_src(l, h)
            out[self.mlp_dst(l)] = self.mlp_src(l)
        return out

    def prune(self, present: torch.Tensor) -> torch.Tensor:
        """MIB's pruning after top-n: repeatedly drop the nodes that no kept edge reads from or writes
        to (the embedding always counts as read, the logits are always kept) and the edges of dropped
        nodes, until nothing changes. What is left connects the input to the logits."""
        present = present.clone()
        feeds = self.dest_node >= 0
        while True:
            reads = torch.zeros(self.n_sources).index_add_(0, self.dest_node[feeds], present[feeds].any(1).float())
            # without the embedding as a candidate its edges are always there: every node reads something
            has_in = reads > 0 if self.emb else torch.ones(self.n_sources, dtype=torch.bool)
            if self.emb:
                has_in[0] = True
            alive = present.any(0) & has_in
            dst_alive = torch.ones(self.n_dests, dtype=torch.bool)
            dst_alive[feeds] = alive[self.dest_node[feeds]]
            kept = present & alive.unsqueeze(0) & dst_alive.unsqueeze(1)
            if torch.equal(kept, present):
                return kept
            present = kept

    # ---- edges ----------------------------------------------------------------------------
    @cached_property
    def edge_names(self) -> list[str]:
        """Every candidate edge, destination by destination in forward order."""
        src = self.source_names
        return [f"{src[u]}->{v_name}" for v, v_name in enumerate(self.dest_names)
                for u in range(self.valid_sources(v))]

    @cached_property
    def index_of(self) -> dict[str, tuple[int, int]]:
        out = {}
        for v, v_name in enumerate(self.dest_names):
            for u in range(self.valid_sources(v)):
                out[f"{self.source_names[u]}->{v_name}"] = (v, u)
        return out

    def present(self, edges) -> torch.Tensor:
        """Bool ``[n_dests, n_sources]``: which edges are in the circuit. Unknown names raise KeyError."""
        m = torch.zeros(self.n_dests, self.n_sources, dtype=torch.bool)
        for e in edges:
            v, u = self.index_of[e]
            m[v, u] = True
        return m

    def scores_to_dict(self, S: torch.Tensor) -> dict[str, float]:
        """``S [n_dests, n_sources]`` → ``{edge name: score}`` over the valid edges."""
        vals = []
        for v in range(self.n_dests):
            vals += S[v, :self.valid_sources(v)].tolist()
        return dict(zip(self.edge_names, vals))
