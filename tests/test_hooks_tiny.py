"""Interventions on tiny random GPT-2 (Conv1D) and Llama (GQA) models."""
import pytest
import torch

from knowedit import KnoweditError
from knowedit.hooks import (ablate, even_over, hook_count, patch, record, record_attention,
                            replace_activations, steer_attention)

PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "The capital of France is", "One two three"]


def test_head_outputs_sum_to_attention_output(tiny):
    a = tiny.adapter
    batch = tiny.tokenize(PROMPTS)
    attn_out = {}
    hooks = [a.o_proj(l).register_forward_hook(lambda m, i, o, l=l: attn_out.__setitem__(l, o.detach()))
             for l in range(a.n_layers)]
    try:
        with torch.no_grad(), record(tiny) as rec:
            tiny.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    for l in range(a.n_layers):
        total = sum(rec.head_out(l, h) for h in range(a.n_heads))
        bias = a.o_proj(l).bias
        if bias is not None:
            total = total + bias
        torch.testing.assert_close(total, attn_out[l], atol=1e-5, rtol=0)


def test_patching_everything_restores_source_logits(tiny):
    clean = tiny.tokenize(["When Mary and John went to the store, John gave a drink to"])
    corrupt = tiny.tokenize(["When Alice and Bob went to the park, Carl gave a ball to"])
    assert clean.input_ids.shape == corrupt.input_ids.shape
    with torch.no_grad():
        with record(tiny, tiny.all_heads() + tiny.all_mlps() + ["emb"]) as rec:
            want = tiny.forward(clean)
        base = tiny.forward(corrupt)
        with patch(tiny, rec, tiny.all_heads() + tiny.all_mlps() + ["emb"]):
            got = tiny.forward(corrupt)
    assert not torch.allclose(base, want)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hooks_removed_after_exception(tiny):
    batch = tiny.tokenize(PROMPTS)
    assert hook_count(tiny.model) == 0
    for ctx in [record(tiny, resid=True), ablate(tiny, ["a1.h2", "m0"], how="zero"),
                steer_attention(tiny, {"a1.h0": torch.ones(3, 1)}, batch.last)]:
        with pytest.raises(RuntimeError, match="boom"):
            with ctx:
                assert hook_count(tiny.model) > 0 or ctx is not None
                raise RuntimeError("boom")
        assert hook_count(tiny.model) == 0
    assert tiny.model.config._attn_implementation != "knowedit_eager"


def test_zero_ablation_matches_zeroed_weights(tiny):
    """Zero-ablating a head equals zeroing its W_O slice: checks slice layout and orientation."""
    batch = tiny.tokenize(PROMPTS)
    a = tiny.adapter
    with torch.no_grad():
        with ablate(tiny, ["a1.h2"], how="zero"):
            got = tiny.forward(batch)
        sl = [s for s in a.head_slices(1, 2, "o")]
        params = dict(tiny.model.named_parameters())
        for s in sl:
            params[s.param].index_fill_(s.dim, torch.tensor(s.indices), 0.0)
        want = tiny.forward(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mean_ablation_uses_reference_means(tiny):
    batch = tiny.tokenize(PROMPTS[:1])
    with torch.no_grad():
        base = tiny.forward(batch)
        with ablate(tiny, ["m1"], how="mean", reference=PROMPTS):
            got = tiny.forward(batch)
    assert not torch.allclose(base, got)
    with pytest.raises(KnoweditError, match="reference"):
        with ablate(tiny, ["m1"], how="mean"):
            pass


def test_record_attention_matches_eager(tiny):
    batch = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        base = tiny.forward(batch)
        with record_attention(tiny) as pats:
            again = tiny.forward(batch)
    torch.testing.assert_close(base, again, atol=1e-5, rtol=0)  # our eager equals the default kernel
    p = pats[1]
    assert p.shape == (3, tiny.adapter.n_heads, batch.input_ids.shape[1], batch.input_ids.shape[1])
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))


def test_steering_sets_pattern_and_leaves_others(tiny):
    batch = tiny.tokenize(PROMPTS)
    T = batch.input_ids.shape[1]
    dist = even_over([[0, 2], [1, 3], [0]], T)
    with torch.no_grad():
        with record_attention(tiny) as before:
            tiny.forward(batch)
        with steer_attention(tiny, {"a2.h1": dist}, batch.last), record_attention(tiny) as after:
            tiny.forward(batch)
    rows = torch.arange(3)
    torch.testing.assert_close(after[2][rows, 1, batch.last], dist, atol=1e-6, rtol=0)
    torch.testing.assert_close(after[2][:, 0], before[2][:, 0])  # another head in the same layer
    torch.testing.assert_close(after[1], before[1])              # an earlier layer


def test_bad_input(tiny):
    with pytest.raises(KnoweditError, match="out of range"):
        with ablate(tiny, ["a99.h0"], how="zero"):
            pass
    with pytest.raises(KnoweditError, match="empty"):
        tiny.tokenize([])
    with pytest.raises(KnoweditError, match="not an ablation"):
        with ablate(tiny, ["a0.h0"], how="median"):
            pass
    with pytest.raises(KnoweditError, match="does not fit"):
        with torch.no_grad(), replace_activations(tiny, {"m0": torch.zeros(5, 5, 5, 5)}):
            tiny.forward(tiny.tokenize(PROMPTS))
    assert hook_count(tiny.model) == 0
