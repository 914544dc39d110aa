"""Training an SAE through sparsify and measuring it, on tiny random models (a few hundred tokens)."""
import json

import pytest
import torch

from knowedit import KnoweditError
from knowedit.sae import SAE, detach, load_sae
from knowedit.sae.metrics import evaluate
from knowedit.sae.site import Site
from knowedit.sae.train import _distinct_rows, pack, read_activations, train_sae


def _ids(n, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2000, (length,), generator=g).tolist() for _ in range(n)]


def test_pack_joins_with_eos_and_drops_the_tail():
    assert pack([[1, 2, 3], [4, 5]], 3, eos=0) == [[1, 2, 3], [0, 4, 5]]
    assert pack([[1, 2, 3], [4, 5]], 4, eos=None) == [[1, 2, 3, 4]]


def test_a_lossless_sae_measures_as_lossless(tiny):
    d = tiny.adapter.d_model
    eye = torch.eye(d)   # relu(x) and relu(-x) as latents: decodes back to x exactly
    sae = SAE(W_enc=torch.cat([eye, -eye], 1), b_enc=torch.zeros(2 * d), W_dec=torch.cat([eye, -eye], 0),
              b_dec=torch.zeros(d), hookpoint="layers.1", site=Site("r", 1))
    m = evaluate(tiny, sae, _ids(3, 20))
    assert m["fve"] == pytest.approx(1.0, abs=1e-6)
    assert abs(m["ce_increase"]) < 1e-4
    assert m["n_tokens"] == 57 and 0 < m["l0"] <= 2 * d   # each sequence's first position left out


@pytest.mark.parametrize("kind,site", [("sae", "r1"), ("transcoder", "m1")])
def test_train_through_sparsify_and_evaluate(tiny, kind, site):
    before = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    precision = torch.get_float32_matmul_precision()
    ids = _ids(12)
    sae, info = train_sae(tiny, site, ids[:10], kind=kind, k=4, expansion=2, tokens=640, ctx_len=32, batch_size=4,
                          quiet=True)
    assert sae.kind == kind and sae.site == Site.parse(site) and sae.width == 2 * tiny.adapter.d_model
    assert info["tokens"] == 640 and info["activations"] == "cache" and info["read_forwards"] == 1
    m = evaluate(tiny, sae, ids[10:])
    assert m["l0"] <= 4 and 0 <= m["dead_share"] <= 1 and m["n_tokens"] == 78
    # sparsify's trainer froze the model and changed the matmul precision; both are back
    assert {n: p.requires_grad for n, p in tiny.model.named_parameters()} == before
    assert torch.get_float32_matmul_precision() == precision
    assert len(tiny.adapter.layers) == tiny.adapter.n_layers
    again, _ = train_sae(tiny, site, ids[:10], kind=kind, k=4, expansion=2, tokens=640, ctx_len=32, batch_size=4,
                         quiet=True)
    assert torch.equal(again.W_dec, sae.W_dec), "the same seed gives the same SAE"


def test_train_rejects_bad_settings(tiny):
    with pytest.raises(KnoweditError, match="transcoder"):
        train_sae(tiny, "r1", _ids(4), kind="transcoder")
    with pytest.raises(KnoweditError, match="less than one"):
        train_sae(tiny, "r1", [[1, 2]], ctx_len=32)
    with pytest.raises(KnoweditError, match="k: 1000"):
        train_sae(tiny, "r1", _ids(4), k=1000, expansion=2)


def test_cli_train_writes_a_sparsify_sae_with_its_card(tiny_gpt2, tmp_path, monkeypatch):
    from knowedit.cli.main import main

    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))

    model_dir = tmp_path / "model"
    tiny_gpt2.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog number {i}, then "
                                f"the dog sleeps and the fox runs away to the forest near the river."
                                for i in range(40)))
    out = tmp_path / "sae"
    rc = main(["sae", "train", "--model", str(model_dir), "--hookpoint", "layers.1", "--text", str(text),
               "--k", "4", "--expansion", "2", "--tokens", "600", "--ctx-len", "32", "--batch-size", "4",
               "--heldout", "0.1", "--out", str(out)])
    assert rc in (0, None)
    d = out / "h.1"   # GPT-2's blocks are 'h.L' to sparsify
    card = json.loads((d / "card.json").read_text())
    assert card["site"] == "r1" and card["corpus"]["source"] == "files" and card["training"]["tokens"] == 600
    assert card["status"] == "complete" and not (d / "train_state.pt").exists()
    for m in ("metrics", "metrics_heldout_corpus", "metrics_train_corpus"):
        assert {"fve", "l0", "dead_share", "ce_increase"} <= set(card[m])
    assert card["metrics_text"]["source"] == "builtin" and card["metrics_text"]["texts"]["ioi"] == 50
    assert card["fingerprint"] == tiny_gpt2.fingerprint
    from knowedit.models import load_model
    h = load_model(str(model_dir))
    sae = load_sae(out, h)
    assert sae.site == Site("r", 1) and sae.source["card"]["hookpoint"] == "h.1"
    detach(h)
    assert main(["sae", "train", "--model", str(model_dir), "--hookpoint", "layers.1", "--kind", "transcoder",
                 "--out", str(out)]) == 2
    assert main(["sae", "eval", "--model", str(model_dir), "--sae", str(out), "--text", str(text)]) in (0, None)
    assert main(["sae", "eval", "--model", str(model_dir), "--sae", str(out)]) in (0, None)   # the card's built-in text
    assert main(["sae", "eval", "--model", str(model_dir), "--sae", str(out), "--text", str(tmp_path / "no.txt")]) == 2
    circ = tmp_path / "ioi-latents.json"
    assert main(["sae", "circuit", "--model", str(model_dir), "--sae", str(out), "--task", "ioi", "--n", "8",
                 "--contexts", "0", "--out", str(circ)]) in (0, None)
    doc = json.loads(circ.read_text())
    assert doc["method"]["level"] == "latent" and all(n.startswith("r1.f") for n in doc["nodes"])
    assert set(doc["extra"]["descriptions"]) == set(doc["nodes"])
    assert main(["sae", "describe", "--model", str(model_dir), "--sae", str(out), "--latents", "r1.f0", "r1.f3",
                 "--text", str(text)]) in (0, None)
    assert main(["sae", "describe", "--model", str(model_dir), "--sae", str(out), "--latents", "r1.f999"]) == 2


def _sae_tensors(sae):
    return [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]


@pytest.mark.parametrize("kind,site", [("sae", "r1"), ("transcoder", "m1")])
@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_cached_activations_give_sparsify_trainers_sae(tiny, kind, site, optimizer):
    """Read once (float32, rows in the trainer's order), the loop gives bit for bit the SAE that
    sparsify's own Trainer gives when it recomputes the activations for every row (1.5 passes here)."""
    kw = dict(kind=kind, k=4, expansion=2, tokens=640, ctx_len=32, batch_size=4, quiet=True, optimizer=optimizer)
    ref, _ = train_sae(tiny, site, _ids(10), activations="stream", **kw)
    got, info = train_sae(tiny, site, _ids(10), activations="cache", shuffle="rows", act_dtype="float32", **kw)
    assert info["passes"] > 1 and info["read_forwards"] == 1
    for a, b in zip(_sae_tensors(ref), _sae_tensors(got)):
        assert torch.equal(a, b)


def test_many_passes_read_the_model_once_and_learn(tiny_llama):
    calls = []
    hook = tiny_llama.adapter.block(0).register_forward_hook(lambda *a: calls.append(1))
    try:
        sae, info = train_sae(tiny_llama, "r1", _ids(40), k=4, expansion=2, tokens=20_000, ctx_len=32, batch_size=4,
                              read_batch=16, quiet=True, log_every=2_000)
    finally:
        hook.remove()
    n_rows = len(_distinct_rows(_ids(40), 32, tiny_llama.tokenizer.eos_token_id, tiny_llama.tokenizer.bos_token_id))
    assert info["distinct_rows"] == n_rows and info["passes"] > 10
    assert len(calls) == info["read_forwards"] == -(-n_rows // 16)   # one forward per 16 rows, whatever the passes
    fvu = [e["fvu"] for e in info["log"]]
    assert len(fvu) >= 5 and fvu[-1] < 0.7 * fvu[0]


def test_memory_mapped_store_matches_memory(tiny_gpt2, tmp_path):
    rows = _distinct_rows(_ids(6), 32, tiny_gpt2.tokenizer.eos_token_id, 0)
    mem = read_activations(tiny_gpt2, "m1", rows, kind="transcoder", exclude=[0])
    mm = read_activations(tiny_gpt2, "m1", rows, kind="transcoder", exclude=[0], max_memory=0, spill_dir=tmp_path)
    try:
        assert mm.where == "memory-mapped file" and len(mm.files) == 2 and mem.where == "memory"
        assert mem.n_tokens == sum(sum(t != 0 for t in r) for r in rows)
        assert torch.equal(mem.x, mm.x) and torch.equal(mem.y, mm.y)
    finally:
        files = mm.files
        mm.close()
        mem.close()
    assert files and not list(tmp_path.iterdir())


def test_a_killed_run_resumes_to_the_same_sae(tiny_llama, tmp_path):
    kw = dict(k=4, expansion=2, tokens=4_000, ctx_len=32, batch_size=4, quiet=True)
    whole, _ = train_sae(tiny_llama, "r1", _ids(20), **kw)
    state = tmp_path / "train_state.pt"
    seen = []

    def kill(sae, info):
        seen.append(info["tokens_done"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(tiny_llama, "r1", _ids(20), checkpoint=state, checkpoint_every=1_000, on_checkpoint=kill, **kw)
    assert state.is_file() and seen == [1024, 2048]
    with pytest.raises(KnoweditError, match="other settings"):   # refused before any work
        train_sae(tiny_llama, "r1", _ids(20), checkpoint=state, **{**kw, "k": 3})
    resumed, info = train_sae(tiny_llama, "r1", _ids(20), checkpoint=state, checkpoint_every=1_000, **kw)
    assert info["resumed_at_step"] == 16
    for a, b in zip(_sae_tensors(whole), _sae_tensors(resumed)):
        assert torch.equal(a, b)


def test_muon_trains_and_bad_loop_settings_are_refused(tiny_gpt2):
    sae, info = train_sae(tiny_gpt2, "r1", _ids(10), k=4, expansion=2, tokens=640, ctx_len=32, batch_size=4,
                          optimizer="muon", quiet=True)
    assert info["optimizer"] == "muon" and torch.isfinite(sae.W_dec).all()
    for bad, match in ((dict(optimizer="sgd"), "optimizer"), (dict(shuffle="random"), "shuffle"),
                       (dict(activations="disk"), "activations"), (dict(tokens=0), "tokens")):
        with pytest.raises(KnoweditError, match=match):
            train_sae(tiny_gpt2, "r1", _ids(4), **bad)
