"""FT-L / FT-M on tiny GPT-2 and Llama layouts: restriction is exact, undo is bit-exact, failures change nothing."""
import pytest
import torch

from knowedit.circuit import ParameterMask
from knowedit.editing import tensor_hash
from knowedit.editing.api import edit
from knowedit.editing.finetune import FT_M_DEFAULTS, finetune
from knowedit.editing.masking import pruned_elements
from knowedit.editing.request import make_request
from knowedit.errors import KnoweditError

FAST = {"num_steps": 3, "lr": 1e-2, "layers": [1], "early_stop_loss": 0.0}
REQ = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"}


def hashes(handle):
    return {n: tensor_hash(p) for n, p in handle.model.named_parameters()}


def circuit_mask(handle):
    return ParameterMask.from_components(handle, ["a1.h0", "a2.h3", "m0", "m2"], ports="qkvo")


@pytest.mark.parametrize("method", ["ft-l", "ft-m"])
@pytest.mark.parametrize("mode", ["none", "restrict", "ablate"])
def test_ft_modes_exact_and_undo(tiny, method, mode):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    h0 = hashes(tiny)
    mask = None if mode == "none" else circuit_mask(tiny)
    e = edit(tiny, [REQ], method=method, hparams=FAST, mask=mask, mode="restrict" if mode == "none" else mode)
    assert e.applied and e.info["optimizer_steps"] == 3
    after = dict(tiny.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the edit changed nothing"
    if mode == "none":
        a = tiny.adapter
        assert changed <= {a.name_of(p) for p in a.mlp_out(1).parameters()}
    else:
        allowed = {n: m.clone() for n, m in mask.tensors.items()}
        if mode == "ablate":
            for n, z in pruned_elements(mask).items():
                allowed[n] = allowed.get(n, torch.zeros_like(z)) | z
                assert torch.all(after[n].detach()[z & ~mask.tensors.get(n, torch.zeros_like(z))] == 0)
        for n in before:
            outside = ~allowed[n] if n in allowed else torch.ones_like(before[n], dtype=torch.bool)
            assert torch.equal(before[n][outside], after[n].detach()[outside]), f"{n} changed outside the mask"
        # something inside the mask itself was trained
        assert any(not torch.equal(before[n][m], after[n].detach()[m]) for n, m in mask.tensors.items())
    e.undo()
    assert hashes(tiny) == h0


def test_ft_restrict_with_weight_decay_keeps_outside_bit_identical(tiny):
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    mask = ParameterMask.from_components(tiny, ["m1"], mlp_neurons={1: [0, 5, 7]})
    with edit(tiny, [REQ], method="ft-m", hparams={**FAST, "weight_decay": 0.5}, mask=mask):
        for n, p in tiny.model.named_parameters():
            m = mask[n]
            outside = ~m if m is not None else torch.ones_like(p, dtype=torch.bool)
            assert torch.equal(before[n][outside], p.detach()[outside])
    assert all(torch.equal(before[n], p) for n, p in tiny.model.named_parameters())


def test_ft_l_norm_constraint_is_linf(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    with edit(tiny_llama, [REQ], method="ft-l", hparams={**FAST, "norm_constraint": 1e-3}) as e:
        for n, d in e.deltas.items():
            assert float(d.abs().max()) <= 1e-3 + 1e-7
            assert float(d.abs().max()) > 5e-4  # lr 1e-2 pushes every step to the clamp
    assert all(torch.equal(before[n], p) for n, p in tiny_llama.model.named_parameters())


def test_failure_mid_training_leaves_model_unchanged(tiny, monkeypatch):
    import knowedit.editing.finetune as ft

    h0 = hashes(tiny)
    calls = {"n": 0}
    real = ft.batch_loss

    def flaky(logits, b):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure mid-way")
        return real(logits, b)

    monkeypatch.setattr(ft, "batch_loss", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        edit(tiny, [REQ], method="ft-m", hparams=FAST, mask=circuit_mask(tiny), mode="ablate")
    assert hashes(tiny) == h0


def test_failed_sequential_edit_undoes_earlier_ones(tiny, monkeypatch):
    import knowedit.editing.finetune as ft

    h0 = hashes(tiny)
    real = ft.batch_loss

    def fail_on_second_request(logits, b):
        if b.input_ids.shape[1] > 6:  # the second request has the longer prompt
            raise RuntimeError("simulated failure in request 2")
        return real(logits, b)

    monkeypatch.setattr(ft, "batch_loss", fail_on_second_request)
    reqs = [REQ, {"prompt": "The Eiffel Tower stands in the city of", "subject": "Eiffel Tower",
                  "target_new": "London", "ground_truth": "Paris"}]
    with pytest.raises(RuntimeError, match="request 2"):
        edit(tiny, reqs, method="ft-m", hparams=FAST, sequential=True)
    assert hashes(tiny) == h0


def test_sequential_and_batched(tiny):
    h0 = hashes(tiny)
    reqs = [REQ, {"prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux", "target_new": "English",
                  "ground_truth": "French"}]
    seq = edit(tiny, reqs, method="ft-m", hparams=FAST, sequential=True)
    assert len(seq) == 2 and all(e.applied for e in seq)
    h_seq = hashes(tiny)
    seq.undo()
    assert hashes(tiny) == h0
    with edit(tiny, reqs, method="ft-m", hparams=FAST) as b:
        assert hashes(tiny) != h0
        # batched is one optimisation over both requests, not the sequence
        assert hashes(tiny) != h_seq and len(b.info["cases"]) == 2
    assert hashes(tiny) == h0


def test_same_inputs_same_edit(tiny):
    mask, req = circuit_mask(tiny), [make_request(REQ["prompt"], "France", "Rome")]
    e1 = finetune(tiny, req, {**FT_M_DEFAULTS, **FAST}, mask)
    e2 = finetune(tiny, req, {**FT_M_DEFAULTS, **FAST}, mask)
    assert {n: tensor_hash(v) for n, v in e1.new_values.items()} == {n: tensor_hash(v) for n, v in e2.new_values.items()}


def test_bad_input_changes_nothing(tiny):
    h0 = hashes(tiny)
    with pytest.raises(KnoweditError, match="ablate"):
        edit(tiny, [REQ], method="ft-m", hparams=FAST, mode="ablate")
    with pytest.raises(KnoweditError, match="subject"):
        edit(tiny, [{**REQ, "subject": "Spain"}], method="ft-m", hparams=FAST)
    with pytest.raises(KnoweditError, match="layers"):
        edit(tiny, [REQ], method="ft-l", hparams={**FAST, "layers": [7]})
    with pytest.raises(KnoweditError, match="mode"):
        edit(tiny, [REQ], method="ft-l", hparams=FAST, mode="prune")
    assert hashes(tiny) == h0


def test_mask_conditions_and_densities(tiny):
    from knowedit.circuit import Circuit
    from knowedit.editing.masking import describe_conditions, format_conditions, mask_conditions

    circuit = Circuit.from_components(tiny, ["a1.h0", "a2.h3", "m0"])
    conds = mask_conditions(tiny, circuit, seed=3)
    assert set(conds) == {"circuit", "complement", "random", "none"} and conds["none"] is None
    assert conds["random"].heads() != conds["circuit"].heads() or conds["random"].mlp_layers() != [0]
    assert len(conds["random"].heads()) == 2 and len(conds["random"].units.neurons) == tiny.adapter.d_mlp
    assert not set(conds["complement"].heads()) & set(conds["circuit"].heads())
    rows = {r["condition"]: r for r in describe_conditions(conds)}
    assert rows["complement"]["param_density"] > rows["circuit"]["param_density"] > 0
    assert rows["circuit"]["module_density"] > rows["circuit"]["param_density"]  # slices of big modules
    assert "by modules" in format_conditions(list(rows.values()))
    with_norms = mask_conditions(tiny, circuit, include_norms=True)["circuit"].density()
    assert with_norms["norm_share_of_mask"] > 0
