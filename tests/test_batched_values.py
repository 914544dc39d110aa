"""Batched δ optimisation (MEMIT's targets): each request of a batch gets the δ it gets alone, on tiny
GPT-2 and Llama models, with and without the cached columns before the subject."""
import pytest
import torch

from knowedit.editing import make_request
from knowedit.editing.batched_values import _layout, optimise_deltas
from knowedit.editing.keys_values import build_rows, optimise_delta, prefixes, stack_rows
from knowedit.editing.memit import MEMIT_DEFAULTS, memit_targets
from knowedit.editing.subject_aligned import align

# subjects at different positions and of different lengths, targets of one to three tokens
REQS = [make_request("The capital of {} is", "France", "Rome", "Paris"),
        make_request("{} plays the sport of", "Michael Jordan", "tennis", "basketball"),
        make_request("In {}, the language spoken is", "the Republic of Ireland", "Japanese language", "English"),
        make_request("The mother tongue of {} is", "Danielle Darrieux", "English", "French")]
HP = {**MEMIT_DEFAULTS, "layers": [1], "context_template_length_params": [[3, 2]], "v_num_grad_steps": 5,
      "v_loss_layer": -1, "v_stop_loss": 0.0}


def _rows(h, reqs, hp):
    return [build_rows(h, r, prefixes(h, hp), kl_prompts=hp["kl_prompts"]) for r in reqs]


def _alone(h, reqs, rows, hp):
    return [optimise_delta(h, r, rw, h.adapter.block(1), hp) for r, rw in zip(reqs, rows)]


def _close(batched, alone):
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4 * float(alone.norm()))


@pytest.mark.parametrize("cache", [True, False])
def test_batched_deltas_are_the_one_by_one_deltas(tiny, cache):
    hp = dict(HP, cache_before_subject=cache, clamp_norm_factor=0.3)
    rows = _rows(tiny, REQS, hp)
    assert len({int(r.subject_pos[0]) for r in rows}) > 1 and len({r.input_ids.shape[1] for r in rows}) > 1
    deltas, infos = optimise_deltas(tiny, rows, tiny.adapter.block(1), hp)
    alone = _alone(tiny, REQS, rows, hp)
    for d, info, (a, a_info) in zip(deltas, infos, alone):
        _close(d, a)
        assert info["steps"] == a_info["steps"] == HP["v_num_grad_steps"] - 1
        for k in ("nll", "kl", "weight_decay", "loss", "delta_norm", "v0_norm"):
            assert info[k] == pytest.approx(a_info[k], rel=1e-4, abs=1e-5), k
    assert all(i["kl"] > 0 and i["weight_decay"] > 0 for i in infos)
    # the clamp to clamp_norm_factor·‖v0‖ binds for some request
    assert any(i["delta_norm"] == pytest.approx(0.3 * i["v0_norm"], rel=1e-4) for i in infos)
    if cache:
        assert infos[0]["cached_columns"] == max(int(r.subject_pos.max()) for r in rows)


@pytest.mark.parametrize("cache", [True, False])
def test_a_request_that_stops_early_keeps_its_delta_while_the_others_go_on(tiny, cache):
    # without KL and weight decay the loss only falls; the stop level sits between the first two
    # losses of the request that starts lowest, so it stops after one step and the others never do
    hp = dict(HP, cache_before_subject=cache, kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=100.0)
    rows = _rows(tiny, REQS, hp)
    first = [i["loss"] for _, i in _alone(tiny, REQS, rows, dict(hp, v_num_grad_steps=1))]
    low = min(range(len(REQS)), key=first.__getitem__)
    second = _alone(tiny, REQS[low:low + 1], rows[low:low + 1], dict(hp, v_num_grad_steps=2))[0][1]["loss"]
    hp["v_stop_loss"] = (first[low] + second) / 2
    deltas, infos = optimise_deltas(tiny, rows, tiny.adapter.block(1), hp)
    alone = _alone(tiny, REQS, rows, hp)
    assert [i["steps"] for i in infos] == [1 if i == low else hp["v_num_grad_steps"] - 1 for i in range(len(REQS))]
    for d, info, (a, a_info) in zip(deltas, infos, alone):
        assert info["steps"] == a_info["steps"]
        _close(d, a)


def test_requests_differing_only_in_target_get_each_their_own_delta(tiny_llama):
    # identical rows but for the target: a row given another request's δ, or a loss reading another
    # request's target tokens or KL rows, would swap or mix the two δ's
    h = tiny_llama
    reqs = [make_request("The capital of {} is", "France", "Rome", "Paris"),
            make_request("The capital of {} is", "France", "Bank of Tokyo", "Paris"),
            make_request("{} plays the sport of", "Michael Jordan", "tennis", "basketball")]
    rows = _rows(h, reqs, HP)
    deltas, _ = optimise_deltas(h, rows, h.adapter.block(1), HP)
    alone = [d for d, _ in _alone(h, reqs, rows, HP)]
    for d, a in zip(deltas, alone):
        _close(d, a)
    assert (alone[0] - alone[1]).norm() > 0.1 * alone[0].norm()
    # and a request's δ does not depend on the batch it is in
    with_other, _ = optimise_deltas(h, [rows[0], rows[2]], h.adapter.block(1), HP)
    _close(with_other[0], deltas[0])


def test_layout_keeps_every_row_with_its_own_request(tiny_gpt2):
    h = tiny_gpt2
    rows = _rows(h, REQS, HP)
    batch = stack_rows(rows, h.tokenizer.pad_token_id)
    al = align(batch.input_ids, batch.attention_mask, batch.subject_pos, h.tokenizer.pad_token_id)
    lay = _layout(rows, [0, 2, 3], al.select(torch.tensor([i for i in range(16) if not 4 <= i < 8])))
    assert lay.row_req.tolist() == [0] * 4 + [2] * 4 + [3] * 4
    assert lay.onehot.sum().item() == 12 and (lay.onehot[:, 0] == 1).all()  # aligned: the subject is column 0
    for j, (t0, t1, k0, k1) in zip([0, 2, 3], lay.spans):
        r = rows[j]
        assert set(lay.row_req[lay.tr[t0:t1]].tolist()) == {j}
        assert lay.tid[t0:t1].tolist() == r.target_ids * r.n_context
        assert lay.row_req[lay.kl_rows[k0:k1]].tolist() == [j] * (r.input_ids.shape[0] - r.n_context)


def test_memit_targets_batches_and_returns_them_in_request_order(tiny_gpt2):
    h = tiny_gpt2
    hp = dict(HP, v_batch_size=3)
    targets, infos = memit_targets(h, REQS, hp)
    alone = _alone(h, REQS, _rows(h, REQS, hp), hp)
    for t, info, r, (a, a_info) in zip(targets, infos, REQS, alone):
        _close(t, a)
        assert info["case"] == r.label and info["top_layer"] == 1 and info["steps"] == a_info["steps"]
