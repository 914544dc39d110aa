"""Learned mask circuits and WeightMask on tiny GPT-2 and Llama layouts."""
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

from knowedit.circuit import WeightMask
from knowedit.circuit.maskable import maskable_params
from knowedit.discovery.learned_mask import MaskSettings, evaluate_mask, learn_mask, run_mask_cli
from knowedit.editing.api import edit
from knowedit.editing.masking import describe_conditions, mask_conditions, pruned_elements
from knowedit.errors import KnoweditError

sys.path.insert(0, str(Path(__file__).parent))
from test_discovery_tiny import _task  # noqa: E402

FAST = dict(steps=6, batch_size=3)
REQ = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"}


def bits(handle):
    # Raw bits, so -0.0 vs +0.0 or a NaN payload would count as a change.
    return {n: p.detach().clone().view(torch.int32) for n, p in handle.model.named_parameters()}


def same_bits(handle, before):
    return all(torch.equal(p.detach().view(torch.int32), before[n]) for n, p in handle.model.named_parameters())


def no_hooks(handle):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in handle.model.modules())


def random_mask(handle, share=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return WeightMask(handle, {p.name: torch.rand(p.shape, generator=g) < share for p in maskable_params(handle)})


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_weight_mask_hits_target_density_and_model_is_bit_identical(tiny, ablation):
    task, before = _task(tiny.tokenizer), bits(tiny)
    r = learn_mask(tiny, task, MaskSettings(density=0.2, ablation=ablation, **FAST))
    d = r.mask.density()
    # top-k at exactly round(D * N): the maskable density is D up to one element
    assert abs(d["maskable_density"] - 0.2) <= 1 / d["maskable_params"]
    assert d["param_density"] < d["maskable_density"]   # embeddings are never masked
    assert len(r.curve) == 6 and r.curve[-1]["target_density"] == pytest.approx(0.2)
    assert same_bits(tiny, before) and no_hooks(tiny)
    assert math.isfinite(r.train["faithfulness"]) and r.train["ablation"] == ablation
    assert r.settings["final_rule"].startswith("top-k")


@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_unit_granularities_keep_the_unit_share(tiny_llama, granularity):
    a = tiny_llama.adapter
    r = learn_mask(tiny_llama, _task(tiny_llama.tokenizer), MaskSettings(granularity=granularity, density=0.25, **FAST))
    n_units = a.n_layers * (a.d_mlp if granularity == "neuron" else a.n_heads)
    assert sum(int(k.sum()) for k in r.keep) == round(0.25 * n_units)
    if granularity == "neuron":
        # the editors' view of a neuron mask is exactly the learned neurons
        for l in range(a.n_layers):
            assert r.mask.mlp_neurons(l).tolist() == r.neurons().get(l, [])
    else:
        assert len(r.heads()) == round(0.25 * n_units)
        assert {f"a{l}.h{h}" for l, h in r.mask.heads()} >= set(r.heads())


def test_exception_mid_training_leaves_model_and_hooks_untouched(tiny_llama):
    before = bits(tiny_llama)

    def boom(step, row):
        if step == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        learn_mask(tiny_llama, _task(tiny_llama.tokenizer), MaskSettings(density=0.3, ablation="mean", **FAST),
                   progress=boom)
    assert same_bits(tiny_llama, before) and no_hooks(tiny_llama)


def test_full_and_empty_masks_have_faithfulness_one_and_zero(tiny):
    task = _task(tiny.tokenizer)
    for ablation in ("zero", "mean"):
        assert evaluate_mask(tiny, task, WeightMask.full(tiny), ablation)["faithfulness"] == pytest.approx(1, abs=1e-4)
        empty = WeightMask.full(tiny).complement()
        if ablation == "zero":
            assert evaluate_mask(tiny, task, empty, ablation)["faithfulness"] == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("density", [0, 1, 1.5, -0.1, float("nan"), "0.1"])
def test_bad_density_is_refused_before_anything_is_written(tiny_gpt2, tmp_path, density):
    before, out = bits(tiny_gpt2), tmp_path / "c.json"
    with pytest.raises(KnoweditError, match="density"):
        run_mask_cli(tiny_gpt2, _task(tiny_gpt2.tokenizer), {"density": density, "out": str(out)})
    assert not list(tmp_path.iterdir()) and same_bits(tiny_gpt2, before)


@pytest.mark.parametrize("field,value", [("granularity", "edge"), ("mask_ablation", "patch")])
def test_unknown_granularity_or_ablation(tiny_gpt2, field, value):
    with pytest.raises(KnoweditError, match=value):
        run_mask_cli(tiny_gpt2, _task(tiny_gpt2.tokenizer), {"density": 0.1, field: value})


def test_sidecar_round_trip_is_bit_exact_and_deterministic(tiny, tmp_path):
    m = random_mask(tiny)
    sha = m.save(tmp_path / "c.mask.safetensors")
    assert sha == hashlib.sha256((tmp_path / "c.mask.safetensors").read_bytes()).hexdigest()
    assert m.save(tmp_path / "again.safetensors") == sha
    back = WeightMask.load(tmp_path / "c.mask.safetensors", sha, tiny)
    assert back == m and back.granularity == "weight"
    assert m.sidecar_entry("c.mask.safetensors", sha)["n_params"] == m.n_params()


def test_sidecar_missing_or_changed_is_an_error(tiny_llama, tmp_path):
    m = random_mask(tiny_llama)
    path = tmp_path / "c.mask.safetensors"
    sha = m.save(path)
    with pytest.raises(KnoweditError, match="missing"):
        WeightMask.load(tmp_path / "nope.mask.safetensors", sha, tiny_llama)
    wrong = "0" * 64
    with pytest.raises(KnoweditError, match=f"c.mask.safetensors.*{sha}.*{wrong}"):
        WeightMask.load(path, wrong, tiny_llama)


def test_mask_from_a_model_of_another_width_names_parameter_and_shapes(tiny_llama, gpt2_tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from knowedit.models.handle import ModelHandle
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                      intermediate_size=128, vocab_size=len(gpt2_tok), max_position_embeddings=128)
    wider = ModelHandle(LlamaForCausalLM(cfg), gpt2_tok, name="tiny-wide")
    path = tmp_path / "c.mask.safetensors"
    sha = random_mask(tiny_llama).save(path)
    with pytest.raises(KnoweditError, match=r"model.layers.0.mlp.down_proj.weight.*\(64, 96\).*\(64, 128\)"):
        WeightMask.load(path, sha, wider)


@pytest.mark.parametrize("same_layers", [False, True])
def test_random_like_matches_counts_per_matrix_type(tiny, same_layers):
    m = random_mask(tiny, 0.1)
    r = m.random_like(seed=3, same_layers=same_layers)
    assert r.count_by_type() == m.count_by_type()
    assert r != m
    if same_layers:
        assert all(int(r.tensors[n].sum()) == int(t.sum()) for n, t in m.tensors.items())
    types = set(m.count_by_type())
    assert "norm" in types and ("q" in types or "qkv" in types) and "down" in types


def test_density_reports_module_shares(tiny):
    d = random_mask(tiny, 0.3).density()
    assert set(d["share_of_mask"]) == {"attention", "mlp", "norm", "embedding"}
    assert d["share_of_mask"]["embedding"] == 0 and sum(d["share_of_mask"].values()) == pytest.approx(1)
    assert 0.25 < d["maskable_density"] < 0.35
    rows = describe_conditions(mask_conditions(tiny, random_mask(tiny, 0.3)))
    assert [r["condition"] for r in rows] == ["circuit", "complement", "random", "none"]


@pytest.mark.parametrize("mode", ["restrict", "ablate"])
def test_ft_l_with_a_weight_mask_changes_only_masked_elements(tiny, mode):
    mask = random_mask(tiny, 0.3)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    e = edit(tiny, [REQ], method="ft-l", hparams={"num_steps": 3, "lr": 1e-2, "early_stop_loss": 0.0,
                                                  "norm_constraint": None}, mask=mask, mode=mode)
    after = {n: p.detach() for n, p in tiny.model.named_parameters()}
    zero = pruned_elements(mask) if mode == "ablate" else {}
    for n in before:
        m = mask.tensors.get(n)
        outside = ~m if m is not None else torch.ones_like(before[n], dtype=torch.bool)
        if mode == "ablate" and n in zero:
            assert torch.all(after[n][zero[n]] == 0), f"{n}: ablate must zero what is outside the mask"
            outside = outside & ~zero[n]
        assert torch.equal(before[n][outside], after[n][outside]), f"{n} changed outside the mask"
    if mode == "ablate":   # every maskable element outside the mask is pruned, embeddings are not
        assert set(zero) == {p.name for p in maskable_params(tiny)}
    assert any(not torch.equal(before[n][m], after[n][m]) for n, m in mask.tensors.items())
    e.undo()
    assert all(torch.equal(before[n], p.detach()) for n, p in tiny.model.named_parameters())


def test_rome_view_of_a_sparse_weight_mask_is_only_whole_columns(tiny_llama):
    a = tiny_llama.adapter
    m = random_mask(tiny_llama, 0.5)
    assert m.mlp_layers() == []          # no down column is whole at random 50%
    t = dict(m.tensors)
    down = a.name_of(a.mlp_out(1).weight)
    t[down] = t[down].clone()
    t[down][:, [3, 7]] = True
    m2 = WeightMask(tiny_llama, t)
    assert m2.mlp_layers() == [1] and m2.mlp_neurons(1).tolist() == [3, 7]


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_learned_mask_circuit_file_round_trip(tiny_llama, tmp_path, granularity):
    from knowedit.circuit import Circuit

    out = tmp_path / "c.json"
    c = run_mask_cli(tiny_llama, _task(tiny_llama.tokenizer),
                     {"granularity": granularity, "density": 0.25, "out": str(out), **FAST})
    c.save(out)
    again = Circuit.load(out, tiny_llama)
    m = again.parameter_mask(tiny_llama)
    if granularity == "weight":
        # the circuit's mask is the sidecar's, bit for bit
        assert isinstance(m, WeightMask) and m == WeightMask.load(out.parent / c.extra["weight_mask"]["file"],
                                                                   c.extra["weight_mask"]["sha256"], tiny_llama)
        (out.parent / c.extra["weight_mask"]["file"]).write_bytes(b"changed")
        with pytest.raises(KnoweditError, match="sha256|hash"):
            Circuit.load(out, tiny_llama).parameter_mask(tiny_llama)
    else:
        # neurons are stored per MLP in the circuit itself; every head stays
        a = tiny_llama.adapter
        assert again.n_neurons() == round(0.25 * a.n_layers * a.d_mlp) and len(again.heads()) == a.n_layers * a.n_heads
        assert all(m.mlp_neurons(l).tolist() == again.layer_neurons(l) for l in range(a.n_layers))
