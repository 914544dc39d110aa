"""Models spread by accelerate: layers whose weights live in a CPU offload map or in disk memory maps
(empty ``meta`` parameters between forwards) give the same activations, attributions and edits as the
undispatched model, undo is bit-exact there, and save_pretrained writes the edited weights. Also: an
Edit holds only what it changes."""
import copy

import pytest
import torch

from knowedit.circuit.mask import ParameterMask
from knowedit.discovery import Evaluator, attribution_scores
from knowedit.editing import make_request, tensor_hash
from knowedit.editing.memit import apply_memit
from knowedit.editing.rome import apply_rome
from knowedit.hooks import ablate, patch, record
from knowedit.hooks.steer import steer_attention
from knowedit.models.handle import ModelHandle
from knowedit.models.weights import is_offloaded, read_param, write_param
from knowedit.tasks import Task

FAST = {"mom2_dataset": "identity", "context_template_length_params": [[3, 2]], "v_num_grad_steps": 3,
        "max_update_ratio": 1e3}
REQS = [make_request("The capital of {} is", "France", "Rome", "Paris"),
        make_request("{} plays the sport of", "Michael Jordan", "tennis", "basketball")]
PROMPTS = ["When Mary and John went to the store, John gave a book to",
           "After Anna and Paul arrived at the park, Paul handed a pen to"]
CORRUPT = ["When Mary and John went to the store, Lisa gave a book to",
           "After Anna and Paul arrived at the park, Eric handed a pen to"]


def _dispatch(handle, folder, layout=("cpu", "disk", "dict")) -> ModelHandle:
    """A copy of ``handle`` with layer i's weights kept as ``layout[i]`` says, the ways accelerate keeps
    offloaded weights: ``cpu``, in the CPU offload map of a model dispatched onto a GPU
    (OffloadedWeightsLoader.state_dict); ``disk``, in .dat memory maps; ``checkpoint``, read from the
    model's own safetensors file (an index entry naming it); ``dict``, under ``cpu_offload`` (a plain
    dict). Every execution device is the CPU, the only device this test can count on."""
    import json

    from accelerate import cpu_offload
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader, extract_submodules_state_dict, offload_state_dict
    from safetensors.torch import save_file

    model = copy.deepcopy(handle.model)
    mods = {kind: [f"{handle.adapter.layers_path}.{i}" for i, k in enumerate(layout) if k == kind]
            for kind in ("cpu", "disk", "checkpoint", "dict")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    offload_state_dict(str(folder), extract_submodules_state_dict(state, mods["disk"]))
    index = json.loads((folder / "index.json").read_text()) if mods["disk"] else {}
    ckpt = extract_submodules_state_dict(state, mods["checkpoint"])
    if ckpt:
        save_file(ckpt, str(folder / "model.safetensors"))
        index.update({k: {"safetensors_file": str(folder / "model.safetensors"), "weight_name": k,
                          "dtype": str(v.dtype).split(".")[1]} for k, v in ckpt.items()})
    loader = OffloadedWeightsLoader(state_dict=extract_submodules_state_dict(state, mods["cpu"]),
                                    save_folder=str(folder), index=index)
    hooked = mods["cpu"] + mods["disk"] + mods["checkpoint"]
    attach_align_device_hook_on_blocks(model, execution_device={"": "cpu", **{m: "cpu" for m in hooked}},
                                       offload={"": False, **{m: True for m in hooked}}, weights_map=loader,
                                       tied_params_map={})
    for m in mods["dict"]:
        cpu_offload(model.get_submodule(m), execution_device="cpu")
    return ModelHandle(model, handle.tokenizer, name=handle.name)


@pytest.fixture
def pair(tiny, tmp_path):
    """(undispatched, dispatched) copies of one tiny model."""
    return tiny, _dispatch(tiny, tmp_path / "offload")


def down(h, layer):
    return h.adapter.name_of(h.adapter.mlp_out(layer).weight)


def values(h):
    return {n: read_param(h.model, n).clone() for n, _ in h.model.named_parameters()}


def test_the_layout_offloads_what_it_claims(pair):
    ref, d = pair
    names = [down(d, l) for l in range(3)]
    assert all(d.model.get_parameter(n).is_meta for n in names)
    assert all(is_offloaded(d.model, n) for n in names) and not any(is_offloaded(ref.model, n) for n in names)
    assert {n: tensor_hash(v) for n, v in values(d).items()} == {n: tensor_hash(v) for n, v in values(ref).items()}
    assert d.fingerprint == ref.fingerprint


def test_slices_are_read_and_written_where_each_weight_lives(pair):
    ref, d = pair
    batch = d.tokenize(PROMPTS)
    for layer in range(3):
        name = down(d, layer)
        dim = d.adapter.in_dim(d.adapter.mlp_out(layer))
        idx = torch.tensor([1, 4, 7])
        old = read_param(d.model, name, dim, idx)
        assert torch.equal(old, read_param(ref.model, name).index_select(dim, idx))
        write_param(d.model, name, torch.zeros_like(old), dim, idx)
        write_param(ref.model, name, torch.zeros_like(old), dim, idx)
        assert torch.equal(d.forward(batch), ref.forward(batch))   # the next forward computes with it
        write_param(d.model, name, old, dim, idx)
        write_param(ref.model, name, old, dim, idx)
    assert {n: tensor_hash(v) for n, v in values(d).items()} == {n: tensor_hash(v) for n, v in values(ref).items()}


def test_record_patch_ablate_and_steer_match_the_undispatched_model(pair):
    ref, d = pair
    out = []
    for h in (ref, d):
        clean, corrupt = h.tokenize(PROMPTS), h.tokenize(CORRUPT)
        with torch.no_grad():
            comps = ["a0.h1", "a1.h2", "a2.h0", "m1", "m2", "m2.n5"]
            with record(h, comps, resid=True) as rec:
                h.forward(clean)
            with patch(h, rec, ["a0.h1", "a1.h2", "a2.h0", "m1", "m2.n5"]):
                patched = h.last_logits(corrupt)
            with ablate(h, ["a1.h0", "m0", "m2.n3"], how="mean", reference=PROMPTS):
                ablated = h.last_logits(clean)
            dist = torch.zeros(len(PROMPTS), clean.input_ids.shape[1])
            dist[:, 0] = 1.0
            with steer_attention(h, {"a1.h1": dist, "a2.h3": dist}, clean.last):
                steered = h.last_logits(clean)
            head_out = rec.head_out(1, 2)   # reads W_O of an offloaded layer
        out.append([rec.z[1], rec.mlp[2], rec.resid[3], patched, ablated, steered, head_out])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_node_eap_scores_match_the_undispatched_model(pair):
    ref, d = pair
    scores = []
    for h in (ref, d):
        t = lambda w, h=h: h.token_id(" " + w)
        task = Task("tiny-ioi", PROMPTS, CORRUPT, [t("Mary"), t("Anna")], [t("John"), t("Paul")])
        scores.append(attribution_scores(Evaluator(h, task, ablation="patch", candidates="nodes"), "eap"))
    assert scores[0].keys() == scores[1].keys()
    for n in scores[0]:
        assert scores[1][n] == pytest.approx(scores[0][n], rel=1e-5, abs=1e-7), n


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", ["cpu", "disk", "checkpoint", "dict"])
def test_rome_on_an_offloaded_layer_matches_and_undoes_bit_exactly(tiny, tmp_path, kind):
    layer = 1
    folder = tmp_path / "offload"
    ref, d = tiny, _dispatch(tiny, folder, layout=["cpu" if kind != "cpu" else "dict", kind, "disk"])
    ckpt = folder / "model.safetensors"
    ckpt_bytes = ckpt.read_bytes() if ckpt.exists() else None
    before = {n: tensor_hash(v) for n, v in values(d).items()}
    e_ref = apply_rome(ref, REQS, dict(FAST, layers=[layer]))
    e = apply_rome(d, REQS, dict(FAST, layers=[layer]))
    name = down(d, layer)
    want = read_param(ref.model, name).clone()
    assert _rel(read_param(d.model, name), want) < 1e-5
    assert d.model.get_parameter(name).is_meta   # edited in the offload map, still offloaded
    batch = d.tokenize(PROMPTS)
    torch.testing.assert_close(d.last_logits(batch), ref.last_logits(batch), rtol=1e-5, atol=1e-5)
    got = read_param(d.model, name).clone()
    e.undo()
    e_ref.undo()
    assert {n: tensor_hash(v) for n, v in values(d).items()} == before
    e.apply()   # and again: the rank-one factors give the same bits every time
    assert tensor_hash(read_param(d.model, name)) == tensor_hash(got)
    e.undo()
    assert {n: tensor_hash(v) for n, v in values(d).items()} == before
    if ckpt_bytes is not None:   # the model's own checkpoint is never written
        assert ckpt.read_bytes() == ckpt_bytes


def test_memit_across_offloaded_layers_matches_and_undoes_bit_exactly(pair):
    ref, d = pair
    hp = dict(FAST, layers=[0, 1], mom2_update_weight=1.0)
    before = {n: tensor_hash(v) for n, v in values(d).items()}
    e_ref = apply_memit(ref, REQS, hp)
    e = apply_memit(d, REQS, hp)
    for layer in range(2):
        name = down(d, layer)
        assert _rel(read_param(d.model, name), read_param(ref.model, name)) < 1e-5, layer
        assert _rel(e.deltas[name], e_ref.deltas[name]) < 1e-4, layer
    e.undo()
    e_ref.undo()
    assert {n: tensor_hash(v) for n, v in values(d).items()} == before


def test_apply_on_a_dispatched_model_is_all_or_nothing(pair, monkeypatch):
    import importlib

    from knowedit.editing import Edit
    edit_mod = importlib.import_module("knowedit.editing.edit")   # the package's ``edit`` is a function

    _, d = pair
    before = values(d)
    names = [down(d, 0), down(d, 1)]   # CPU offload map, then disk
    e = Edit(d, {n: before[n] * 2 for n in names}, "test")
    real, calls = edit_mod.write_param, []

    def failing(model, name, value, dim=None, index=None):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(model, name, value, dim, index)

    monkeypatch.setattr(edit_mod, "write_param", failing)
    with pytest.raises(OSError):
        e.apply()
    monkeypatch.setattr(edit_mod, "write_param", real)
    assert not e.applied
    assert all(torch.equal(read_param(d.model, n), v) for n, v in before.items())


def test_a_masked_rome_edit_on_an_offloaded_layer_writes_only_the_masked_columns(pair):
    ref, d = pair
    before = values(d)
    mask = ParameterMask.from_components(d, ["m1"], mlp_neurons={1: [2, 5, 11]})
    e = apply_rome(d, REQS, dict(FAST, layers=[1]), mask=mask)
    name = down(d, 1)
    dim = d.adapter.in_dim(d.adapter.mlp_out(1))
    diff = (read_param(d.model, name) != before[name]).any(dim=1 - dim).nonzero().flatten().tolist()
    assert diff == [2, 5, 11]
    e.undo()
    assert all(torch.equal(read_param(d.model, n), v) for n, v in before.items())


def test_save_pretrained_of_an_edited_dispatched_model_writes_the_edit(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    ref, d = pair
    e = apply_rome(d, REQS, dict(FAST, layers=[1]))
    want = values(d)
    d.save_pretrained(tmp_path / "saved")
    e.undo()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    got = dict(back.named_parameters())
    assert {n: tensor_hash(got[n]) for n in want} == {n: tensor_hash(v) for n, v in want.items()}
    assert not torch.equal(want[down(d, 1)], read_param(d.model, down(d, 1)))


# ---- what an Edit holds ---------------------------------------------------------------------------------
def _matrix_bytes(h, name):
    p = h.model.get_parameter(name)
    return p.numel() * p.element_size()


def test_a_masked_edit_keeps_only_the_masked_columns(tiny):
    before = values(tiny)
    mask = ParameterMask.from_components(tiny, ["m1"], mlp_neurons={1: [2, 5, 11]})
    e = apply_memit(tiny, REQS, dict(FAST, layers=[1], mom2_update_weight=1.0), mask=mask)
    name = down(tiny, 1)
    c = e.changes[name]
    assert c.dim == tiny.adapter.in_dim(tiny.adapter.mlp_out(1)) and c.index.tolist() == [2, 5, 11]
    assert e.nbytes < 0.1 * _matrix_bytes(tiny, name)
    # the full-tensor views are still there for the code that reads them
    assert torch.equal(e.originals[name], before[name])
    assert torch.equal(e.new_values[name], read_param(tiny.model, name))
    assert torch.equal(e.deltas[name], e.new_values[name] - e.originals[name])
    e.undo()
    assert all(torch.equal(read_param(tiny.model, n), v) for n, v in before.items())


def test_an_edit_of_a_full_tensor_keeps_only_the_rows_that_differ(tiny):
    from knowedit.editing import Edit

    name = tiny.adapter.name_of(tiny.adapter.o_proj(2).weight)
    before = values(tiny)
    new = before[name].clone()
    dim = tiny.adapter.in_dim(tiny.adapter.o_proj(2))
    d_head = tiny.adapter.d_head
    new.narrow(dim, d_head, d_head).mul_(-2.0)   # head 1's slice of W_O
    e = Edit(tiny, {name: new}, "test").apply()
    c = e.changes[name]
    assert c.dim == dim and c.index.tolist() == list(range(d_head, 2 * d_head))
    assert e.nbytes <= 2 * d_head / new.shape[dim] * _matrix_bytes(tiny, name) + 1024
    assert torch.equal(read_param(tiny.model, name), new)
    e.undo()
    assert tensor_hash(read_param(tiny.model, name)) == tensor_hash(before[name])


def test_values_before_a_sequence_undo_each_edit_in_reverse(tiny):
    from knowedit.editing import Edit
    from knowedit.editing.edit import values_before

    name = down(tiny, 1)
    dim = tiny.adapter.in_dim(tiny.adapter.mlp_out(1))
    before = read_param(tiny.model, name).clone()
    first = before.clone()
    first.narrow(dim, 0, 2).add_(1.0)
    e1 = Edit(tiny, {name: first}, "test").apply()
    second = first.clone()
    second.narrow(dim, 5, 3).mul_(3.0)
    e2 = Edit(tiny, {name: second}, "test").apply()
    assert e1.changes[name].index.tolist() == [0, 1] and e2.changes[name].index.tolist() == [5, 6, 7]
    assert torch.equal(values_before([e1, e2])[name], before)
    e2.undo()
    e1.undo()
    assert torch.equal(read_param(tiny.model, name), before)


def test_rome_keeps_the_matrix_once_and_its_rank_one_factors(tiny):
    e = apply_rome(tiny, REQS, dict(FAST, layers=[1]))
    name = down(tiny, 1)
    c = e.changes[name]
    assert c.factors is not None and len(c.factors) == len(REQS)
    assert e.nbytes < 1.2 * _matrix_bytes(tiny, name)
    e.undo()


# ---- the default model, two layers on disk including ROME's edit layer --------------------------------------
@pytest.mark.slow
def test_rome_on_the_default_model_with_its_edit_layer_on_disk_matches(smol, tmp_path):
    from pathlib import Path

    import yaml

    from knowedit import load_model
    from knowedit.editing.rome import ROME_DEFAULTS

    hp = {**ROME_DEFAULTS, **yaml.safe_load((Path(__file__).resolve().parents[1] / "editors" / "rome" /
                                             "smollm2-135m.yaml").read_text())}
    layer = hp["layers"][0]
    d = load_model(device_map={"": "cpu", f"model.layers.{layer}": "disk", f"model.layers.{layer + 1}": "disk"},
                   offload_folder=str(tmp_path / "offload"))
    name = down(d, layer)
    assert d.model.get_parameter(name).is_meta and d.fingerprint == smol.fingerprint   # so the cached statistics apply
    req = [make_request("The capital of {} is", "France", "London", "Paris")]
    e_ref = apply_rome(smol, req, hp)
    try:
        want = read_param(smol.model, name).clone()
    finally:
        e_ref.undo()
    before = tensor_hash(read_param(d.model, name))
    e = apply_rome(d, req, hp)
    assert _rel(read_param(d.model, name), want) < 1e-5
    london = d.token_id(" London")
    assert int(d.next_token_probs(["The capital of France is"])[0].argmax()) == london
    e.undo()
    assert tensor_hash(read_param(d.model, name)) == before
