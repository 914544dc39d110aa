"""ROME and MEMIT plumbing on tiny GPT-2 (Conv1D) and Llama (gated MLP) models: what changes, what
does not, undo, refusals and bad input."""
import pytest
import torch

from knowedit.circuit.mask import ParameterMask
from knowedit.editing import make_request, tensor_hash
from knowedit.editing.errors import EditRefused
from knowedit.editing.memit import apply_memit
from knowedit.editing.rome import apply_rome
from knowedit.errors import KnoweditError

FAST = {"mom2_dataset": "identity", "context_template_length_params": [[3, 2]], "v_num_grad_steps": 3,
        "max_update_ratio": 1e3}
REQS = [make_request("The capital of {} is", "France", "Rome", "Paris"),
        make_request("{} plays the sport of", "Michael Jordan", "tennis", "basketball")]


def hashes(h):
    return {n: tensor_hash(p) for n, p in h.model.named_parameters()}


def changed(h, before):
    return {n for n, v in hashes(h).items() if v != before[n]}


def down(h, layer):
    return h.adapter.name_of(h.adapter.mlp_out(layer).weight)


def test_rome_changes_only_the_down_projection_and_undoes_bit_exactly(tiny):
    before = hashes(tiny)
    e = apply_rome(tiny, REQS, dict(FAST, layers=[1]))
    assert changed(tiny, before) == {down(tiny, 1)}
    # ΔW k̄ = δ: the edit is rank one per request
    assert torch.linalg.matrix_rank(e.deltas[down(tiny, 1)].double(), rtol=1e-6) == len(REQS)
    e.undo()
    assert hashes(tiny) == before
    with e:
        assert changed(tiny, before) == {down(tiny, 1)}
    assert hashes(tiny) == before


def test_rome_with_mask_writes_only_masked_neuron_columns(tiny):
    neurons = [0, 5, 17, 40]
    mask = ParameterMask.from_components(tiny, ["m1", "a0.h1", "m2"], mlp_neurons={1: neurons})
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    e = apply_rome(tiny, REQS[:1], dict(FAST, layers=[1]), mask=mask)
    for n, p in tiny.model.named_parameters():
        diff = p.detach() != before[n]
        allowed = mask[n] if mask[n] is not None else torch.zeros_like(diff)
        assert not (diff & ~allowed).any(), n
    d = e.deltas[down(tiny, 1)]
    key_dim = tiny.adapter.in_dim(tiny.adapter.mlp_out(1))
    touched = (d != 0).any(dim=1 - key_dim).nonzero().flatten().tolist()
    assert touched and set(touched) <= set(neurons)
    e.undo()
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


def test_memit_with_and_without_mask(tiny):
    before = hashes(tiny)
    e = apply_memit(tiny, REQS, dict(FAST, layers=[0, 1], mom2_update_weight=1.0))
    assert changed(tiny, before) == {down(tiny, l) for l in (0, 1)}
    assert all(v > 0 for v in e.norms().values())
    e.undo()
    assert hashes(tiny) == before
    mask = ParameterMask.from_components(tiny, ["m1", "m2"], mlp_neurons={1: [1, 2, 3]})
    e = apply_memit(tiny, REQS, dict(FAST, layers=[0, 1], mom2_update_weight=1.0), mask=mask)
    assert changed(tiny, before) == {down(tiny, 1)}
    key_dim = tiny.adapter.in_dim(tiny.adapter.mlp_out(1))
    d = e.deltas[down(tiny, 1)]
    assert set((d != 0).any(dim=1 - key_dim).nonzero().flatten().tolist()) <= {1, 2, 3}
    e.undo()
    assert hashes(tiny) == before


def test_refused_and_failing_edits_leave_the_model_unchanged(tiny, monkeypatch):
    before = hashes(tiny)
    with pytest.raises(EditRefused, match="max_update_ratio"):
        apply_rome(tiny, REQS, dict(FAST, layers=[1], max_update_ratio=1e-9))
    assert hashes(tiny) == before
    with pytest.raises(EditRefused, match="denominator"):
        apply_rome(tiny, REQS, dict(FAST, layers=[1], rome_variant="rome", min_denominator_ratio=1e9))
    assert hashes(tiny) == before
    # a failure after the first of two sequential edits was computed and applied internally
    import knowedit.editing.rome as rome
    real, calls = rome.compute_rome, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(rome, "compute_rome", second_fails)
    with pytest.raises(RuntimeError):
        apply_rome(tiny, REQS, dict(FAST, layers=[1]))
    assert hashes(tiny) == before


def test_bad_input_names_the_field(tiny_llama):
    h = tiny_llama
    mask = ParameterMask.from_components(h, ["a0.h1", "m0"])
    with pytest.raises(KnoweditError, match="no MLP among the edit layers"):
        apply_rome(h, REQS, dict(FAST, layers=[1]), mask=mask)
    with pytest.raises(KnoweditError, match="ablate"):
        apply_memit(h, REQS, dict(FAST, layers=[0]), mask=mask, mode="ablate")
    with pytest.raises(KnoweditError, match="'v_lr'"):
        apply_rome(h, REQS, dict(FAST, layers=[1], v_lr="fast"))
    with pytest.raises(KnoweditError, match="'layers'"):
        apply_rome(h, REQS, dict(FAST, layers=[7]))
    with pytest.raises(KnoweditError, match="v_loss_layer"):
        apply_memit(h, REQS, dict(FAST, layers=[1, 2]))
    with pytest.raises(KnoweditError, match="mom2_dataset"):
        apply_rome(h, REQS, dict(FAST, layers=[1], mom2_dataset="no-such-corpus-offline"))


def test_covariance_from_a_text_file_is_cached_with_its_token_count(tiny_gpt2, tmp_path, monkeypatch):
    from knowedit.editing.covariance import key_stats
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat.\n\nParis is in France.\n\nA third paragraph of text here.")
    hp = {"mom2_dataset": str(corpus), "mom2_n_samples": 10, "mom2_sample_tokens": 16}
    s = key_stats(tiny_gpt2, [0, 2], hp)
    n = sum(len(tiny_gpt2.tokenizer(t)["input_ids"]) for t in corpus.read_text().split("\n\n"))
    assert s[0].n_tokens == s[2].n_tokens == n
    assert torch.allclose(s[0].mom2, s[0].mom2.T)
    files = sorted((tmp_path / "cache" / "stats").rglob("*.pt"))
    assert [f.name for f in files] == ["layer0_n10.pt", "layer2_n10.pt"]
    again = key_stats(tiny_gpt2, [2], hp)[2]
    assert torch.equal(again.mom2, s[2].mom2) and str(corpus) in again.source


def test_covariance_equals_the_mean_outer_product_of_keys(tiny_llama, tmp_path, monkeypatch):
    from knowedit.editing.covariance import collect
    from knowedit.hooks.hookset import HookSet
    h = tiny_llama
    ids = [h.tokenizer("one two three four")["input_ids"], h.tokenizer("five six")["input_ids"]]
    (total, n), = collect(h, [1], ids).values()
    seen = []
    with HookSet() as hs:
        hs.pre(h.adapter.mlp_out(1), lambda m, a: seen.append(a[0][0].double()))
        for t in ids:
            h.model(input_ids=torch.tensor([t]))
    k = torch.cat(seen)
    assert n == len(k) == 6
    assert torch.allclose(total, k.T @ k, rtol=1e-4, atol=1e-6)


def test_caching_the_tokens_before_the_subject_gives_the_same_delta(tiny):
    from knowedit.editing.keys_values import build_rows, optimise_delta, prefixes
    # layer 1 of 3: δ at the subject must still reach the target positions through a later layer;
    # the prefixes put the subjects in different columns, so the rows really are re-aligned
    from knowedit.editing.rome import ROME_DEFAULTS
    hp = {**ROME_DEFAULTS, **FAST, "layers": [1], "v_num_grad_steps": 4, "v_lr": 0.5, "v_weight_decay": 0.5,
          "clamp_norm_factor": 4.0, "kl_factor": 0.0625, "v_loss_layer": -1, "kl_prompts": ["{} is a"]}
    rows = build_rows(tiny, REQS[1], prefixes(tiny, hp), kl_prompts=hp["kl_prompts"])
    assert len(set(rows.subject_pos.tolist())) > 1
    site = tiny.adapter.mlp_out(1)
    fast, info = optimise_delta(tiny, REQS[1], rows, site, hp)
    slow, slow_info = optimise_delta(tiny, REQS[1], rows, site, {**hp, "cache_before_subject": False})
    assert info["cached_columns"] == int(rows.subject_pos.max()) > 0 and slow_info["cached_columns"] == 0
    assert info["step_columns"] < rows.input_ids.shape[1]
    assert info["steps"] > 0 and slow.norm() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    assert abs(info["nll"] - slow_info["nll"]) < 1e-4
