"""Causal tracing (ROME §2) on tiny GPT-2 and Llama layouts and on the default model, and
``layers: auto`` for ROME and MEMIT."""
import json

import numpy as np
import pytest
import torch

from knowedit.discovery import causal_trace as ct
from knowedit.discovery.trace_requests import read_trace_requests
from knowedit.discovery.trace_summary import BUCKETS, aggregate, bucket_positions
from knowedit.editing import make_request
from knowedit.errors import KnoweditError
from knowedit.hooks import hook_count

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


def test_restoring_every_token_of_the_last_hidden_state_gives_the_clean_probability(tiny):
    ctx = ct.prepare(tiny, PROMPT, SUBJECT, "Paris", seeds=3)
    L, T = tiny.adapter.n_layers, ctx.input_ids.shape[1]
    # the noise moves p by far more than the tolerance below (a random tiny model's p is near uniform)
    assert float((ctx.p_corrupt / ctx.p_clean - 1).abs().min()) > 1e-4
    assert float((ctx.corrupt_resid[:, -1, -1] - ctx.clean["hidden"][-1, -1]).abs().max()) > 1e-3
    everything = tuple(("hidden", L - 1, t) for t in range(T))
    last_only = (("hidden", L - 1, T - 1),)   # the prediction reads only the last position's final state
    for fast in (True, False):
        p = ct.restored_probs(ctx, [everything, last_only], fast=fast)
        torch.testing.assert_close(p, torch.full_like(p, ctx.p_clean), rtol=1e-5, atol=0)
    r = ct.trace(tiny, PROMPT, SUBJECT, "Paris", kinds=("hidden",), seeds=3)
    assert r.effects["hidden"][T - 1, L - 1] == pytest.approx(r.p_clean - r.p_corrupt, rel=1e-3, abs=1e-9)
    assert hook_count(tiny.model) == 0
    assert not any("forward" in vars(tiny.adapter.block(l)) for l in range(L))   # skipped blocks restored


def test_batched_trace_equals_one_restoration_at_a_time(tiny):
    """The fast path (batches that start at their first restored layer and token, on cached
    corrupted states) against the plain method, one full forward per restoration. Compared as
    probabilities: a random tiny model's effects are tiny differences of near-uniform p."""
    ctx = ct.prepare(tiny, PROMPT, SUBJECT, seeds=2)
    a, b = ctx.subject_range
    T, L = ctx.input_ids.shape[1], tiny.adapter.n_layers
    cells = [("hidden", a, 0), ("mlp", b - 1, 1), ("attn", b, 2), ("mlp_window", b - 1, 0), ("attn_window", 8, L - 1),
             ("hidden", T - 1, L - 1), ("mlp", T - 2, 2), ("attn", a + 1, 1)]
    rests = [[c for c in ct.grid(kind, [t], L, 2) if c[1] == layer][0][2] for kind, t, layer in cells]
    batched = ct.restored_probs(ctx, rests)
    for i, rest in enumerate(rests):
        one = ct.restored_probs(ctx, [rest], fast=False)[0]
        torch.testing.assert_close(batched[i], one, rtol=2e-6, atol=0, msg=str(cells[i]))
    assert float((batched / ctx.p_corrupt - 1).abs().max()) > 1e-4   # the restorations matter
    r = ct.trace(tiny, PROMPT, SUBJECT, seeds=2, window=2)
    for (kind, t, layer), p in zip(cells, batched.mean(1)):
        assert r.effects[kind][t, layer] + r.p_corrupt == pytest.approx(float(p), rel=2e-6)
    assert r.settings["forwards"] < len(ct.GRID_KINDS) * T * L   # batched, not one per cell


def test_result_shapes_tokens_and_json(tiny):
    r = ct.trace(tiny, "{} is located in the city of", SUBJECT, kinds=("hidden", "mlp_window"), seeds=2)
    T, L = len(r.tokens), tiny.adapter.n_layers
    assert set(r.effects) == {"hidden", "mlp_window"} and all(e.shape == (T, L) for e in r.effects.values())
    a, b = r.subject_range
    assert "".join(r.tokens[a:b]).strip() == SUBJECT
    assert r.p_corrupt == pytest.approx(np.mean(r.p_corrupt_seeds))
    assert np.all(r.effects["hidden"][:a] == 0)    # states before the subject are never corrupted
    if tiny.uses_bos():
        assert a == 1 and r.tokens[0] == tiny.tokenizer.bos_token
    s = r.settings
    assert s["seeds"] == 2 and s["noise"] == 3.0 and s["window"] == 10 and s["noise_std"] == pytest.approx(
        ct.embedding_std(tiny))
    back = ct.TraceResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.tokens == r.tokens and back.subject_range == r.subject_range
    np.testing.assert_array_equal(back.effects["hidden"], r.effects["hidden"])
    only = ct.trace(tiny, PROMPT, SUBJECT, kinds="mlp", positions="last_subject", seeds=2)
    row = np.isfinite(only.effects["mlp"]).all(1)
    assert row.sum() == 1 and row[only.last_subject]


def test_same_seed_same_numbers_and_noise_scale(tiny_llama):
    a = ct.trace(tiny_llama, PROMPT, SUBJECT, kinds=("hidden",), seeds=2)
    b = ct.trace(tiny_llama, PROMPT, SUBJECT, kinds=("hidden",), seeds=2)
    np.testing.assert_array_equal(a.effects["hidden"], b.effects["hidden"])
    ctx = ct.prepare(tiny_llama, PROMPT, SUBJECT, seeds=4, noise=3.0, noise_std=0.5)
    assert float(ctx.noise.std()) == pytest.approx(1.5, rel=0.1)


def test_window_layers_are_centred_and_clipped():
    assert ct.window_layers(0, 10, 30) == list(range(0, 5))
    assert ct.window_layers(15, 10, 30) == list(range(10, 20))
    assert ct.window_layers(29, 10, 30) == list(range(24, 30))
    assert ct.window_layers(4, 3, 30) == [3, 4, 5]
    assert ct.window_layers(2, 1, 30) == [2]


def test_bad_input_is_an_error_that_names_the_field(tiny, tmp_path):
    with pytest.raises(KnoweditError, match="subject 'Louvre' does not occur"):
        ct.trace(tiny, PROMPT, "Louvre")
    with pytest.raises(KnoweditError, match="'subject' is empty"):
        ct.trace(tiny, PROMPT, " ")
    with pytest.raises(KnoweditError, match="answer is empty"):
        ct.trace(tiny, PROMPT, SUBJECT, " ")
    with pytest.raises(KnoweditError, match="seeds"):
        ct.trace(tiny, PROMPT, SUBJECT, seeds=0)
    with pytest.raises(KnoweditError, match="window"):
        ct.trace(tiny, PROMPT, SUBJECT, window=0)
    with pytest.raises(KnoweditError, match="kinds: 'hidden_window'"):
        ct.trace(tiny, PROMPT, SUBJECT, kinds=("hidden_window",))
    ctx = ct.prepare(tiny, PROMPT, SUBJECT, seeds=1)
    with pytest.raises(KnoweditError, match="not a state"):
        ct.restored_probs(ctx, [(("mlp", 99, 0),)])
    assert hook_count(tiny.model) == 0


def test_trace_requests_reader():
    rs = read_trace_requests([
        {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
         "case_id": 3},
        {"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica", "template": "{} is in",
         "prompt": "Vinson Massif is located in the continent of", "meta-llama/Llama-2-7b-chat-hf": True},
        {"requested_rewrite": {"prompt": "{} plays", "subject": "Jordan", "target_new": {"str": "golf"},
                               "target_true": {"str": "basketball"}}},
        {"prompt": "Paris is the capital of", "subject": "Paris"}])
    assert [r.answer for r in rs] == ["Paris", "Antarctica", "basketball", None]
    assert rs[0].text == "The capital of France is"
    with pytest.raises(KnoweditError, match="unknown field 'anwser'; did you mean 'answer'"):
        read_trace_requests([{"prompt": "{} is", "subject": "X", "anwser": "y"}])
    with pytest.raises(KnoweditError, match="record 1.*does not occur"):
        read_trace_requests([{"prompt": "{} is", "subject": "X"}, {"prompt": "Y is", "subject": "X"}])
    with pytest.raises(KnoweditError, match="'prompt'"):
        read_trace_requests([{"subject": "X"}])


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    from knowedit.cli.main import main

    out = tmp_path / "out"
    assert main(["trace", "--requests", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    f = tmp_path / "r.json"
    f.write_text(json.dumps([{"prompt": "The Eiffel Tower is in", "subject": "Louvre"}]))
    assert main(["trace", "--requests", str(f), "--out", str(out)]) == 2
    assert "subject 'Louvre' does not occur" in capsys.readouterr().err
    f.write_text(json.dumps([{"prompt": "{} is in", "subject": "X", "answr": "Paris"}]))
    assert main(["trace", "--requests", str(f), "--out", str(out)]) == 2
    assert "unknown field 'answr'" in capsys.readouterr().err
    assert main(["trace", "--requests", str(f), "--out", str(out), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not out.exists()


def test_buckets_follow_rome_figure():
    # "The Eiffel Tower is located in" with a BOS: subject tokens 2-4
    pos = bucket_positions((2, 5), 8)
    assert pos == {"first subject token": [2], "middle subject tokens": [3], "last subject token": [4],
                   "first subsequent token": [5], "further tokens": [6], "last token": [7]}
    one = bucket_positions((0, 1), 3)   # one-token subject, one token between it and the last
    assert one["first subject token"] == one["last subject token"] == [0] and one["further tokens"] == []
    r = ct.TraceResult("p", "s", " a", 1, list("abcdefgh"), (2, 5), 0.5, 0.1, [0.1],
                       {"mlp": np.arange(16, dtype=float).reshape(8, 2)})
    agg = aggregate([r, r])
    assert agg["kinds"]["mlp"].shape == (len(BUCKETS), 2) and agg["n"] == 2
    assert agg["peaks"]["mlp"] == {"bucket": "last token", "layer": 1, "effect": 15.0}


# ---- layers: auto --------------------------------------------------------------------------------

FAST = {"mom2_dataset": "identity", "context_template_length_params": [[3, 2]], "v_num_grad_steps": 3,
        "max_update_ratio": 1e3}
REQ = make_request("The capital of {} is", "France", "Rome", "Paris")


def test_layers_auto_records_the_traced_choice(tiny, monkeypatch):
    from knowedit.editing import auto_layers, edit
    from knowedit.editing.memit import apply_memit
    from knowedit.editing.rome import apply_rome

    calls = []
    real = ct.trace
    monkeypatch.setattr(ct, "trace", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(auto_layers, "_cache", {})
    L = tiny.adapter.n_layers
    e = apply_rome(tiny, [REQ], dict(FAST, layers="auto"))
    info = e.info["auto_layers"]
    prof = info["trace"]["mlp_window_last_subject"]
    assert len(prof) == L and info["trace"]["n_requests"] == 1 and info["trace"]["seeds"] == 5
    # the choice is the traced peak among the layers below the loss layer (the last one)
    assert info["layers"] == [e.info["layer"]] == [int(np.argmax(prof[:L - 1]))]
    e.undo()
    n = len(calls)
    e = edit(tiny, [REQ], "rome", hparams=dict(FAST, layers="auto", v_loss_layer=1))   # cached trace, loss layer 1
    assert len(calls) == n and e.info["layer"] == 0 and e.info["hparams"]["layers"] == "auto"
    e.undo()
    m = apply_memit(tiny, [REQ], dict(FAST, layers="auto", mom2_update_weight=1.0))
    assert m.info["layers"] == m.info["auto_layers"]["layers"] == [0, 1]   # min(5, loss layer 2) layers
    assert len(calls) == n
    m.undo()


def test_layers_auto_is_only_for_locate_then_edit_editors(tiny):
    from knowedit.editing import load_hparams

    assert load_hparams("memit", tiny, {"layers": "auto"})["layers"] == "auto"
    with pytest.raises(KnoweditError, match="rome, memit and alphaedit only"):
        load_hparams("ft-l", tiny, {"layers": "auto"})


# ---- the default model ------------------------------------------------------------------------------

LIBERTY = ("The Statue of Liberty is located in the city of", "Statue of Liberty")


@pytest.mark.slow
def test_smol_mlp_effect_peaks_at_the_last_subject_token(smol):
    """ROME's finding on a fact the model knows (p(' New') > 0.5; the subject's tokens ' Statue', ' of',
    ' Liberty'): restoring MLP outputs (windows of 10 layers) matters most at the subject's last token,
    compared with the subject's other tokens and the first token after it. Compared by each token's best
    layer, and summed over layers. Traced at those positions only, with 3 seeds, to keep the test short;
    the measured gap is large (best-layer effect about 0.6 at ' Liberty', below 0.01 elsewhere). Not
    every fact behaves so: for 'The Eiffel Tower' the effect sits at 'iffel', before ' Tower'."""
    prompt, subject = LIBERTY
    a, b = ct.prepare(smol, prompt, subject, seeds=1).subject_range
    r = ct.trace(smol, prompt, subject, "New York", kinds=("mlp_window",), positions=list(range(a, b + 1)), seeds=3)
    assert r.p_clean > 0.5 and r.p_corrupt < r.p_clean / 4
    e = r.effects["mlp_window"]
    rows = range(a, b + 1)
    best = {t: e[t].max() for t in rows}
    assert max(best, key=best.get) == b - 1, {r.tokens[t]: round(v, 4) for t, v in best.items()}
    assert max(rows, key=lambda t: e[t].sum()) == b - 1
    assert best[b - 1] > 0.1


@pytest.mark.slow
def test_smol_rome_with_layers_auto_edits_at_the_traced_layer(smol):
    from knowedit.editing import edit, tensor_hash

    before = {n: tensor_hash(p) for n, p in smol.model.named_parameters()}
    req = {"prompt": LIBERTY[0], "subject": LIBERTY[1], "target_new": "London", "ground_truth": "New York"}
    # C = I keeps the test from collecting covariance statistics at whichever layer the trace picks;
    # fewer prefixes and steps keep it short
    hp = {"layers": "auto", "mom2_dataset": "identity", "context_template_length_params": [[5, 2]],
          "v_num_grad_steps": 10}
    with edit(smol, [req], "rome", hparams=hp) as e:
        info = e.info["auto_layers"]
        assert e.info["layer"] == info["critical_layer"] == int(np.argmax(info["trace"]["mlp_window_last_subject"]))
        assert 0 < e.info["layer"] < 29 and max(info["trace"]["mlp_window_last_subject"]) > 0.1
        p = smol.next_token_probs([req["prompt"]])[0]
        assert smol.tokenizer.decode(p.argmax()) == " London"
    assert {n: tensor_hash(p) for n, p in smol.model.named_parameters()} == before


def test_report_and_trace_page_carry_the_heatmaps(tmp_path):
    from knowedit.report import build_report
    from knowedit.report.traces import write_trace_page

    from test_report_html import _write

    d = _write(tmp_path)
    eff = {k: np.linspace(0, 1, 4 * 3).reshape(4, 3) for k in ("hidden", "mlp_window", "attn_window", "mlp")}
    r = ct.TraceResult("The X is in", "X", " Y", 1, ["The", " X", " is", " in"], (1, 2), 0.6, 0.1, [0.1, 0.1], eff,
                       {"seeds": 2, "noise": 3.0, "window": 10, "noise_std": 0.1})
    (d / "traces").mkdir()
    for i in range(2):
        (d / "traces" / f"00{i}-X.json").write_text(json.dumps(r.to_dict()))
    (d / "traces" / "summary.json").write_text("{}")
    html = build_report(d)["report.html"].read_text()
    assert "Causal traces: average over 2 prompts" in html and html.count("Causal trace: The X is in") == 2
    page = write_trace_page([r], tmp_path / "page").read_text()
    assert page.count("data:image/png;base64,") == 1 and "layer 2 (0.4545)" in page
