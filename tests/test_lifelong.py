"""Lifelong (sequential) editing runs on a tiny random model: checkpoint schedule, kill-and-resume
bit-exactness, refusing to resume another run, refused edits, collapse flags and the study file."""
import json
from pathlib import Path

import pytest
import torch

from conftest import _tiny
from knowedit.editing import keys_values
from knowedit.editing.errors import EditRefused
from knowedit.errors import KnoweditError
from knowedit.evaluation import lifelong
from knowedit.evaluation.lifelong import TIMING, collapse_reasons, run_lifelong
from knowedit.evaluation.lifelong_checkpoint import checkpoint_path, read_rows
from knowedit.evaluation.lifelong_suite import load_lifelong, parse_lifelong
from knowedit.report.lifelong import write_lifelong_report

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["Danielle Darrieux", "Jean Gabin", "Edith Piaf", "Michel Rocard", "Alain Delon", "Serge Gainsbourg"]
RECORDS = [{"case_id": i, "prompt": f"The mother tongue of {s} is", "subject": s, "target_new": "English",
            "ground_truth": "French", "rephrase_prompt": f"{s} spoke the language",
            "locality_prompt": "Jacques Chirac is a native speaker of", "locality_ground_truth": "French"}
           for i, s in enumerate(SUBJECTS)]
# ROME with identity covariance and few steps: a cheap real editor (nothing here is ROME-specific)
FAST = {"layers": [1], "mom2_dataset": "identity", "context_template_length_params": [[3, 2]],
        "v_num_grad_steps": 3, "max_update_ratio": 1e3}


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the runner may swallow it."""


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(RECORDS))
    return p


def study(data, **kw):
    d = {"study": "lifelong", "name": "t", "seed": 0, "dataset": {"name": "counterfact", "path": str(data), "n": 6},
         "editors": [{"name": "rome", "hparams": FAST}], "batch": 2, "checkpoint_every": 2, "tasks": ["ioi"],
         "task_n": 4, "generation": {"tokens": 4, "prompts": 1}, "eval_batch_size": 8}
    d.update(kw)
    return parse_lifelong(d)


def params(h):
    return {n: p.detach().clone() for n, p in h.model.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def snapshot(d: Path):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_checkpoints_fall_at_the_right_edit_counts_and_weights_come_back(tiny, data, tmp_path):
    w0 = params(tiny)
    out = tmp_path / "out"
    run_lifelong(study(data, checkpoint_every=4), out, handle=tiny, progress=False)
    rows = read_rows(out)
    assert [r["edits"] for r in rows] == [0, 4, 6] and [r["applied"] for r in rows] == [0, 4, 6]
    assert rows[0]["scope"].startswith("all requests") and rows[0]["ppl_ratio"] == 1.0
    assert all(k in rows[-1] for k in ("cf_es", "cf_ps", "cf_ns", "ee_locality_acc", "gen_entropy", "task_ioi",
                                       "task_ioi_delta", "collapse", "seconds", "edit_seconds"))
    assert rows[-1]["ppl_heldout"] != rows[0]["ppl_heldout"]     # the edits changed the model
    assert same(params(tiny), w0)                          # the original weights, bit-exactly
    ck = torch.load(checkpoint_path(out, "rome"), weights_only=True)
    assert ck["done"] and ck["edits"] == 6
    assert list(ck["weights"]) == [tiny.adapter.name_of(tiny.adapter.mlp_out(1).weight)]
    log = (out / "progress.log").read_text()
    assert "[rome] edits 4/6" in log and "ES" in log and "ioi" in log
    from knowedit.cli.main import main
    assert main(["report", str(out)]) == 0          # `knowedit report` knows a lifelong directory
    assert "<img" in (out / "report.html").read_text() and "Final checkpoint" in (out / "table.md").read_text()


def kill_and_resume(st, tok, tmp_path, monkeypatch, kill_at: int) -> tuple[Path, Path]:
    """An uninterrupted run and one killed at the ``kill_at``-th measured checkpoint, then resumed on a
    fresh model as a new process would; asserts identical rows (timings aside) and final weights."""
    ref = tmp_path / "ref"
    run_lifelong(st, ref, handle=_tiny("gpt2", tok), progress=False)
    calls = {"n": 0}
    real_measure = lifelong.Bench.measure

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        return real_measure(self, *a, **kw)

    monkeypatch.setattr(lifelong.Bench, "measure", dying)
    h = _tiny("gpt2", tok)
    w0 = params(h)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run_lifelong(st, out, handle=h, progress=False)
    assert same(params(h), w0)                                      # a kill leaves the model as loaded
    monkeypatch.setattr(lifelong.Bench, "measure", real_measure)
    keys_values._prefix_cache.clear()                               # as in a new process
    run_lifelong(st, out, handle=_tiny("gpt2", tok), progress=False)
    assert untimed(read_rows(out)) == untimed(read_rows(ref))
    for e in st.editors:
        a, b = (torch.load(checkpoint_path(d, e.label), weights_only=True) for d in (out, ref))
        assert same(a["weights"], b["weights"]) and a["done"] and b["done"]
    return ref, out


def test_killed_run_resumes_bit_identically(gpt2_tok, data, tmp_path, monkeypatch):
    real_apply = lifelong.apply_batch

    def with_state(handle, requests, method, hparams, seed, state):   # an editor that remembers its edits
        e = real_apply(handle, requests, method, hparams, seed, {})
        state["n"] = state.get("n", 0) + len(requests)
        state["norms"] = torch.cat([state.get("norms", torch.zeros(0)),
                                    torch.tensor([sum(e.norms().values())], dtype=torch.float64)])
        return e

    monkeypatch.setattr(lifelong, "apply_batch", with_state)
    st = study(data, editors=[{"name": "rome", "hparams": FAST}, {"name": "rome", "label": "rome-b1", "batch": 1,
                                                                 "hparams": FAST}])
    # killed at the 3rd checkpoint of the second editor, after its 2nd was saved
    ref, out = kill_and_resume(st, gpt2_tok, tmp_path, monkeypatch, kill_at=6)
    for label in ("rome", "rome-b1"):
        a, b = (torch.load(checkpoint_path(d, label), weights_only=True) for d in (out, ref))
        assert a["state"]["n"] == 6 and torch.equal(a["state"]["norms"], b["state"]["norms"])


def test_alphaedit_state_survives_a_restart(gpt2_tok, data, tmp_path, monkeypatch):
    pytest.importorskip("knowedit.editing.alphaedit")
    # identity covariance: every eigenvalue is 1, so a threshold above 1 keeps the whole key space
    hp = {**{k: v for k, v in FAST.items() if k != "max_update_ratio"}, "nullspace_threshold": 2.0}
    st = study(data, editors=[{"name": "alphaedit", "hparams": hp}], tasks=[])
    ref, out = kill_and_resume(st, gpt2_tok, tmp_path, monkeypatch, kill_at=2)
    a, b = (torch.load(checkpoint_path(d, "alphaedit"), weights_only=True)["state"] for d in (out, ref))
    assert a["alphaedit_edits"] == 6 and a.keys() == b.keys()
    prior = "alphaedit_prior_keys"
    assert all(torch.equal(a[prior][k], b[prior][k]) for k in a[prior])


def test_another_run_in_the_directory_is_refused_and_left_untouched(tiny_gpt2, tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    st = study(data, dataset={"name": "counterfact", "path": str(data), "n": 2})
    run_lifelong(st, out, handle=tiny_gpt2, progress=False)
    before = snapshot(out)
    with pytest.raises(KnoweditError, match=r"seed: 0 in the run there, 1 now.*another --out"):
        run_lifelong(study(data, seed=1, dataset=st.dataset), out, handle=tiny_gpt2, progress=False)
    with pytest.raises(KnoweditError, match="model_fingerprint"):
        run_lifelong(st, out, handle=tiny_llama, progress=False)
    with pytest.raises(KnoweditError, match="dataset.n: 2 in the run there, 1 now"):
        run_lifelong(st, out, handle=tiny_gpt2, limit=1, progress=False)
    assert snapshot(out) == before
    run_lifelong(st, out, handle=tiny_gpt2, progress=False)       # the same run: nothing left to do
    assert snapshot(out) == before


def test_refused_edits_are_recorded_and_the_run_goes_on(tiny_llama, data, tmp_path, monkeypatch):
    real_apply = lifelong.apply_batch

    def picky(handle, requests, *a):
        if any(r.case_id == 2 for r in requests):
            raise EditRefused("the update would be too large (stand-in)")
        return real_apply(handle, requests, *a)

    monkeypatch.setattr(lifelong, "apply_batch", picky)
    w0 = params(tiny_llama)
    out = tmp_path / "out"
    run_lifelong(study(data), out, handle=tiny_llama, progress=False)
    rows = read_rows(out)
    assert [(r["edits"], r["applied"], r["refused"]) for r in rows] == [(0, 0, 0), (2, 2, 0), (4, 2, 2), (6, 4, 2)]
    assert rows[2]["refused_new"] == [{"at": 2, "cases": [2, 3], "error": "the update would be too large (stand-in)",
                                       "type": "EditRefused"}]
    assert rows[2]["cf_es_latest"] is None and rows[3]["refused_new"] == []
    assert same(params(tiny_llama), w0)
    assert "too large" in write_lifelong_report(out)["report.html"].read_text()


def test_requests_an_editor_refuses_inside_a_batch_are_counted_refused(tiny_llama, data, tmp_path, monkeypatch):
    """A batch editor may refuse some requests alone (e.g. keys inside a preserved span) and edit the rest;
    the run counts those as refused, not applied."""
    real_apply = lifelong.apply_batch

    def partial(handle, requests, *a):
        e = real_apply(handle, requests, *a)
        if requests[0].case_id == 2:
            e.info["refused"] = [{"position": 1, "case": "3", "reason": "key inside the preserved span (stand-in)"}]
        return e

    monkeypatch.setattr(lifelong, "apply_batch", partial)
    out = tmp_path / "out"
    run_lifelong(study(data), out, handle=tiny_llama, progress=False)
    rows = read_rows(out)
    assert [(r["edits"], r["applied"], r["refused"]) for r in rows] == [(0, 0, 0), (2, 2, 0), (4, 3, 1), (6, 5, 1)]
    assert rows[2]["refused_new"][0]["cases"] == [3] and "preserved span" in rows[2]["refused_new"][0]["error"]


def test_collapse_flags():
    rules = {"perplexity_ratio": 2.0, "entropy_min": 4.0}
    assert collapse_reasons(19.9, 10.0, 6.0, rules) == []
    assert collapse_reasons(20.0, 10.0, 6.0, rules) == ["perplexity"]
    assert collapse_reasons(float("nan"), 10.0, 6.0, rules) == ["perplexity"]
    assert collapse_reasons(float("inf"), 10.0, 3.9, rules) == ["perplexity", "entropy"]
    assert collapse_reasons(12.0, 10.0, None, rules) == []
    assert collapse_reasons(12.0, 10.0, 1.0, {**rules, "entropy_min": None}) == []


def test_report_finds_the_last_checkpoint_before_collapse():
    from knowedit.report.lifelong import curves, summary_rows

    def row(e, n, ppl, reasons=()):
        return {"editor": e, "edits": n, "cf_es": 1.0, "ppl_heldout": ppl, "gen_entropy": 5.0,
                "collapse": bool(reasons), "collapse_reasons": list(reasons)}
    rows = [row("a", 0, 10), row("a", 100, 12), row("a", 200, 25, ["perplexity"]), row("a", 300, 30, ["perplexity"]),
            row("b", 0, 10), row("b", 100, 11), row("b", 200, 11)]
    final, before = summary_rows(rows)
    assert list(final["edits"]) == [300, 200] and list(final["collapse"]) == ["perplexity", "no"]
    assert list(before["edits"]) == [100, 200] and list(before["collapse"]) == ["at 200 edits", "never"]
    assert curves(rows, {"suite": {"collapse": {"perplexity_ratio": 2.0, "entropy_min": 4.0}}})


@pytest.mark.parametrize("change,match", [
    ({"colour": 1}, "unknown field"), ({"batch": 0}, "batch: 0 must be an integer >= 1"),
    ({"checkpoint_every": 5}, "checkpoint_every 5 is not a multiple of editor 'rome'"),
    ({"editors": [{"name": "rome", "batch": 3}]}, "multiple of 3"),
    ({"editors": ["memit", "memit"]}, "distinct 'label'"),
    ({"editors": [{"name": "rome", "step": 1}]}, r"editors\[0\]"),
    ({"tasks": ["iot"]}, "tasks"), ({"collapse": {"perplexity_ratio": 1.0}}, "perplexity_ratio"),
    ({"collapse": {"entropy": 3}}, "collapse: unknown"), ({"study": "lifelong-x"}, "study"),
    ({"generation": {"tokens": 0}}, "generation.tokens")])
def test_bad_study_fields_are_named(data, change, match):
    with pytest.raises(KnoweditError, match=match):
        study(data, **change)


def test_shipped_study_files_parse():
    full = load_lifelong(ROOT / "evals" / "lifelong.yaml")
    assert full.n == 1000 and full.batch == full.checkpoint_every == 100
    assert {e.label: e.batch for e in full.editors} == {"alphaedit": 100, "memit": 100, "rome": 1}
    assert len(full.tasks) == 5 and full.collapse == {"perplexity_ratio": 2.0, "entropy_min": 4.0}
    quick = load_lifelong(ROOT / "evals" / "lifelong_quick.yaml")
    assert quick.n == 20 and [e.name for e in quick.editors] == ["memit"]
    from knowedit.cli.commands.eval import _is_study
    assert _is_study(ROOT / "evals" / "lifelong.yaml") == "lifelong"
    assert _is_study(ROOT / "evals" / "granularity.yaml") == "restricted-edits"
