"""The hparams loader and the dispatcher's errors (no model forward needed)."""
import pytest

from knowedit.editing.finetune import FT_L_DEFAULTS
from knowedit.editing.hparams import editors_dir, load_hparams, model_key
from knowedit.errors import KnoweditError

EASYEDIT_FT_GPT2XL = """alg_name: "FT"
model_name: "./hugging_cache/gpt2-xl"
device: 4

layers: [0]
num_steps: 25
batch_size: 3
max_length: 40
lr: 5e-4
weight_decay: 0
kl_factor: 0
norm_constraint: 5e-4
objective_optimization: "prompt_last"
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
model_parallel: false
"""


def test_default_model_file_is_read():
    assert editors_dir() is not None
    hp = load_hparams("ft-m", "SmolLM2-135M-Instruct")
    assert any("smollm2-135m.yaml" in s for s in hp["_sources"])
    assert hp["objective_optimization"] == "target_new"


def test_model_keys():
    assert model_key(None) == "smollm2-135m"
    assert model_key("EleutherAI/gpt-j-6B") == "gpt-j-6b"
    hp = load_hparams("ft-l", "meta-llama/Llama-2-7b-hf")  # -hf stripped to find llama-2-7b.yaml
    assert hp["layers"] == [21] and hp["norm_constraint"] is None
    assert load_hparams("ft-l", "gpt2-xl")["norm_constraint"] == 5e-4


def test_easyedit_file_loads_with_notes(tmp_path):
    f = tmp_path / "gpt2-xl.yaml"
    f.write_text(EASYEDIT_FT_GPT2XL)
    hp = load_hparams("ft-l", "gpt2-xl", f)
    assert hp["lr"] == 5e-4 and isinstance(hp["lr"], float)  # YAML reads 5e-4 as a string
    assert hp["batch_size"] == 3 and hp["rewrite_module_tmp"] == "transformer.h.{}.mlp.c_proj"
    notes = " ".join(hp["_notes"])
    for field in ("model_name", "device", "ln_f_module", "model_parallel"):
        assert field in notes


def test_typo_field_is_an_error_naming_it(tmp_path):
    with pytest.raises(KnoweditError, match=r"'num_step'.*did you mean 'num_steps'"):
        load_hparams("ft-m", None, {"num_step": 10})
    f = tmp_path / "h.yaml"
    f.write_text("layers: [3]\nnorm_constriant: 1e-3\n")
    with pytest.raises(KnoweditError, match=r"norm_constriant.*norm_constraint"):
        load_hparams("ft-l", None, f)


def test_bad_values_and_mismatched_files():
    with pytest.raises(KnoweditError, match="'lr'"):
        load_hparams("ft-l", None, {"lr": "fast"})
    with pytest.raises(KnoweditError, match="alg_name"):
        load_hparams("ft-l", None, {"alg_name": "MEMIT"})
    with pytest.raises(KnoweditError, match="ft-m"):
        load_hparams("ft-l", None, {"objective_optimization": "target_new"})
    with pytest.raises(KnoweditError, match="method"):
        load_hparams("sgd", None)
    hp = load_hparams("FT_L", None, {"layers": 4, "norm_constraint": False})
    assert hp["layers"] == [4] and hp["norm_constraint"] is None
    assert load_hparams("ft-m", None, {"norm_constraint": "1e-3"})["norm_constraint"] == 1e-3
    assert set(FT_L_DEFAULTS) <= set(hp)


def test_unavailable_editor_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("knowedit.editing.memit") is not None:
        pytest.skip("MEMIT is present on this branch")
    with pytest.raises(KnoweditError, match="not available"):
        load_hparams("memit", None)
