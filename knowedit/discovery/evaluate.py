"""The task metric with chosen nodes ablated, and faithfulness.

Faithfulness of a circuit C is ``f = (m(C) - m(∅)) / (m(N) - m(∅))`` where ``m`` is the task metric
averaged over the clean prompts, ``N`` the full model and ``∅`` the model with every candidate node
ablated (every head and MLP, or every head when only heads are candidates; the embeddings always stay). Ablation replaces a node's activation by its
:class:`~knowedit.discovery.reference.Reference` value."""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import KnoweditError
from ..hooks import replace_activations
from ..tasks.base import per_prompt_scores
from .reference import Reference


CANDIDATES = ("heads", "nodes")


def all_nodes(handle, candidates: str = "nodes") -> list[str]:
    """The nodes a circuit may leave out: every head and MLP (``'nodes'``), or only the heads
    (``'heads'``: MLPs always stay, as in Wang et al.'s IOI circuit)."""
    if candidates not in CANDIDATES:
        raise KnoweditError(f"candidates: {candidates!r} is unknown; use one of {CANDIDATES}")
    mlps = handle.all_mlps() if candidates == "nodes" else []
    return [c.name for c in handle.all_heads() + mlps]


def ref_values(handle, ref: dict, names: Iterable[str]) -> dict:
    out = {}
    for n in names:
        c = handle.component(n)
        out[n] = ref["z"][c.layer][:, :, c.head] if c.kind == "head" else ref["mlp"][c.layer]
    return out


def gradient_metric(metric: str) -> str:
    # Accuracy has no gradient; attribution then follows the answer-minus-distractor logit difference.
    return "logit_diff" if metric == "accuracy" else metric


def checked_gap(task, full: float, empty: float, what: str) -> float:
    """``m(N) - m(∅)``, refusing a task whose corruption does not change the behaviour."""
    g = full - empty
    if abs(g) < 1e-6:
        raise KnoweditError(f"task {task.name!r}: the metric is the same with and without every {what} "
                            f"({full:.4g}); the corruption does not change the behaviour, so nothing "
                            "can be attributed. Use another corruption or more prompts")
    return g


class Evaluator:
    """Runs the task's clean prompts with sets of nodes ablated; caches batches and references."""

    def __init__(self, handle, task, ablation: str = "mean", batch_size: int = 32, reference: Reference | None = None,
                 candidates: str = "nodes", means: str = "template"):
        self.handle, self.task, self.batch_size, self.candidates = handle, task, batch_size, candidates
        self.reference = reference or Reference(handle, task, ablation, batch_size, means=means)
        self.nodes = all_nodes(handle, candidates)
        # Nodes that are never ablated (the MLPs when only heads are candidates).
        self.fixed = [n for n in all_nodes(handle) if n not in set(self.nodes)]
        self.batches = []
        for i in range(0, len(task), batch_size):
            b = handle.tokenize(task.clean[i:i + batch_size], bos=task.bos)
            a = torch.tensor(task.answers[i:i + len(b)])
            d = torch.tensor(task.distractors[i:i + len(b)])
            self.batches.append((i, b, a, d))
        self._refs: dict[int, dict] = {}
        self._full = self._empty = None

    def ref(self, k: int) -> dict:
        if k not in self._refs:
            i, b, _, _ = self.batches[k]
            self._refs[k] = self.reference.for_batch(i, b)
        return self._refs[k]

    @torch.no_grad()
    def batch_sum(self, k: int, absent: Iterable[str]) -> float:
        """Sum over batch ``k`` of the per-prompt metric with ``absent`` nodes ablated."""
        _, b, a, d = self.batches[k]
        absent = list(absent)
        with replace_activations(self.handle, ref_values(self.handle, self.ref(k), absent)) if absent else _null():
            logits = self.handle.last_logits(b)
        return float(per_prompt_scores(logits.float(), a, d, self.task.metric).double().sum())

    def metric(self, absent: Iterable[str]) -> float:
        absent = list(absent)
        return sum(self.batch_sum(k, absent) for k in range(len(self.batches))) / len(self.task)

    @property
    def full(self) -> float:
        if self._full is None:
            self._full = self.metric([])
        return self._full

    @property
    def empty(self) -> float:
        if self._empty is None:
            self._empty = self.metric(self.nodes)
        return self._empty

    def gap(self) -> float:
        return checked_gap(self.task, self.full, self.empty, "node")

    def faithfulness(self, nodes: Iterable[str]) -> float:
        keep = {self.handle.component(n).name for n in nodes}
        return (self.metric([n for n in self.nodes if n not in keep]) - self.empty) / self.gap()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def circuit_faithfulness(handle, circuit, task, batch_size: int = 32) -> float:
    """Re-evaluate a circuit's faithfulness on ``task`` (an edge circuit through its edges) with the
    ablation, means, candidate set, protocol and BOS its files record, independently of the scores that
    chose it. Files written before a setting was recorded get the behaviour they were found with (no
    BOS, means grouped by token length). A task with its own ``bos`` keeps it."""
    circuit.check_model(handle)
    m = circuit.method
    if task.bos is None:
        task = task.with_bos(circuit.task.get("bos", False), handle.tokenizer)
    common = dict(ablation=m.get("ablation", "mean"), batch_size=batch_size, means=m.get("means", "length"))
    if circuit.edges and m.get("level") == "edge":
        from .edge_evaluate import EdgeEvaluator
        mib = m.get("protocol") == "mib"
        return EdgeEvaluator(handle, task, emb=mib, prune=mib, **common).faithfulness(circuit.edges)
    if m.get("level") == "neuron":
        from .neuron_evaluate import NeuronEvaluator
        return NeuronEvaluator(handle, task, **common).faithfulness(circuit.neurons)
    if m.get("level") == "latent":   # SAE latents at one site (the SAE must be attached: knowedit.sae.load_sae)
        from .latent_circuit import LatentEvaluator
        return LatentEvaluator(handle, task, m["site"], ablation=m.get("ablation", "patch"),
                               batch_size=batch_size).faithfulness(circuit.nodes)
    ev = Evaluator(handle, task, candidates=m.get("candidates", "nodes"), **common)
    return ev.faithfulness(circuit.nodes)
