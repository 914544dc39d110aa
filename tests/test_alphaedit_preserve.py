"""AlphaEdit and the circuit-preserving projection on tiny GPT-2 (Conv1D) and Llama models: the
projected update vanishes on the preserved keys, AlphaEdit with P = I is the closed form, the
lifelong memory, refusals and bad input."""
import pytest
import torch

from knowedit.editing import edit, make_request, tensor_hash
from knowedit.editing.alphaedit import STATE_KEY, apply_alphaedit
from knowedit.editing.errors import EditRefused
from knowedit.editing.hparams import load_hparams
from knowedit.editing.keys_values import build_rows, context_weights, prefix_groups, prefixes, read_at_subject
from knowedit.editing.memit import memit_targets, stack_contexts
from knowedit.errors import KnoweditError
from knowedit.hooks.hookset import HookSet
from knowedit.tasks import get_task

FAST = {"mom2_dataset": "identity", "context_template_length_params": [[3, 2]], "v_num_grad_steps": 3}
ROME = dict(FAST, max_update_ratio=1e3)
REQS = [make_request("The capital of {} is", "France", "Rome", "Paris"),
        make_request("{} plays the sport of", "Michael Jordan", "tennis", "basketball")]
# threshold 0 blocks the whole span of the collected keys: 4 IOI prompts give fewer keys than key dimensions
EXACT = {"preserve": ["ioi"], "preserve_threshold": 0.0, "preserve_n": 4, "preserve_min_free": 0.0}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))


def f64(h):
    """The model in float64, so that writing W + ΔW adds no float32 rounding to what is measured."""
    h.model.double()
    return h


def hashes(h):
    return {n: tensor_hash(p) for n, p in h.model.named_parameters()}


def down(h, layer):
    return h.adapter.name_of(h.adapter.mlp_out(layer).weight)


def delta_out_in(h, e, layer):
    """The edit's change of layer ``layer``'s down projection as ``[out, in]`` float64."""
    d = e.deltas[down(h, layer)].double()
    return d if h.adapter.out_dim(h.adapter.mlp_out(layer)) == 0 else d.T


@torch.no_grad()
def task_keys(h, layer, n=4):
    """Every token's down-projection input at ``layer`` over the first ``n`` IOI prompts ``[N, d_mlp]``."""
    task = get_task("ioi", h.tokenizer, n=n, seed=0)
    got = []
    with HookSet() as hs:
        cur = {}
        hs.pre(h.adapter.mlp_out(layer), lambda m, a: got.append(a[0][cur["m"]].double()))
        b = h.tokenize(task.clean, bos=task.bos)
        cur["m"] = b.attention_mask.bool()
        h.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    return torch.cat(got)


def relative_residual(dW, K):
    return float((dW @ K.T).norm() / (dW.norm() * K.norm()))


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit", "ft-m"])
def test_projected_update_vanishes_on_the_preserved_keys(tiny, method):
    tiny = f64(tiny)
    K = task_keys(tiny, 1)
    assert K.shape[0] < tiny.adapter.d_mlp   # the exact span leaves directions to edit
    hp = {"rome": dict(ROME, layers=[1]), "memit": dict(FAST, layers=[1], mom2_update_weight=1.0),
          "alphaedit": dict(FAST, layers=[1], nullspace_threshold=2.0, L2=1.0),
          "ft-m": {"layers": [1], "num_steps": 3, "lr": 1e-2}}[method]
    plain = edit(tiny, REQS[:1], method, dict(hp))
    dW0 = delta_out_in(tiny, plain, 1)
    plain.undo()
    e = edit(tiny, REQS[:1], method, dict(hp, **EXACT))
    dW = delta_out_in(tiny, e, 1)
    e.undo()
    assert dW.norm() > 0
    assert relative_residual(dW0, K) > 1e-3          # without the projection the task keys move
    assert relative_residual(dW, K) < 1e-6


def test_rome_records_what_the_projection_removed(tiny_llama):
    e = edit(tiny_llama, REQS[:1], "rome", dict(ROME, layers=[1], **EXACT))
    info = e.info["requests"][0]
    assert 0 < info["preserve_removed"] < 1 and 0 < info["preserve_free_share"] <= 1
    assert e.info["preserve"]["blocked_dims"] > 0 and e.info["preserve"]["free_dims"] > 0
    e.undo()


def test_alphaedit_with_p_identity_and_no_history_is_the_closed_form(tiny):
    """P = I (every covariance eigenvalue of the identity statistics is 1 < threshold) and K_p = 0:
    ΔW = R Kᵀ (K Kᵀ + I)⁻¹ with L2 = 1, K and R read directly here."""
    hp = load_hparams("alphaedit", tiny, dict(FAST, layers=[1], nullspace_threshold=2.0, L2=1.0))
    hp = {k: v for k, v in hp.items() if not k.startswith("_")}
    targets = memit_targets(tiny, REQS, hp)
    a = tiny.adapter
    rows = [build_rows(tiny, r, prefixes(tiny, hp), kl_prompts=hp["kl_prompts"]) for r in REQS]
    stacked = stack_contexts(rows, tiny.tokenizer.pad_token_id)
    keys, h = read_at_subject(tiny, stacked, [1], site=a.block(1))
    n = rows[0].n_context
    w = context_weights(prefix_groups(tiny, hp), per_type=True)
    K = torch.einsum("c,rcd->rd", w, keys[1].view(len(REQS), n, -1))        # [requests, d_mlp]
    R = torch.stack(targets[0])                                             # z − h at the top (= only) layer
    expected = R.T @ K @ torch.linalg.inv(K.T @ K + torch.eye(a.d_mlp, dtype=torch.float64))
    e = apply_alphaedit(tiny, REQS, hp, targets=targets)
    got = delta_out_in(tiny, e, 1)
    e.undo()
    assert e.info["null_space"][1]["null_dims"] == a.d_mlp
    assert float((got - expected).norm() / expected.norm()) < 1e-4


def test_alphaedit_projects_onto_the_knowledge_null_space(tiny_llama):
    """With statistics from text, ΔW maps every covariance eigenvector above the threshold to zero."""
    from knowedit.editing.covariance import key_stats
    hp = dict(FAST, layers=[1], mom2_dataset="model_samples", mom2_n_samples=8, mom2_sample_tokens=16,
              mom2_sample_batch=8)
    tiny_llama = f64(tiny_llama)
    C = key_stats(tiny_llama, [1], hp)[1].mom2
    vals, vecs = torch.linalg.eigh(C)
    thr = float(vals[len(vals) // 2])            # half the directions preserved
    e = apply_alphaedit(tiny_llama, REQS, dict(hp, nullspace_threshold=thr, L2=1.0))
    dW = delta_out_in(tiny_llama, e, 1)
    e.undo()
    kept = vecs[:, vals >= thr]
    assert float((dW @ kept).norm() / dW.norm()) < 1e-6
    assert e.info["null_space"][1]["null_dims"] == int((vals < thr).sum())


def test_alphaedit_remembers_earlier_edits_in_the_state(tiny_gpt2):
    hp = dict(FAST, layers=[1], nullspace_threshold=2.0, L2=1.0)
    state = {}
    e1 = edit(tiny_gpt2, REQS[:1], "alphaedit", hp, state=state)
    first = state[STATE_KEY][1].clone()
    assert state["alphaedit_edits"] == 1 and torch.linalg.matrix_rank(first) == 1
    e2 = edit(tiny_gpt2, REQS[1:], "alphaedit", hp, state=state)
    assert state["alphaedit_edits"] == 2 and torch.linalg.matrix_rank(state[STATE_KEY][1]) == 2
    with_memory = delta_out_in(tiny_gpt2, e2, 1)
    e2.undo()
    fresh = edit(tiny_gpt2, REQS[1:], "alphaedit", hp)
    assert not torch.allclose(with_memory, delta_out_in(tiny_gpt2, fresh, 1))
    fresh.undo()
    e1.undo()
    # a refused edit leaves the memory as it was
    before = {k: v.clone() for k, v in state[STATE_KEY].items()}
    with pytest.raises(KnoweditError):
        edit(tiny_gpt2, REQS[:1], "alphaedit", dict(hp, nullspace_threshold=1e-9), state=state)
    assert torch.equal(before[1], state[STATE_KEY][1]) and state["alphaedit_edits"] == 2


def test_key_inside_the_preserved_span_is_refused_and_nothing_changes(tiny_llama):
    before = hashes(tiny_llama)
    with pytest.raises(EditRefused, match="preserve"):
        edit(tiny_llama, REQS[:1], "rome", dict(ROME, layers=[1], **dict(EXACT, preserve_min_free=0.999)))
    assert hashes(tiny_llama) == before


def test_bad_preserve_and_threshold_are_named_errors(tiny_llama):
    before = hashes(tiny_llama)
    with pytest.raises(KnoweditError, match="'preserve' names task 'ioii'"):
        edit(tiny_llama, REQS[:1], "memit", dict(FAST, layers=[1], preserve=["ioii"]))
    with pytest.raises(KnoweditError, match="nullspace_threshold.*empty null space"):
        edit(tiny_llama, REQS[:1], "alphaedit", dict(FAST, layers=[1], nullspace_threshold=0.5))
    assert hashes(tiny_llama) == before


def test_easyedit_alphaedit_hparams_load(tmp_path, tiny_llama):
    f = tmp_path / "alphaedit.yaml"
    f.write_text('alg_name: "AlphaEdit"\nmodel_name: "./hugging_cache/llama-3-8b"\nP_loc: "./null_space_project.pt"\n'
                 "device: 0\nlayers: [1]\nclamp_norm_factor: 0.75\nlayer_selection: all\nfact_token: subject_last\n"
                 "v_num_grad_steps: 25\nv_lr: 1e-1\nv_loss_layer: 2\nv_weight_decay: 0.5\nkl_factor: 0.0625\n"
                 "mom2_adjustment: true\nmom2_update_weight: 15000\n"
                 'rewrite_module_tmp: "model.layers.{}.mlp.down_proj"\nmom2_dataset: "wikipedia"\n'
                 "mom2_n_samples: 100000\nmom2_dtype: float32\nnullspace_threshold: 2e-2\nL2: 10\n")
    hp = load_hparams("alphaedit", tiny_llama, f)
    assert hp["nullspace_threshold"] == 0.02 and hp["L2"] == 10.0 and hp["v_lr"] == 0.1
    assert any("P_loc" in n for n in hp["_notes"])


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batch_editors_refuse_requests_alone_and_edit_the_rest(tiny_llama, method, monkeypatch):
    hp = dict(FAST, layers=[1], mom2_update_weight=1.0) if method == "memit" else \
        dict(FAST, layers=[1], nullspace_threshold=2.0, L2=1.0)
    before = hashes(tiny_llama)
    with pytest.raises(EditRefused, match="every request of the batch was refused"):
        edit(tiny_llama, REQS, method, dict(hp, **dict(EXACT, preserve_min_free=0.999)))
    assert hashes(tiny_llama) == before
    # a threshold between the two requests' free shares refuses one and edits the other
    from knowedit.editing import memit
    seen = {}
    real = memit.free_share

    def spy(space, K):
        out = real(space, K)
        seen.setdefault("shares", out.clone())
        return out
    monkeypatch.setattr(memit, "free_share", spy)
    edit(tiny_llama, REQS, method, dict(hp, **EXACT)).undo()
    lo, hi = sorted(seen["shares"].tolist())
    e = edit(tiny_llama, REQS, method, dict(hp, **dict(EXACT, preserve_min_free=(lo + hi) / 2)))
    assert [r["position"] for r in e.info["refused"]] == [int(seen["shares"].argmin())]
    assert hashes(tiny_llama) != before
    e.undo()
