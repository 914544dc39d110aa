"""Latent-level circuits, latent descriptions and latents in ``explain`` on tiny random models."""
import contextlib
import io

import pytest
import torch

from knowedit import KnoweditError
from knowedit.circuit import Circuit
from knowedit.discovery import circuit_faithfulness, explain
from knowedit.discovery.latent_circuit import LatentEvaluator, discover_latents, latent_scores
from knowedit.hooks import hook_count
from knowedit.sae import detach, load_sae
from knowedit.sae.describe import describe, logit_effects, top_contexts
from knowedit.sae.site import Site, sparsify_hookpoint
from knowedit.tasks.base import per_prompt_scores
from knowedit.tasks.ioi import ioi_task

with contextlib.redirect_stdout(io.StringIO()):
    from sparsify import SparseCoder, SparseCoderConfig


@pytest.fixture
def with_sae(tiny, tmp_path):
    torch.manual_seed(0)
    sc = SparseCoder(tiny.adapter.d_model, SparseCoderConfig(k=16, expansion_factor=4))
    with torch.no_grad():
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.1)
    sc.save_to_disk(tmp_path / sparsify_hookpoint(tiny, Site("r", 1)))
    sae = load_sae(tmp_path, tiny)
    yield tiny, sae
    detach(tiny)


def test_latent_eap_tracks_exact_ablation_and_circuits_hold_latents(with_sae, gpt2_tok, tmp_path):
    h, sae = with_sae
    task = ioi_task(gpt2_tok, n=8, seed=0)
    ev = LatentEvaluator(h, task, "r1")
    assert ev.faithfulness(ev.nodes) == pytest.approx(1.0)
    assert ev.faithfulness([]) == pytest.approx(0.0)
    scores = latent_scores(ev)
    # EAP on latents = (reference - latent) times the stream's gradient through the decoder, normalised
    total = torch.zeros(sae.width, dtype=torch.float64)
    for k, (_, b, a, d) in enumerate(ev.batches):
        got = {}

        def keep(m, args, o):
            o.retain_grad()
            got["x"] = o
        hk = h.adapter.block(1).register_forward_hook(keep)
        try:
            metric = per_prompt_scores(h.last_logits(b).float(), a, d, task.metric).sum()
            metric.backward()
        finally:
            hk.remove()
        h.model.zero_grad()
        acts = sae.encode(got["x"].detach())
        acts[:, 0] = 0   # a spliced SAE reads no latents at the first position
        total += ((ev._refs[k] - acts) * (got["x"].grad @ sae.W_dec.T)).sum((0, 1)).double()
    want = -(total / len(task)) / ev.gap()
    got_scores = torch.tensor([scores[n] for n in ev.nodes], dtype=torch.float64)
    torch.testing.assert_close(got_scores, want, atol=1e-4 * float(want.abs().max()), rtol=1e-3)
    c = discover_latents(h, task, "r1", target=0.7, max_latents=50)
    assert 0 < len(c.nodes) <= 50 and c.faithfulness >= 0.7
    assert all(h.component(n).is_latent for n in c.nodes)
    assert c.method["level"] == "latent" and c.method["site"] == "r1"
    assert ev.faithfulness(list(c.nodes)) == pytest.approx(c.faithfulness)
    assert set(c.extra["writers"]) == set(c.nodes)
    assert all(w[0].startswith("a") for ws in c.extra["writers"].values() for w in ws)
    c.save(tmp_path / "latents.json")
    again = Circuit.load(tmp_path / "latents.json")
    assert again.nodes.keys() == c.nodes.keys()
    assert circuit_faithfulness(h, again, task) == pytest.approx(c.faithfulness)
    assert hook_count(h.model) == 0


def test_descriptions_contexts_and_logit_effects(with_sae, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))
    h, sae = with_sae
    ids = [h.tokenizer(t, add_special_tokens=False)["input_ids"] for t in
           ["When Mary and John went to the store, John gave a drink to Mary",
            "The capital of France is Paris and the capital of Italy is Rome"] * 3]
    table = top_contexts(h, sae, ids, top=4)
    again = top_contexts(h, sae, ids, top=4)   # from the cache
    assert torch.equal(table.values, again.values)
    assert len(list((tmp_path / "cache" / "sae_contexts").rglob("*.pt"))) == 1
    best = torch.zeros(sae.width)
    for row in ids:   # every latent's largest activation over the corpus, the first positions left out
        x = {}
        hk = h.adapter.block(1).register_forward_hook(lambda m, a, o: x.__setitem__("x", o))
        with torch.no_grad():
            h.model(input_ids=torch.tensor([row]))
        hk.remove()
        best = torch.maximum(best, sae.encode(x["x"])[0, 1:].max(0).values)
    torch.testing.assert_close(table.values[0], best, atol=1e-5, rtol=1e-5)
    i = int(best.argmax())
    up, down = logit_effects(h, sae, i, top=3)
    assert len(up) == 3 and up[0][1] >= up[-1][1] and down[0][1] <= down[-1][1]
    line = describe(h, sae, i, table)
    assert line.startswith("fires on") and "promotes" in line and "suppresses" in line
    with pytest.raises(KnoweditError, match="past this SAE's width"):
        logit_effects(h, sae, sae.width)


def test_explain_lists_latents_beside_heads(with_sae, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))
    h, sae = with_sae
    prompt = "When Mary and John went to the store, John gave a drink to"
    df = explain(h, prompt, " Mary", " John", top=5, corpus=[h.tokenizer(prompt)["input_ids"]])
    lat = df[df.kind == "latent"]
    assert 0 < len(lat) <= 5 and all(c.startswith("r1.f") for c in lat.component)
    assert (df.kind == "component").any()
    assert all(isinstance(d, str) and "promotes" in d for d in lat.description)
    comps = df[df.kind == "component"]
    assert df.attrs["dla_total"] == pytest.approx(df.attrs["logit_diff"], abs=1e-3)
    assert len(comps) >= 5 and hook_count(h.model) == 0
    # the attribution of a latent is the zero-ablation estimate: compare with the exact effect of the top one
    top = lat.iloc[lat.attribution.abs().argmax()]
    from knowedit.sae import ablate_latents
    b = h.tokenize([prompt])
    with torch.no_grad():
        base = h.last_logits(b)[0]
        with ablate_latents(h, [top.component]):
            abl = h.last_logits(b)[0]
    ans, dis = h.token_id(" Mary"), h.token_id(" John")
    exact = float((abl[ans] - abl[dis]) - (base[ans] - base[dis]))
    assert top.attribution == pytest.approx(exact, rel=0.5, abs=0.02)
