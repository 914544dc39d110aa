"""Running an edge circuit: every destination reads the residual stream with the contributions of
its *absent* edges' sources swapped for their reference values.

For a destination ``v`` (a head's q, k or v input, an MLP's input, or the logits):
``in_v = x - Σ_{u absent from v} (o_u - o_u^ref)``, where ``x`` is the residual stream the model
computed and ``o_u`` what source ``u`` wrote to it in this same run (itself computed from its own
edited inputs). The norm and the head's projection are then applied to ``in_v``, so each head
of a layer can see a different stream. The embedding's edges are always present, unless the graph
has the embedding as a candidate source (``emb=True``, the MIB protocol); ``prune=True`` evaluates
every edge set after MIB's pruning (:meth:`EdgeGraph.prune`).

With every edge present this is the unchanged model; with none, every destination reads only the
embedding and reference contributions. ``m(∅)`` of an edge circuit is that run.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..hooks import HookSet
from ..hooks.ports import check_supported, head_ports, port_weight
from ..tasks.base import per_prompt_scores
from .edge_attribution import head_outputs, source_outputs
from .edge_graph import EdgeGraph
from .evaluate import Evaluator, checked_gap


class EdgeEvaluator:
    """The task metric and faithfulness of edge circuits; ``nodes`` lists the candidate edges (so
    the top-k search and the MIB curves take it in place of a node :class:`Evaluator`)."""

    def __init__(self, handle, task, ablation: str = "mean", batch_size: int = 32, reference=None,
                 means: str = "template", emb: bool = False, prune: bool = False):
        check_supported(handle.adapter)
        self.handle, self.task, self.prune = handle, task, prune
        a = handle.adapter
        self.graph = EdgeGraph(a.n_layers, a.n_heads, emb=emb)
        self.nodes = self.graph.edge_names
        self.fixed: list[str] = []
        self._node_ev = Evaluator(handle, task, ablation=ablation, batch_size=batch_size, candidates="nodes",
                                  reference=reference, means=means)
        self.reference, self.batches = self._node_ev.reference, self._node_ev.batches
        self._ref_src: dict[int, torch.Tensor] = {}
        self._empty = None

    def ref(self, k: int) -> dict:
        return self._node_ev.ref(k)

    def _sources_ref(self, k: int) -> torch.Tensor:
        if k not in self._ref_src:
            r = self.ref(k)
            self._ref_src[k] = source_outputs(self.handle.adapter, r["z"], r["mlp"], r["emb"][0] if self.graph.emb else None)
        return self._ref_src[k]

    @torch.no_grad()
    def batch_sum(self, k: int, present: torch.Tensor) -> float:
        """Sum over batch ``k`` of the metric with only the ``present`` edges (bool ``[dests, sources]``)."""
        h, g = self.handle, self.graph
        a = h.adapter
        _, b, ans, dis = self.batches[k]
        R = self._sources_ref(k)
        D = torch.zeros_like(R)      # o_u - o_u^ref for the sources run so far
        st = {"S": torch.zeros_like(R[0])}

        def absent_sum(dsts: list[int]) -> torch.Tensor:
            """``[len(dsts), B, T, d]``: Σ over absent valid sources (all sources so far minus present)."""
            n = g.valid_sources(dsts[0])
            P = present[dsts, :n].float()
            used = P.any(0).nonzero().flatten()
            out = st["S"].unsqueeze(0).expand(len(dsts), *st["S"].shape)
            if len(used):
                out = out - torch.einsum("pu,ubtd->pbtd", P[:, used], D[used])
            return out

        def on_heads(l):
            def fn(m, args):
                o = head_outputs(a, l, args[0])
                i = g.head_src(l, 0)
                D[i:i + a.n_heads] = o - R[i:i + a.n_heads]
                st["S"] = st["S"] + D[i:i + a.n_heads].sum(0)
            return fn

        def on_mlp_out(l):
            def fn(m, args, out):
                i = g.mlp_src(l)
                D[i] = out.float() - R[i]
                st["S"] = st["S"] + D[i]
            return fn

        def on_mlp_in(l):
            def fn(m, args):
                delta = absent_sum([g.mlp_dst(l)])[0]
                # .forward: the norm's own capture hook must not see these inputs
                return (a.ln_mlp(l).forward(st["mid"] - delta.to(st["mid"].dtype)),) + tuple(args[1:])
            return fn

        def on_port(l, port, x):
            first = g.port_dst(l, port, 0)
            delta = absent_sum(list(range(first, first + a.n_heads)))        # [H, B, T, d]
            normed = a.ln_attn(l).forward(st["x"][l].unsqueeze(0) - delta.to(st["x"][l].dtype))
            W, bias = port_weight(a, l, port)
            new = torch.einsum("hbtd,hde->bthe", normed, W.to(normed.dtype))
            return (new + bias if bias is not None else new).to(x.dtype)

        def on_final(m, args):
            delta = absent_sum([g.logits_dst])[0]
            return (args[0] - delta.to(args[0].dtype),) + tuple(args[1:])

        def on_emb(m, args):
            D[0] = args[0].float() - R[0]
            st["S"] = st["S"] + D[0]

        st["x"] = {}
        with HookSet() as hs, head_ports(h, on_port):
            if g.emb:
                hs.pre(a.ln_attn(0), on_emb)
            for l in range(a.n_layers):
                hs.pre(a.ln_attn(l), lambda m, args, l=l: st["x"].__setitem__(l, args[0]))
                hs.pre(a.o_proj(l), on_heads(l))
                hs.pre(a.ln_mlp(l), lambda m, args: st.__setitem__("mid", args[0]))
                hs.pre(a.mlp(l), on_mlp_in(l))
                hs.post(a.mlp(l), on_mlp_out(l))
            hs.pre(a.ln_final, on_final)
            logits = h.last_logits(b)
        return float(per_prompt_scores(logits.float(), ans, dis, self.task.metric).double().sum())

    def metric_with(self, present: torch.Tensor) -> float:
        return sum(self.batch_sum(k, present) for k in range(len(self.batches))) / len(self.task)

    @property
    def full(self) -> float:
        return self._node_ev.full

    @property
    def empty(self) -> float:
        if self._empty is None:
            self._empty = self.metric_with(torch.zeros(self.graph.n_dests, self.graph.n_sources, dtype=torch.bool))
        return self._empty

    def gap(self) -> float:
        return checked_gap(self.task, self.full, self.empty, "edge")

    def present(self, edges: Iterable[str]) -> torch.Tensor:
        p = self.graph.present(edges)
        return self.graph.prune(p) if self.prune else p

    def kept(self, edges: Iterable[str]) -> list[str]:
        """The edges a circuit keeps (after pruning, when this evaluator prunes), in graph order."""
        g = self.graph
        return [f"{g.source_names[u]}->{g.dest_names[v]}" for v, u in self.present(edges).nonzero().tolist()]

    def faithfulness(self, edges: Iterable[str]) -> float:
        return (self.metric_with(self.present(edges)) - self.empty) / self.gap()
