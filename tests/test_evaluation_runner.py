import json

import pytest

from knowedit.circuit import Circuit
from knowedit.errors import KnoweditError
from knowedit.evaluation.editors import register_editor, unregister_editor
from knowedit.evaluation.results import ResultStore
from knowedit.evaluation.runner import run_suite
from knowedit.evaluation.suite import load_suite, parse_suite

from _evaluation_standin import nudge

RECORDS = [
    {"case_id": i, "prompt": f"The mother tongue of {s} is", "subject": s, "target_new": "English",
     "ground_truth": "French", "rephrase_prompt": f"{s} spoke the language",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
    for i, s in enumerate(["Danielle Darrieux", "Jean Gabin", "Edith Piaf"])
]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the runner may swallow it."""


@pytest.fixture
def setup(tmp_path, tiny_gpt2):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    circ = tmp_path / "c.json"
    Circuit.from_components(tiny_gpt2, ["a1.h0", "m1"], task={"name": "facts"}).save(circ)
    register_editor("nudge", nudge)
    yield tiny_gpt2, data, circ
    unregister_editor("nudge")
    unregister_editor("dying")


def _suite(data, circ, **kw):
    d = {"name": "t", "editors": ["nudge"], "circuit": str(circ) if circ else None, "conditions": ["none", "circuit", "complement"],
         "dataset": {"name": "counterfact", "path": str(data), "n": 3}, "metrics": ["counterfact", "easyedit", "norms"]}
    d.update(kw)
    return parse_suite(d)


def _keys(path):
    return [json.loads(line)["key"] for line in open(path)]


def test_killed_run_resumes_without_loss_or_duplicates(setup, tmp_path):
    h, data, circ = setup
    fp = h.current_fingerprint()
    calls = {"n": 0}

    def dying(handle, requests, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return nudge(handle, requests, **kw)

    register_editor("dying", dying)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run_suite(_suite(data, circ, editors=["dying"]), out, handle=h, progress=False)
    assert len(_keys(out / "results.jsonl")) == 4 and h.current_fingerprint() == fp
    # a kill in the middle of a write leaves half a line
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "2|dying|none", "metr')
    run_suite(_suite(data, circ, editors=["dying"]), out, handle=h, progress=False)
    keys = _keys(out / "results.jsonl")
    assert len(keys) == len(set(keys)) == 9
    assert set(keys) == {f"{c}|dying|{k}" for c in range(3) for k in ("none", "circuit", "complement")}
    # one uninterrupted run gives the same numbers
    ref = tmp_path / "ref"
    register_editor("dying", nudge)
    run_suite(_suite(data, circ, editors=["dying"]), ref, handle=h, progress=False)
    a = {r["key"]: r["metrics"] for r in ResultStore(out).load()}
    b = {r["key"]: r["metrics"] for r in ResultStore(ref).load()}
    assert a == b
    rec = ResultStore(out).load()[0]
    assert rec["metrics"]["cf_p_new"] > rec["before"]["cf_p_new"]  # the stand-in edit did something
    assert rec["norms"] and rec["metrics"]["edit_norm_total"] == pytest.approx(5.0, rel=1e-4)
    assert h.current_fingerprint() == fp


def test_finished_run_does_nothing_and_other_model_is_refused(setup, tmp_path, tiny_llama):
    h, data, circ = setup
    s = _suite(data, None, conditions=["none"])
    out = tmp_path / "o"
    run_suite(s, out, handle=h, progress=False)
    before = (out / "results.jsonl").read_bytes()
    run_suite(s, out, handle=h, progress=False)
    assert (out / "results.jsonl").read_bytes() == before
    with pytest.raises(KnoweditError, match="different run"):
        run_suite(s, out, handle=tiny_llama, progress=False)


def test_suite_errors_name_the_field(tmp_path):
    with pytest.raises(KnoweditError, match="unknown field"):
        parse_suite({"editors": ["rome"], "colour": 1})
    with pytest.raises(KnoweditError, match="circuit"):
        parse_suite({"editors": ["rome"], "conditions": ["circuit"]})
    with pytest.raises(KnoweditError, match="editors"):
        parse_suite({"editors": []})
    with pytest.raises(KnoweditError, match="tasks"):
        parse_suite({"editors": ["rome"], "metrics": ["collateral"]})


def test_shipped_suites_parse():
    from pathlib import Path
    import yaml

    from knowedit.cli.commands.eval import _study
    root = Path(__file__).resolve().parents[1] / "evals"
    names = set()
    for p in root.glob("*.yaml"):
        study = yaml.safe_load(p.read_text()).get("study")
        names.add((_study(study)[0](p) if study else load_suite(p)).name)
    assert {"editors_x_masks", "collateral", "granularity", "lifelong", "lifelong_quick"} <= names
