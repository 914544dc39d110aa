"""Neuron-level circuits on the real default model: the shipped relation circuits re-measure at the
faithfulness they claim, and their neurons matter more than as many random ones."""
import json
from pathlib import Path

import pytest
import torch

from knowedit.circuit import Circuit
from knowedit.discovery import circuit_faithfulness
from knowedit.discovery.neuron_evaluate import NeuronEvaluator
from knowedit.tasks import get_task

CIRCUIT = Path(__file__).resolve().parents[1] / "circuits" / "smollm2-135m" / "facts-neurons-P17.json"


@pytest.fixture(scope="module")
def shipped(smol, shared_datasets):
    if not CIRCUIT.exists():
        pytest.skip(f"{CIRCUIT.name} is not shipped")
    c = Circuit.load(CIRCUIT, smol)
    n, held = c.task["n"], c.extra["n_heldout"]
    # the discovery run drew n + held prompts and scored the first n
    task = get_task("facts", smol.tokenizer, n=n + held, seed=c.task["seed"], data_dir=shared_datasets,
                    relations=c.task["relations"])
    return c, task.subset(range(n)), task.subset(range(n, len(task)))


def test_shipped_neuron_circuit_remeasures_at_its_claimed_faithfulness(smol, shipped):
    c, scoring, heldout = shipped
    assert c.method["level"] == "neuron" and c.n_neurons() == c.extra["n_neurons"]
    assert circuit_faithfulness(smol, c, scoring) == pytest.approx(c.faithfulness, abs=2e-3)
    assert circuit_faithfulness(smol, c, heldout) == pytest.approx(c.extra["faithfulness_heldout"], abs=2e-3)


def test_circuit_neurons_matter_more_than_random_ones(smol, shipped):
    """Ablating only the circuit's 200 best-surviving neurons hurts the task more than 200 random ones."""
    c, scoring, _ = shipped
    ev = NeuronEvaluator(smol, scoring.with_bos(c.task["bos"], smol.tokenizer))
    d = smol.adapter.d_mlp
    ranks = torch.tensor([c.extra["neuron_rank"][f"m{l}"] for l in range(smol.adapter.n_layers)]).flatten()
    top = torch.argsort(ranks)[:200]
    g = torch.Generator().manual_seed(0)
    rand = torch.randperm(len(ranks), generator=g)[:200]

    def without(drop):
        keep = torch.ones(len(ranks), dtype=torch.bool)
        keep[drop] = False
        return ev.metric(ev.masks(keep.view(-1, d)))

    assert ev.full - without(top) > 2 * abs(ev.full - without(rand))
