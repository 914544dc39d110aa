"""The editors follow the reference equations (ROME, r-ROME, MEMIT): each test here fails on the
behaviour knowedit had before (squared weight decay, KL at the last token and in the other direction,
one optimiser step too many, flat MEMIT key averages, free-running prefix lengths)."""
import re
from pathlib import Path

import pytest
import torch

from knowedit.editing import make_request
from knowedit.editing.hparams import method_defaults
from knowedit.editing.keys_values import (build_rows, context_weights, optimise_delta, prefix_groups,
                                          read_at_subject)
from knowedit.editing.memit import MEMIT_DEFAULTS, apply_memit, memit_targets
from knowedit.editing.rome import ROME_DEFAULTS, apply_rome
from knowedit.hooks.hookset import HookSet

REQ = make_request("{} plays the sport of", "Michael Jordan", "tennis", "basketball")
HP = {**ROME_DEFAULTS, "layers": [1], "mom2_dataset": "identity", "context_template_length_params": [[4, 2]],
      "v_num_grad_steps": 4, "max_update_ratio": 1e3, "kl_factor": 1.0, "v_loss_layer": -1}


def _delta(h, hp):
    site = h.adapter.mlp_out(1)
    rows = build_rows(h, REQ, [c for g in prefix_groups(h, hp) for c in g], kl_prompts=hp["kl_prompts"])
    delta, info = optimise_delta(h, REQ, rows, site, hp)
    return rows, delta, info


def test_weight_decay_is_the_norm_over_the_squared_value_norm(tiny):
    _, delta, info = _delta(tiny, HP)
    # the info is from the last forward pass, which ran with the returned δ
    assert info["weight_decay"] == pytest.approx(HP["v_weight_decay"] * info["delta_norm"] / info["v0_norm"] ** 2,
                                                 rel=1e-4)
    assert float(delta.norm()) == pytest.approx(info["delta_norm"])


@torch.no_grad()
def _next_token_logprobs(h, text, pos, delta=None):
    ids = torch.tensor([h.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with HookSet() as hs:
        if delta is not None:
            def add(m, a, o):
                o = o.clone()
                o[0, pos] += delta.to(o.dtype)
                return o
            hs.post(h.adapter.mlp_out(1), add)
        return h.model(input_ids=ids).logits[0, pos].float().log_softmax(-1)


def test_kl_is_edited_against_original_at_the_subjects_last_token(tiny):
    rows, delta, info = _delta(tiny, HP)
    assert info["kl"] > 0
    text = "Michael Jordan is a"
    pos = int(rows.subject_pos[-1])
    assert pos < len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # not the last token
    edited = _next_token_logprobs(tiny, text, pos, delta.float())
    original = _next_token_logprobs(tiny, text, pos)
    kl = float((edited.exp() * (edited - original)).sum())
    reverse = float((original.exp() * (original - edited)).sum())
    assert abs(kl - reverse) > 1e-3 * kl  # the test can tell the directions apart
    assert info["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_steps_count_forward_passes_and_the_whole_loss_stops_the_loop(tiny):
    _, _, info = _delta(tiny, {**HP, "v_stop_loss": 0.0})
    assert info["steps"] == HP["v_num_grad_steps"] - 1  # n forward passes, n - 1 optimiser steps
    _, delta, info = _delta(tiny, {**HP, "v_stop_loss": 1e9})
    assert info["steps"] == 0 and float(delta.norm()) == 0.0


def test_prefixes_follow_the_reference_length_convention(tiny):
    groups = prefix_groups(tiny, {"context_template_length_params": [[4, 3], [6, 2]], "seed": 1})
    assert [len(g) for g in groups] == [1, 3, 2] and groups[0] == [""]
    tok = tiny.tokenizer
    for g, length in ((groups[1], 4), (groups[2], 6)):
        for p in g:  # the start word counts towards the length; an end-of-text token may cut it short
            assert len(tok(p[:-2], add_special_tokens=False)["input_ids"]) <= length + 1


def test_top_k_sampling_draws_only_from_the_k_most_likely(tiny):
    from knowedit.editing.sampling import sample_ids
    a = sample_ids(tiny, ["The", "I"], 5, seed=0, top_k=1, total=True)
    b = sample_ids(tiny, ["The", "I"], 5, seed=7, top_k=1, total=True)
    assert a == b and all(len(x) <= 5 for x in a)
    c = sample_ids(tiny, ["The"] * 4, 8, seed=0)
    assert len({tuple(x) for x in c}) > 1  # without top-k the draws differ


def test_memit_keys_average_within_then_across_context_types():
    w = context_weights([[""], ["a", "b", "c", "d", "e"]], per_type=True)
    assert w.tolist() == pytest.approx([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert context_weights([[""], ["a", "b"]], per_type=False).tolist() == pytest.approx([1 / 3] * 3)


def test_memit_maps_the_type_averaged_key_to_z(tiny):
    hp = {**MEMIT_DEFAULTS, "layers": [1], "mom2_dataset": "identity", "context_template_length_params": [[4, 3]],
          "v_num_grad_steps": 3, "mom2_update_weight": 1e-6, "v_loss_layer": -1}
    groups = prefix_groups(tiny, hp)
    rows = build_rows(tiny, REQ, [c for g in groups for c in g], kl_prompts=hp["kl_prompts"])
    keys, _ = read_at_subject(tiny, rows, [1])
    k = keys[1][:rows.n_context]
    k_bar = 0.5 * k[0] + 0.5 * k[1:].mean(0)
    targets = memit_targets(tiny, [REQ], hp)
    w0 = tiny.adapter.weight_in_out(tiny.adapter.mlp_out(1)).detach().double().T.clone()
    e = apply_memit(tiny, [REQ], hp, targets=targets)
    dW = tiny.adapter.weight_in_out(tiny.adapter.mlp_out(1)).detach().double().T - w0
    e.undo()
    # one layer, C = I, λ -> 0: ΔW k̄ = z - h_bare = δ
    torch.testing.assert_close(dW @ k_bar, targets[0][0], rtol=1e-3, atol=1e-4)
    assert (dW @ k.mean(0) - targets[0][0]).norm() > 1e-3 * targets[0][0].norm()


@pytest.mark.parametrize("variant", ["rome", "r-rome", "hybrid"])
def test_rome_variants_map_their_key_to_their_value(tiny, variant):
    hp = {**HP, "rome_variant": variant, "min_denominator_ratio": 0.0}
    rows, delta, _ = _delta(tiny, hp)
    keys, v = read_at_subject(tiny, rows, [1], site=tiny.adapter.mlp_out(1))
    k = keys[1][:rows.n_context]
    k_bar, k_bare, v_bare = k.mean(0), k[0], v[0]
    mod = tiny.adapter.mlp_out(1)
    w0 = tiny.adapter.weight_in_out(mod).detach().double().T.clone()
    e = apply_rome(tiny, [REQ], hp)
    w1 = tiny.adapter.weight_in_out(mod).detach().double().T
    e.undo()
    if variant == "rome":
        got, want = (w1 - w0) @ k_bare, delta
    elif variant == "r-rome":  # W' k̄ (+ bias) = v* = v_bare + δ
        bias = mod.bias.detach().double() if getattr(mod, "bias", None) is not None else 0
        got, want = w1 @ k_bar + bias, v_bare + delta
    else:
        got, want = (w1 - w0) @ k_bar, delta
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)


def test_every_field_an_editor_reads_is_in_its_schema():
    """A field read with hp.get(...) but unknown to the loader could never be set from a file."""
    src = Path(__file__).resolve().parents[1] / "knowedit" / "editing"
    pat = re.compile(r'(?:field\((?:hp|hparams),\s*|(?:hp|hparams)(?:\.get\(|\[))\s*"([a-z][a-z0-9_]*)"')
    owners = {"finetune.py": ("ft-l", "ft-m"), "ft_objectives.py": ("ft-l", "ft-m"), "rome.py": ("rome",),
              "memit.py": ("memit", "alphaedit"), "alphaedit.py": ("alphaedit",),
              "preserve.py": ("rome", "memit", "alphaedit", "ft-l", "ft-m")}
    seen = 0
    for f in src.glob("*.py"):
        if f.name == "hparams.py":
            continue
        for name in pat.findall(f.read_text()):
            for method in owners.get(f.name, ("rome", "memit")):
                assert name in method_defaults(method), f"{f.name} reads {name!r}, which {method} hparams do not accept"
                seen += 1
    assert seen > 30


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_rome_and_memit_on_a_bf16_copy_agree_with_float32(tiny, method):
    """bf16 weights, float32/float64 solves: the update is the float32 one to within bf16's precision."""
    import copy

    from knowedit.models.handle import ModelHandle
    hp = {"layers": [1], "mom2_dataset": "identity", "context_template_length_params": [[4, 2]],
          "v_num_grad_steps": 3, "max_update_ratio": 1e3, "v_loss_layer": -1}
    if method == "memit":
        hp.update(MEMIT_DEFAULTS, **hp, mom2_update_weight=1.0)
    half = ModelHandle(copy.deepcopy(tiny.model).to(torch.bfloat16), tiny.tokenizer, name=tiny.name + "-bf16")
    name = tiny.adapter.name_of(tiny.adapter.mlp_out(1).weight)
    deltas = []
    for h in (tiny, half):
        run = apply_rome if method == "rome" else apply_memit
        e = run(h, [REQ], hp)
        deltas.append(e.deltas[name].double())
        assert e.new_values[name].dtype == h.model.dtype
        e.undo()
    full, low = deltas
    assert full.norm() > 0
    # bf16 keeps ~3 significant digits in every activation; measured drift 0.5-1.3% of the update's
    # norm for ROME and GPT-2 MEMIT, 8.7% for Llama MEMIT (its λC + KKᵀ solve amplifies key noise)
    assert (low - full).norm() / full.norm() < 0.15
    assert torch.nn.functional.cosine_similarity(low.flatten(), full.flatten(), dim=0) > 0.99


def test_easyedit_r_rome_switches_choose_the_variant(tmp_path):
    from knowedit.editing.hparams import load_hparams
    from knowedit.errors import KnoweditError
    f = tmp_path / "r.yaml"
    f.write_text("alg_name: R-ROME\nlayers: [4]\noriginal_implementation: true\nenable_random_prefix_keys: true\n")
    assert load_hparams("rome", "gpt2", f)["rome_variant"] == "rome"
    f.write_text("alg_name: R-ROME\nlayers: [4]\nenable_random_prefix_keys: true\n")
    assert load_hparams("rome", "gpt2", f)["rome_variant"] == "r-rome"
    f.write_text("alg_name: R-ROME\nenable_prompt_keys: true\n")
    with pytest.raises(KnoweditError, match="rome_variant"):
        load_hparams("rome", "gpt2", f)
    f.write_text("rome_variant: rome-2\n")
    hp = load_hparams("rome", "gpt2", f)
    with pytest.raises(KnoweditError, match="rome_variant"):
        from knowedit.editing.rome import check_hparams
        check_hparams(hp, 12)


def test_a_shipped_corpus_replaces_sampling(tiny, tmp_path, monkeypatch):
    from knowedit.editing import covariance as cov
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))
    ids = [[5, 6, 7], [70000 % 50000, 1], [9]]
    path = tmp_path / "corpus.npz"
    cov.write_ids(path, ids)
    assert cov.read_ids(path) == ids
    monkeypatch.setattr(cov, "shipped_corpus", lambda h, s: path)
    monkeypatch.setattr("knowedit.editing.sampling.sample_ids", lambda *a, **k: pytest.fail("sampled anyway"))
    st = cov.key_stats(tiny, [1], {"mom2_n_samples": 3})[1]
    assert st.n_tokens == 6


def test_memit_reads_many_requests_in_one_batch_as_one_by_one(tiny):
    from knowedit.editing.memit import stack_contexts
    hp = {"context_template_length_params": [[4, 2]], "seed": 0}
    ctx = [c for g in prefix_groups(tiny, hp) for c in g]
    reqs = [REQ, make_request("The capital of {} is", "France", "Rome", "Paris")]
    rows = [build_rows(tiny, r, ctx, kl_prompts=["{} is a"]) for r in reqs]
    assert rows[0].input_ids.shape[1] != rows[1].input_ids.shape[1]
    k, h = read_at_subject(tiny, stack_contexts(rows, tiny.tokenizer.pad_token_id), [1], site=tiny.adapter.block(2))
    one = [read_at_subject(tiny, r, [1], site=tiny.adapter.block(2)) for r in rows]
    n = rows[0].n_context
    torch.testing.assert_close(k[1], torch.cat([o[0][1][:n] for o in one]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, torch.cat([o[1][:n] for o in one]), rtol=1e-5, atol=1e-6)
