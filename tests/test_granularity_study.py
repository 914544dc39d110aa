"""The restricted-edits study (evals/granularity.yaml): its suite file, neuron sets and summary."""
import json
import random
from pathlib import Path

import pytest
import torch

from knowedit.circuit import Circuit
from knowedit.errors import KnoweditError
from knowedit.evaluation.granularity import load_study, neuron_sets, summarise, template_relations

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_study_file_parses():
    st = load_study(ROOT / "evals" / "granularity.yaml")
    assert st.editor == "rome" and 0.1 in st.shares and set(st.selections) == {"top", "random", "bottom"}


@pytest.mark.parametrize("change,match", [({"shares": [0.0]}, "shares"), ({"selections": ["best"]}, "selections"),
                                          ({"editor": "ft-l"}, "editor"), ({"colour": 1}, "unknown field")])
def test_bad_study_fields_are_named(tmp_path, change, match):
    d = {"study": "restricted-edits", "name": "x", "circuits": {"P17": "c.json"},
         "dataset": {"path": "cf.json", "known_facts": "k.json"}, **change}
    p = tmp_path / "s.yaml"
    p.write_text(json.dumps(d))
    with pytest.raises(KnoweditError, match=match):
        load_study(p)


def test_neuron_sets_follow_the_circuit_ranking(tiny):
    d = tiny.adapter.d_mlp
    scores = {f"m{l}": [float(i % 7) - 3 for i in range(d)] for l in range(tiny.adapter.n_layers)}
    c = Circuit.from_components(tiny, ["m1.n0"], extra={"neuron_scores": scores})
    top = neuron_sets(c, 1, 0.1, "top", d, random.Random(0))
    bottom = neuron_sets(c, 1, 0.1, "bottom", d, random.Random(0))
    rand = neuron_sets(c, 1, 0.1, "random", d, random.Random(0))
    k = round(0.1 * d)
    assert len(top) == len(bottom) == len(rand) == k
    s = torch.tensor(scores["m1"]).abs()
    assert s[top].min() >= s[bottom].max() and not set(top.tolist()) & set(bottom.tolist())
    assert torch.equal(neuron_sets(c, 1, 1.0, "top", d, random.Random(0)), torch.arange(d))


def test_summary_averages_records_and_counts_refusals(tmp_path):
    lines = [{"case": "1", "results": [{"share": 0.1, "selection": "top", "n_neurons": 5, "es": 1.0, "ps": 0.5,
                                         "ns": 1.0, "dw_norm": 2.0},
                                        {"share": 1.0, "selection": "all", "n_neurons": 50, "es": 1.0, "ps": 1.0,
                                         "ns": 0.5, "dw_norm": 1.0}]},
             {"case": "2", "results": [{"share": 0.1, "selection": "top", "n_neurons": 5, "es": 0.0, "ps": 0.0,
                                         "ns": None, "refused": "too small"},
                                        {"share": 1.0, "selection": "all", "n_neurons": 50, "es": 1.0, "ps": 0.0,
                                         "ns": 1.0, "dw_norm": 3.0}]}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = {(r["share"], r["selection"]): r for r in summarise(tmp_path)}
    assert rows[(0.1, "top")]["es"] == 0.5 and rows[(0.1, "top")]["refused"] == 1
    assert rows[(0.1, "top")]["ns"] == 1.0 and rows[(1.0, "all")]["dw_norm"] == 2.0


def test_template_relations_keep_only_unambiguous_templates(tmp_path):
    p = tmp_path / "known.json"
    p.write_text(json.dumps([{"template": "{} is in", "relation_id": "P17"}, {"template": "{} is in", "relation_id": "P30"},
                             {"template": "The capital of {} is", "relation_id": "P36"}]))
    assert template_relations(p) == {"The capital of {} is": "P36"}
