"""Discovery on the real default model (IOI, small prompt sets to keep the suite fast)."""
import json

import pytest

from knowedit.circuit import Circuit
from knowedit.cli.main import main
from knowedit.discovery import discover
from knowedit.discovery.evaluate import circuit_faithfulness
from knowedit.discovery.explain import explain
from knowedit.tasks import ioi_task

N = 16


@pytest.fixture(scope="module")
def ioi_circuit(smol):
    return discover(smol, ioi_task(smol.tokenizer, n=N, seed=0), method="eap", target=0.8)


def test_ioi_circuit_is_small_and_faithful(ioi_circuit):
    c = ioi_circuit
    assert c.faithfulness >= 0.8
    assert 1 <= c.extra["n_heads"] <= 40  # <= 15% of the 270 heads
    assert c.method["ablation"] == "mean" and c.task["seed"] == 0 and c.task["n"] == N


def test_claimed_faithfulness_survives_independent_reevaluation(smol, ioi_circuit, tmp_path):
    path = ioi_circuit.save(tmp_path / "ioi.json")
    loaded = Circuit.load(path, smol)
    again = circuit_faithfulness(smol, loaded, ioi_task(smol.tokenizer, n=N, seed=0))
    assert again == pytest.approx(loaded.faithfulness, abs=1e-4)
    # On fresh prompts the circuit still carries most of the behaviour.
    assert circuit_faithfulness(smol, loaded, ioi_task(smol.tokenizer, n=N, seed=1)) > 0.5


def test_same_seed_gives_identical_json(smol, ioi_circuit):
    again = discover(smol, ioi_task(smol.tokenizer, n=N, seed=0), method="eap", target=0.8)
    assert again.to_json() == ioi_circuit.to_json()


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
