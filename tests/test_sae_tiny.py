"""SAE latents as components on tiny random GPT-2 and Llama models: file formats (sparsify's own
save function, a SAELens fixture written from the format's documented fields), the exact splice,
interventions on latents, and bad input."""
import contextlib
import io
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from knowedit import KnoweditError
from knowedit.hooks import hook_count
from knowedit.sae import (SAE, ablate_latents, attached, clamp_latents, detach, latent_means, load_sae, patch_latents,
                          record_latents, save_sparsify, splice, steer_latents)
from knowedit.sae.shipped import load_shipped_sae
from knowedit.sae.site import Site, sparsify_hookpoint

with contextlib.redirect_stdout(io.StringIO()):   # sparsify announces its decoder kernel on import
    from sparsify import SparseCoder, SparseCoderConfig

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The capital of France is"]
SAME_LEN = ["When Mary and John went to the store, John gave a drink to",
            "When Alice and Bob went to the park, Carl gave a ball to"]


def _coder(d, k=8, expansion=4, transcode=False, skip=False, activation="topk", seed=0):
    torch.manual_seed(seed)
    sc = SparseCoder(d, SparseCoderConfig(k=k, expansion_factor=expansion, transcode=transcode,
                                          skip_connection=skip, activation=activation))
    with torch.no_grad():   # fresh coders have zero biases and decoders; give every tensor real values
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.1)
        sc.W_dec.normal_(0, 0.2)
        if skip:
            sc.W_skip.normal_(0, 0.05)
    return sc


def _dense(sc, x):
    out = sc.encode(x)
    return torch.zeros(*x.shape[:-1], sc.num_latents).scatter_(-1, out.top_indices, out.top_acts.float())


@pytest.fixture
def sparsify_dir(tiny, tmp_path):
    """A sparsify SAE for the residual stream after block 1, written by sparsify's own save function."""
    sc = _coder(tiny.adapter.d_model)
    sc.save_to_disk(tmp_path / sparsify_hookpoint(tiny, Site("r", 1)))
    yield tmp_path, sc
    detach(tiny)


def _acts(sae, x):
    """Latents as a splice reads them: none at each sequence's first position (the attention sink)."""
    a = sae.encode(x)
    a[:, 0] = 0
    return a


def _site_out(handle, layer, batch):
    """The block's output as the model computes it, [B, T, d]."""
    got = {}
    h = handle.adapter.block(layer).register_forward_hook(lambda m, a, o: got.__setitem__("x", o.detach()))
    try:
        with torch.no_grad():
            handle.forward(batch)
    finally:
        h.remove()
    return got["x"]


def _with_site(handle, layer, fn, batch):
    """Logits with the block's output replaced by fn(output)."""
    h = handle.adapter.block(layer).register_forward_hook(lambda m, a, o: fn(o))
    try:
        with torch.no_grad():
            return handle.forward(batch)
    finally:
        h.remove()


# ---- formats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"activation": "groupmax", "k": 4}, {"transcode": True},
                                {"transcode": True, "skip": True}])
def test_sparsify_saved_file_encodes_as_sparsify_does(tmp_path, kw):
    sc = _coder(64, **kw)
    sc.save_to_disk(tmp_path / ("layers.1.mlp" if kw.get("transcode") else "layers.1"))
    sae = load_sae(tmp_path)
    x = torch.randn(5, 7, 64) * 3
    torch.testing.assert_close(sae.encode(x), _dense(sc, x.flatten(0, 1)).view(5, 7, -1), atol=1e-6, rtol=0)
    with torch.no_grad():
        want = sc(x.flatten(0, 1)).sae_out.view(5, 7, -1)
    torch.testing.assert_close(sae(x), want, atol=1e-5, rtol=0)
    assert sae.kind == ("transcoder" if kw.get("transcode") else "sae")
    assert sae.site == Site("m" if kw.get("transcode") else "r", 1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_our_sparsify_files_load_in_sparsify(tmp_path, dtype):
    sc = _coder(64)
    sc.save_to_disk(tmp_path / "a" / "layers.1")
    sae = load_sae(tmp_path / "a")
    save_sparsify(sae, tmp_path / "b" / "layers.1", dtype=dtype, card={"note": "test"})
    back = SparseCoder.load_from_disk(tmp_path / "b" / "layers.1")
    assert back.dtype == getattr(torch, dtype)
    x = torch.randn(20, 64)
    ours = load_sae(tmp_path / "b")
    assert ours.source["card"] == {"note": "test"}
    want = _dense(back.float(), x)
    torch.testing.assert_close(ours.encode(x), want, atol=1e-6, rtol=0)
    if dtype == "float32":
        torch.testing.assert_close(want, _dense(sc, x), atol=0, rtol=0)


def _saelens_dir(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _saelens_weights(d=64, w=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, w, generator=g) * 0.3, "W_dec": torch.randn(w, d, generator=g) * 0.3,
            "b_enc": torch.randn(w, generator=g) * 0.2, "b_dec": torch.randn(d, generator=g) * 0.2}


# Each case: SAELens config fields, extra tensors, and the encoding the format documents.
def _relu(t, cfg, x):
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    return torch.relu(sae_in @ t["W_enc"] + t["b_enc"])


def _topk(t, cfg, x, k):
    pre = (x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ t["W_enc"] + t["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * t["W_dec"].norm(dim=-1)
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, i, v.relu())


def _jump(t, cfg, x, thr):
    pre = (x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)) @ t["W_enc"] + t["b_enc"]
    return pre.relu() * (pre > thr.relu())


@pytest.mark.parametrize("case", ["standard", "standard-no-bdec", "topk", "topk-rescaled", "topk-pre6",
                                  "jumprelu", "jumprelu-log", "norm-rescale", "layer-norm"])
def test_saelens_fixture_loads_and_encodes_as_documented(tiny, tmp_path, case):
    t = _saelens_weights()
    thr = torch.rand(96, generator=torch.Generator().manual_seed(2)) * 0.5
    cfg = {"d_in": 64, "d_sae": 96, "dtype": "float32", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": "blocks.1.hook_resid_post", "sae_lens_version": "6.5.0"}}
    extra = {}
    x = torch.randn(4, 6, 64) * 2
    if case.startswith("standard"):
        cfg["architecture"] = "standard"
        cfg["apply_b_dec_to_input"] = case == "standard"
        want = _relu(t, cfg, x)
    elif case in ("topk", "topk-rescaled"):
        cfg.update(architecture="topk", k=7, rescale_acts_by_decoder_norm=case == "topk-rescaled")
        want = _topk(t, cfg, x, 7)
    elif case == "topk-pre6":   # SAELens 3-5: a standard SAE with a topk activation function
        cfg = {"d_in": 64, "d_sae": 96, "architecture": "standard", "activation_fn_str": "topk",
               "activation_fn_kwargs": {"k": 5}, "hook_name": "blocks.1.hook_resid_post", "apply_b_dec_to_input": False}
        want = _topk(t, cfg, x, 5)
    elif case.startswith("jumprelu"):
        cfg.update(architecture="jumprelu", apply_b_dec_to_input=False)
        extra = {"log_threshold": thr.log()} if case == "jumprelu-log" else {"threshold": thr - 0.1}
        want = _jump(t, cfg, x, thr if case == "jumprelu-log" else thr - 0.1)
    elif case == "norm-rescale":
        cfg.update(architecture="standard", normalize_activations="constant_norm_rescale")
        coeff = math.sqrt(64) / x.norm(dim=-1, keepdim=True)
        want = _relu(t, cfg, x * coeff)
        recon = (want @ t["W_dec"] + t["b_dec"]) / coeff
    else:
        cfg.update(architecture="standard", normalize_activations="layer_norm")
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        want = _relu(t, cfg, (x - mu) / (std + 1e-5))
        recon = (want @ t["W_dec"] + t["b_dec"]) * std + mu
    d = _saelens_dir(tmp_path / "sae", cfg, {**t, **extra})
    sae = load_sae(d, tiny)
    assert sae.site == Site("r", 1) and sae.width == 96 and sae.source["format"] == "saelens"
    got = sae.encode(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if case in ("norm-rescale", "layer-norm"):
        torch.testing.assert_close(sae(x), recon, atol=1e-4, rtol=1e-4)
    elif case == "topk-rescaled":   # SAELens decodes latents / ||W_dec|| through W_dec
        torch.testing.assert_close(sae.decode(got), (want / t["W_dec"].norm(dim=-1)) @ t["W_dec"] + t["b_dec"],
                                   atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(sae.decode(got), want @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)
    detach(tiny)


# ---- splice ---------------------------------------------------------------------------------------

def test_splice_with_error_term_is_exact(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    batch = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        base = tiny.forward(batch)
        with splice(tiny, sae):
            assert hook_count(tiny.model) == 1
            same = tiny.forward(batch)
        with record_latents(tiny, sites=["r1"]) as rec:
            read = tiny.forward(batch)
        with steer_latents(tiny, {"r1.f3": 1.0}, how="scale"):   # changes nothing, computed through the SAE
            noop = tiny.forward(batch)
    assert torch.equal(same, base) and torch.equal(read, base)
    assert (noop - base).abs().max() <= 1e-5 * base.abs().max()
    assert rec.acts[Site("r", 1)].shape == (2, batch.input_ids.shape[1], sae.width)
    assert hook_count(tiny.model) == 0


def test_splice_without_error_term_replaces_the_site(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    batch = tiny.tokenize(PROMPTS)
    x = _site_out(tiny, 1, batch)
    with torch.no_grad(), splice(tiny, sae, error_term=False):
        got = tiny.forward(batch)
    # every position but the first (the attention sink, left to the model) becomes the reconstruction
    keep_first = lambda o: torch.cat([o[:, :1], sae(o)[:, 1:]], 1)
    torch.testing.assert_close(got, _with_site(tiny, 1, keep_first, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(sae(x), x, atol=1e-3)


def test_zero_ablation_removes_exactly_that_latents_write(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    batch = tiny.tokenize(PROMPTS)
    x = _site_out(tiny, 1, batch)
    acts = _acts(sae, x)
    i = int(acts[0, -1].argmax())
    with torch.no_grad(), ablate_latents(tiny, [f"r1.f{i}"], how="zero"):
        got = tiny.forward(batch)
    want = _with_site(tiny, 1, lambda o: o - acts[..., i:i + 1] * sae.W_dec[i], batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(got, tiny.forward(batch).detach(), atol=1e-4)


def test_steer_clamp_and_positions(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    batch = tiny.tokenize(PROMPTS)
    x = _site_out(tiny, 1, batch)
    acts = _acts(sae, x)
    with torch.no_grad(), steer_latents(tiny, {"r1.f5": 3.0}, positions=[2]):
        got = tiny.forward(batch)
    add = torch.zeros_like(x)
    add[:, 2] = 3.0 * sae.W_dec[5]
    torch.testing.assert_close(got, _with_site(tiny, 1, lambda o: o + add, batch), atol=1e-5, rtol=0)
    with torch.no_grad(), clamp_latents(tiny, {"r1.f5": 2.0, "r1.f6": 0.0}):
        got = tiny.forward(batch)
    delta = (2.0 - acts[..., 5:6]) * sae.W_dec[5] - acts[..., 6:7] * sae.W_dec[6]
    delta[:, 0] = 0   # nothing is written at the first position
    torch.testing.assert_close(got, _with_site(tiny, 1, lambda o: o + delta, batch), atol=1e-5, rtol=0)


def test_patching_every_latent_moves_the_site_by_the_reconstruction_difference(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    clean, corrupt = tiny.tokenize(SAME_LEN[:1]), tiny.tokenize(SAME_LEN[1:])
    assert clean.input_ids.shape == corrupt.input_ids.shape
    every = [f"r1.f{i}" for i in range(sae.width)]
    with torch.no_grad():
        with record_latents(tiny, every) as rec:
            tiny.forward(clean)
        with patch_latents(tiny, rec, every):
            got = tiny.forward(corrupt)
    xc, xk = _site_out(tiny, 1, clean), _site_out(tiny, 1, corrupt)
    shift = sae.decode(_acts(sae, xc)) - sae.decode(_acts(sae, xk))
    assert shift[:, 0].abs().max() == 0
    torch.testing.assert_close(got, _with_site(tiny, 1, lambda o: o + shift, corrupt), atol=1e-5, rtol=0)


def test_mean_ablation(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    means = latent_means(tiny, PROMPTS, ["r1.f2", "r1.f7"])
    batch = tiny.tokenize(PROMPTS)
    x = _site_out(tiny, 1, batch)
    acts, w = _acts(sae, x), batch.attention_mask.float()
    w[:, 0] = 0   # means leave out the first position, where no latents are read
    torch.testing.assert_close(means[tiny.component("r1.f2")], (acts[..., 2] * w).sum() / w.sum())
    with torch.no_grad(), ablate_latents(tiny, ["r1.f2", "r1.f7"], how="mean", reference=means):
        got = tiny.forward(batch)
    m2, m7 = means[tiny.component("r1.f2")], means[tiny.component("r1.f7")]
    delta = (m2 - acts[..., 2:3]) * sae.W_dec[2] + (m7 - acts[..., 7:8]) * sae.W_dec[7]
    delta[:, 0] = 0
    torch.testing.assert_close(got, _with_site(tiny, 1, lambda o: o + delta, batch), atol=1e-5, rtol=0)


def test_latent_gradients_are_the_decoder_times_the_stream_gradient(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    batch = tiny.tokenize(PROMPTS)
    with record_latents(tiny, sites=["r1"], grad=True) as rec:
        logits = tiny.forward(batch)
    logits[:, -1, 11].sum().backward()
    g_lat = rec.acts[Site("r", 1)].grad
    got = {}

    def keep(m, a, o):
        o.retain_grad()
        got["x"] = o
    h = tiny.adapter.block(1).register_forward_hook(keep)
    try:
        tiny.model.zero_grad()
        tiny.forward(batch)[:, -1, 11].sum().backward()
    finally:
        h.remove()
    torch.testing.assert_close(g_lat[:, 1:], (got["x"].grad @ sae.W_dec.T)[:, 1:], atol=1e-5, rtol=1e-4)
    assert g_lat[:, 0].abs().max() == 0   # the first position's latents are not part of the pass


def test_transcoder_splice(tiny, tmp_path):
    sc = _coder(tiny.adapter.d_model, transcode=True, skip=True)
    sc.save_to_disk(tmp_path / sparsify_hookpoint(tiny, Site("m", 2)))
    sae = load_sae(tmp_path, tiny)
    assert sae.kind == "transcoder" and sae.site == Site("m", 2)
    batch = tiny.tokenize(PROMPTS)
    mlp = tiny.adapter.mlp(2)
    got_in = {}
    h = mlp.register_forward_hook(lambda m, a, o: got_in.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        base = tiny.forward(batch)
    h.remove()
    acts = _acts(sae, got_in["x"])
    i = int(acts[0, -1].argmax())
    with torch.no_grad():
        with splice(tiny, sae):
            assert torch.equal(tiny.forward(batch), base)
        with ablate_latents(tiny, [f"m2.f{i}"]):
            moved = tiny.forward(batch)
    h = mlp.register_forward_hook(lambda m, a, o: o - acts[..., i:i + 1] * sae.W_dec[i])
    try:
        with torch.no_grad():
            want = tiny.forward(batch)
    finally:
        h.remove()
    torch.testing.assert_close(moved, want, atol=1e-5, rtol=0)
    assert not torch.allclose(moved, base, atol=1e-6)
    detach(tiny)


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_files_give_clear_errors(tiny, tmp_path):
    with pytest.raises(KnoweditError, match="does not exist"):
        load_sae(tmp_path / "nope", tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KnoweditError, match="no SAE here"):
        load_sae(tmp_path / "empty", tiny)
    sc = _coder(tiny.adapter.d_model)
    d = tmp_path / "a" / "layers.1"
    sc.save_to_disk(d)
    (d / "sae.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(KnoweditError, match="sae.safetensors: not a readable safetensors file"):
        load_sae(d, tiny)
    (d / "sae.safetensors").unlink()
    with pytest.raises(KnoweditError, match="no SAE weights.*found cfg.json"):
        load_sae(d, tiny)
    # shapes that do not fit the model's residual stream: both widths named
    _coder(48).save_to_disk(tmp_path / "b" / "layers.1")
    with pytest.raises(KnoweditError, match=r"d_in=48.*d_model=64"):
        load_sae(tmp_path / "b", tiny)
    # an unknown activation function
    cfg = {"d_in": 64, "d_sae": 96, "architecture": "standard", "activation_fn": "tanh-relu",
           "hook_name": "blocks.1.hook_resid_post"}
    _saelens_dir(tmp_path / "c", cfg, _saelens_weights())
    with pytest.raises(KnoweditError, match="activation_fn.*tanh-relu"):
        load_sae(tmp_path / "c", tiny)
    cfg.update(architecture="gated")
    _saelens_dir(tmp_path / "c", cfg, _saelens_weights())
    with pytest.raises(KnoweditError, match="architecture.*gated"):
        load_sae(tmp_path / "c", tiny)
    # a tensor of the wrong shape
    t = _saelens_weights()
    t["b_enc"] = torch.zeros(95)
    _saelens_dir(tmp_path / "e", {**cfg, "architecture": "standard", "activation_fn": "relu"}, t)
    with pytest.raises(KnoweditError, match="b_enc.*95"):
        load_sae(tmp_path / "e", tiny)
    # a hookpoint past the model's layers
    _coder(64).save_to_disk(tmp_path / "f" / "layers.7")
    with pytest.raises(KnoweditError, match="layer 7 is out of range"):
        load_sae(tmp_path / "f", tiny)
    # the hub, offline
    with pytest.raises(KnoweditError, match="hub"):
        load_sae("no-such-org/no-such-sae", tiny)
    with pytest.raises(KnoweditError, match="no SAE ships for tiny"):
        load_shipped_sae(tiny)
    assert attached(tiny) == {} and hook_count(tiny.model) == 0


def test_bad_latents_give_clear_errors_and_splice_nothing(tiny, sparsify_dir):
    sae = load_sae(sparsify_dir[0], tiny)
    batch = tiny.tokenize(PROMPTS)
    for ctx, msg in [(lambda: ablate_latents(tiny, [f"r1.f{sae.width}"]), f"past this SAE's width.*0..{sae.width - 1}"),
                     (lambda: steer_latents(tiny, {"r0.f1": 1.0}), "no SAE is loaded for this site"),
                     (lambda: record_latents(tiny, ["a1.h0"]), "not an SAE latent"),
                     (lambda: ablate_latents(tiny, ["r1.f1"], how="mean"), "reference"),
                     (lambda: steer_latents(tiny, {"r1.f1": 1.0}, how="double"), "how"),
                     (lambda: ablate_latents(tiny, ["r9.f1"]), "layer 9 is out of range")]:
        with pytest.raises(KnoweditError, match=msg):
            with ctx():
                pass
        assert hook_count(tiny.model) == 0
    with pytest.raises(KnoweditError, match="does not fit"):   # a value of the wrong shape fails inside the pass
        with steer_latents(tiny, {"r1.f1": torch.ones(7, 3)}):
            tiny.forward(batch)
    assert hook_count(tiny.model) == 0
    with splice(tiny, sae):
        other = SAE(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, activation="relu", site=sae.site, hookpoint="layers.1")
        with pytest.raises(KnoweditError, match="already spliced"):
            with splice(tiny, other):
                pass
    assert hook_count(tiny.model) == 0
