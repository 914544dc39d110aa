"""Discovery on the real default model (IOI, small prompt sets to keep the suite fast)."""
import json
from pathlib import Path

import pytest

from knowedit.circuit import Circuit
from knowedit.cli.main import main
from knowedit.discovery import discover
from knowedit.discovery.evaluate import circuit_faithfulness
from knowedit.discovery.explain import explain
from knowedit.tasks import ioi_task

N = 16


SHIPPED = Path(__file__).resolve().parents[1] / "circuits" / "smollm2-135m" / "ioi.json"


@pytest.fixture(scope="module")
def ioi_circuit(smol):
    # A fixed top-k keeps the test fast; the shipped circuit below went through the target search.
    return discover(smol, ioi_task(smol.tokenizer, n=N, seed=0), method="eap", top_k=40, prune=False)


def test_ioi_circuit_of_40_heads_carries_most_of_the_behaviour(ioi_circuit):
    c = ioi_circuit
    assert c.faithfulness > 0.5
    assert c.extra["n_heads"] == 40 and c.extra["n_mlps"] == 30
    assert c.method["ablation"] == "mean" and c.task["seed"] == 0 and c.task["n"] == N


def test_shipped_ioi_circuit_meets_its_claims(smol):
    c = Circuit.load(SHIPPED, smol)
    assert c.extra["n_heads"] <= 40 and c.faithfulness >= c.method["target_faithfulness"]
    task = ioi_task(smol.tokenizer, n=c.task["n"], seed=c.task["seed"], corruption=c.task["corruption"])
    assert circuit_faithfulness(smol, c, task) == pytest.approx(c.faithfulness, abs=1e-4)


def test_claimed_faithfulness_survives_independent_reevaluation(smol, ioi_circuit, tmp_path):
    path = ioi_circuit.save(tmp_path / "ioi.json")
    loaded = Circuit.load(path, smol)
    again = circuit_faithfulness(smol, loaded, ioi_task(smol.tokenizer, n=N, seed=0))
    assert again == pytest.approx(loaded.faithfulness, abs=1e-4)
    # On fresh prompts the circuit still carries most of the behaviour.
    assert circuit_faithfulness(smol, loaded, ioi_task(smol.tokenizer, n=N, seed=1)) > 0.5


def test_same_seed_gives_identical_json(smol):
    run = lambda: discover(smol, ioi_task(smol.tokenizer, n=8, seed=3), method="eap", top_k=8, prune=False).to_json()
    first = run()
    assert run() == first
    assert '"seed": 3' in first


def test_explain_direct_attributions_add_up_to_the_logit_difference(smol):
    prompt = "When Mary and John went to the store, John gave a drink to"
    df = explain(smol, prompt, " Mary", " John", corrupt="When Mary and John went to the store, Lisa gave a drink to")
    assert df.attrs["logit_diff"] > 0
    assert df.attrs["dla_total"] == pytest.approx(df.attrs["logit_diff"], rel=1e-3, abs=1e-3)
    assert {"component", "dla", "attribution"} <= set(df.columns) and len(df) >= 10


def test_cli_discover_writes_a_loadable_circuit(smol, tmp_path, capsys):
    out = tmp_path / "c.json"
    rc = main(["discover", "--task", "ioi", "--n", "8", "--top-k", "6", "--no-prune", "--out", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["method"]["name"] == "eap" and d["task"]["name"] == "ioi" and d["extra"]["n_heads"] == 6
    assert "faithfulness" in capsys.readouterr().out
    assert main(["discover", "--task", "nope", "--out", str(tmp_path / "x.json")]) == 2


def test_every_shipped_circuit_loads_on_the_default_model_and_meets_its_target(smol):
    from knowedit.tasks import get_task
    files = sorted(SHIPPED.parent.glob("*.json"))
    names = {p.stem for p in files}
    assert {"ioi", "colored-objects", "seq-numerals", "seq-numwords", "seq-months", "facts"} <= names
    for p in files:
        c = Circuit.load(p, smol)  # refuses a circuit of another model
        if c.faithfulness is None:  # hand-made editing masks
            continue
        assert c.faithfulness >= c.method["target_faithfulness"], p.name
        if c.method.get("level") == "neuron":   # every head kept; the neurons are the circuit
            assert c.extra["n_neurons"] == c.n_neurons() > 0, p.name
        else:
            assert c.extra["n_heads"] == len(c.heads()), p.name
    # the cheapest one is re-measured: same task, same prompts, same faithfulness
    facts = Circuit.load(SHIPPED.parent / "facts.json", smol)
    task = get_task("facts", smol.tokenizer, n=facts.task["n"], seed=facts.task["seed"])
    assert circuit_faithfulness(smol, facts, task) == pytest.approx(facts.faithfulness, abs=1e-4)
