"""MLP neurons as components (``m{L}.n{i}``) on tiny random GPT-2 (Conv1D) and Llama (gated, GQA)
models: names, hooks, circuits, parameter masks and neuron-level attribution."""
import json

import pytest
import torch

from knowedit.circuit import Circuit
from knowedit.discovery import discover
from knowedit.discovery.neuron_attribution import exact_neuron_scores, neuron_attribution_scores
from knowedit.discovery.neuron_evaluate import NeuronEvaluator
from knowedit.discovery.reference import Reference, _recorded
from knowedit.errors import KnoweditError
from knowedit.hooks import ablate, hook_count, record, steer_neurons
from knowedit.models import components as C

from test_discovery_tiny import _spearman, _task


def test_neuron_names_parse_and_validate(tiny):
    c = C.parse("m4.n123")
    assert (c.kind, c.layer, c.index, c.name) == ("neuron", 4, 123, "m4.n123")
    d = tiny.adapter.d_mlp
    assert tiny.component(f"m2.n{d - 1}").index == d - 1
    with pytest.raises(KnoweditError, match=f"{d} wide"):
        tiny.component(f"m1.n{d}")
    with pytest.raises(KnoweditError, match="not single neurons"):
        C.parse("m1.n3->m2") and tiny.component("m1.n3->m2")
    assert sorted([C.parse("m1.n5"), C.parse("m1"), C.parse("a1.h0"), C.parse("m0.n9")],
                  key=C.Component.sort_key) == [C.parse("m0.n9"), C.parse("a1.h0"), C.parse("m1"), C.parse("m1.n5")]


def _manual_neurons(h, layer, batch):
    """The down projection's input computed by hand from the block's MLP input."""
    a = h.adapter
    store = {}
    hook = a.mlp(layer).register_forward_pre_hook(lambda m, args: store.setdefault("x", args[0]))
    with torch.no_grad():
        h.forward(batch)
    hook.remove()
    x, mlp = store["x"], a.mlp(layer)
    if a.family == "gpt2":
        return mlp.act(mlp.c_fc(x))
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def test_record_reads_the_down_projection_input_with_one_hook_per_mlp(tiny):
    b = tiny.tokenize(["When Mary and John went to the store", "A short one"])
    before = hook_count(tiny.model)
    with record(tiny, ["m1.n3", "m1.n7", "m2.n0"]) as rec:
        assert hook_count(tiny.model) == before + 2
        with torch.no_grad():
            tiny.forward(b)
    assert hook_count(tiny.model) == before
    want = _manual_neurons(tiny, 1, b)
    assert torch.allclose(rec["m1.n7"], want[..., 7], atol=1e-6)
    assert rec.neurons[1].shape[-1] == tiny.adapter.d_mlp


def test_ablating_a_neuron_changes_only_that_neuron_and_steering_adds(tiny):
    b = tiny.tokenize(["When Mary and John went to the store"])
    with torch.no_grad(), record(tiny, ["m1.n0"]) as clean:
        tiny.forward(b)
    with torch.no_grad(), ablate(tiny, ["m1.n3"], how="zero"), record(tiny, ["m1.n0"]) as r:
        tiny.forward(b)
    diff = (r.neurons[1] - clean.neurons[1]).abs().amax((0, 1))
    assert float(diff[3]) > 0 and float(r.neurons[1][..., 3].abs().max()) == 0.0
    assert float(torch.cat([diff[:3], diff[4:]]).max()) == 0.0
    with torch.no_grad(), steer_neurons(tiny, {"m1.n5": 2.5}), record(tiny, ["m1.n0"]) as s:
        tiny.forward(b)
    assert torch.allclose(s.neurons[1][..., 5], clean.neurons[1][..., 5] + 2.5, atol=1e-6)


class SmallStepNeurons(Reference):
    """A reference a small step from the clean activations towards the corrupted ones, neurons
    included, where a first-order estimate should agree with exact patching."""

    def __init__(self, handle, task, eps=0.05):
        super().__init__(handle, task, "patch", neurons=True)
        self.eps = eps

    def for_batch(self, start, batch):
        corr = super().for_batch(start, batch)
        with torch.no_grad(), record(self.handle, _recorded(self.handle, True), resid=True) as rec:
            self.handle.forward(batch)
        clean = {"z": rec.z, "mlp": rec.mlp, "emb": {0: rec.resid[0]}, "neuron": rec.neurons}
        return {k: {l: clean[k][l] + self.eps * (corr[k][l] - clean[k][l]) for l in corr[k]} for k in corr}


def test_neuron_eap_matches_exact_neuron_patching_in_sign_and_ranking(tiny):
    task = _task(tiny.tokenizer)
    ev = NeuronEvaluator(tiny, task, ablation="patch")
    ev.reference = SmallStepNeurons(tiny, task)
    ev._refs.clear()
    eap = neuron_attribution_scores(ev, "eap")
    d = tiny.adapter.d_mlp
    # every neuron of the middle layer and the 20 largest estimates elsewhere
    cand = [(1, i) for i in range(d)] + [(int(x) // d, int(x) % d) for x in eap.abs().flatten().argsort()[-20:]]
    cand = sorted(set(cand))
    exact = exact_neuron_scores(ev, cand)
    est = [float(eap[l, i]) for l, i in cand]
    assert _spearman(est, exact) > 0.9
    big = [k for k, y in enumerate(exact) if abs(y) > 0.1 * max(map(abs, exact))]
    assert big and all((est[k] > 0) == (exact[k] > 0) for k in big)
    assert max(range(len(cand)), key=lambda k: abs(est[k])) == max(range(len(cand)), key=lambda k: abs(exact[k]))


def test_neuron_faithfulness_is_one_for_all_and_zero_for_none(tiny):
    ev = NeuronEvaluator(tiny, _task(tiny.tokenizer))
    d = tiny.adapter.d_mlp
    assert ev.faithfulness({l: range(d) for l in range(tiny.adapter.n_layers)}) == pytest.approx(1.0, abs=1e-6)
    assert ev.faithfulness({}) == pytest.approx(0.0, abs=1e-9)


def test_discover_at_neuron_level_writes_a_compact_circuit(tiny, tmp_path):
    task = _task(tiny.tokenizer)
    c = discover(tiny, task, method="eap", level="neuron", top_k=10, prune=False, verify=5)
    assert c.n_neurons() == 10 and c.method["level"] == "neuron"
    assert len(c.extra["verification"]["exact"]) == 5
    assert len(c.extra["neuron_scores"]["m0"]) == tiny.adapter.d_mlp
    path = c.save(tmp_path / "n.json")
    d = json.loads(path.read_text())
    assert d["schema_version"] == 2
    assert sum(len(v["index"]) for v in d["neurons"].values()) == 10
    assert not any(".n" in k for k in d["nodes"])            # neurons are not one JSON key each
    again = Circuit.load(path, tiny)
    assert {l: set(v) for l, v in again.neurons.items()} == {l: set(v) for l, v in c.neurons.items()}
    assert again.to_json() == c.to_json()
    name = again.neuron_names()[0]
    assert name in again and again.top_neurons(0, 0.5)[:1]
    per = discover(tiny, task, method="eap", level="neuron", selection="per-layer", per_layer_k=3, prune=False,
                   verify=0)
    assert all(len(v) == 3 for v in per.neurons.values()) and len(per.neurons) == tiny.adapter.n_layers


def test_neuron_parameter_mask_is_column_of_down_and_row_of_up_and_gate(tiny):
    c = Circuit.from_components(tiny, ["m1.n3", "m1.n7"])
    assert c.layer_neurons(1) == [3, 7] and not c.nodes
    mask = c.parameter_mask(tiny)
    a = tiny.adapter
    down = a.mlp_out(1)
    m = mask[a.name_of(down.weight)]
    if a.family == "gpt2":     # Conv1D c_proj stores [in = d_mlp, out = d_model]: neuron i is row i
        assert m.shape == (a.d_mlp, a.d_model) and m[3].all() and m[7].all() and int(m.sum()) == 2 * a.d_model
        fc = mask[a.name_of(a.mlp_in(1)[0].weight)]   # c_fc [d_model, d_mlp]: column i
        assert fc[:, 3].all() and int(fc.sum()) == 2 * a.d_model
        assert mask[a.name_of(a.mlp_in(1)[0].bias)][[3, 7]].all()
    else:                      # nn.Linear down_proj [d_model, d_mlp]: column i; gate/up [d_mlp, d_model]: row i
        assert m[:, 3].all() and m[:, 7].all() and int(m.sum()) == 2 * a.d_model
        for mod in a.mlp_in(1):
            w = mask[a.name_of(mod.weight)]
            assert w[3].all() and w[7].all() and int(w.sum()) == 2 * a.d_model
    assert mask.mlp_neurons(1).tolist() == [3, 7] and mask.mlp_layers() == [1]


def test_neuron_circuit_set_algebra_and_controls(tiny):
    d = tiny.adapter.d_mlp
    a = Circuit.from_components(tiny, ["a0.h1", "m1.n3", "m1.n7", "m2.n1"])
    b = Circuit.from_components(tiny, ["m1.n7", "m2"])
    assert (a | b).layer_neurons(1) == [3, 7] and "m2" in (a | b).mlps()
    assert (a & b).neuron_names() == ["m1.n7", "m2.n1"]
    assert (a - b).neuron_names() == ["m1.n3"]
    comp = a.complement()
    assert len(comp.layer_neurons(1)) == d - 2 and "m1" not in comp.mlps() and "m0" in comp.mlps()
    assert "a0.h1" not in comp.heads()
    r = a.random_like(seed=1)
    assert r.n_neurons() == 3
    r2 = a.random_like(seed=1, same_layers=True)
    assert {l: len(v) for l, v in r2.neurons.items()} == {1: 2, 2: 1}


def test_neuron_circuit_on_a_model_of_another_width_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    c = Circuit.from_components(tiny_llama, ["m1.n3"])
    with pytest.raises(KnoweditError, match="wide"):
        c.parameter_mask(tiny_gpt2)
    d = c.to_dict()
    d["neurons"]["m1"]["index"] = [10_000]
    with pytest.raises(KnoweditError, match="out of range"):
        Circuit.from_dict(d)


def test_version_1_circuit_files_still_load(tiny):
    d = Circuit.from_components(tiny, ["a0.h1", "m2"]).to_dict()
    d["schema_version"] = 1
    del d["neurons"]
    del d["model"]["d_mlp"]
    c = Circuit.from_dict(d)
    assert c.heads() == ["a0.h1"] and c.mlps() == ["m2"] and c.n_neurons() == 0


def test_rome_through_a_neuron_circuit_writes_only_its_columns(tiny):
    from knowedit.editing import make_request
    from knowedit.editing.rome import apply_rome

    c = Circuit.from_components(tiny, ["m1.n2", "m1.n9", "m1.n30", "m0.n4"])
    mask = c.parameter_mask(tiny)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    hp = {"mom2_dataset": "identity", "context_template_length_params": [[3, 2]], "v_num_grad_steps": 3,
          "max_update_ratio": 1e3, "layers": [1]}
    e = apply_rome(tiny, [make_request("The capital of {} is", "France", "Rome", "Paris")], hp, mask=mask)
    name = tiny.adapter.name_of(tiny.adapter.mlp_out(1).weight)
    key_dim = tiny.adapter.in_dim(tiny.adapter.mlp_out(1))
    touched = (e.deltas[name] != 0).any(dim=1 - key_dim).nonzero().flatten().tolist()
    assert touched == [2, 9, 30]
    assert [n for n, p in tiny.model.named_parameters() if not torch.equal(p, before[n])] == [name]
    e.undo()
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())


def test_iterative_pruning_reaches_the_target_with_fewer_neurons(tiny_llama):
    task = _task(tiny_llama.tokenizer)
    c = discover(tiny_llama, task, method="eap", level="neuron", selection="iterative", target=0.8, verify=0)
    n_all = tiny_llama.adapter.n_layers * tiny_llama.adapter.d_mlp
    assert c.faithfulness >= 0.8 and 0 < c.n_neurons() < n_all
    hist = c.extra["pruning_history"]
    assert hist[0]["kept"] == n_all - int(0.3 * n_all)
    # re-measured independently of the pruning loop
    ev = NeuronEvaluator(tiny_llama, task.with_bos(c.task["bos"], tiny_llama.tokenizer))
    assert ev.faithfulness(c.neurons) == pytest.approx(c.faithfulness, abs=1e-6)
