import os

import pytest

from knowedit import ModelLoadError, load_model
from knowedit.models import cache


def test_unreachable_model_error_names_model_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("some-org/not-a-cached-model")
    msg = str(e.value)
    assert "some-org/not-a-cached-model" in msg and "local directory" in msg


def test_cache_root_conventions(monkeypatch, tmp_path):
    monkeypatch.delenv("KNOWEDIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "knowedit"
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "x"))
    assert cache.cache_root() == tmp_path / "x"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with cache.atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt  # an interrupted first conversion
    assert not target.exists() and os.listdir(tmp_path) == []
    with cache.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").exists()


# ---- bad input is refused before anything loads (the scale issue's "Bad input") ----------------

def _saved_tiny(tmp_path, tiny_gpt2, with_tokenizer=True):
    d = tmp_path / "m"
    tiny_gpt2.model.save_pretrained(d)
    if with_tokenizer:
        tiny_gpt2.tokenizer.save_pretrained(d)
    return d


def test_local_dir_without_tokenizer_names_the_missing_files(tmp_path, tiny_gpt2):
    d = _saved_tiny(tmp_path, tiny_gpt2, with_tokenizer=False)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "tokenizer" in msg and "tokenizer.json" in msg and "no local copy" not in msg


def test_local_dir_without_weights_or_config(tmp_path, tiny_gpt2):
    d = _saved_tiny(tmp_path, tiny_gpt2)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no weights found"):
        load_model(str(d))
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(d))


def test_unsupported_architecture_refused_from_config(tmp_path, tiny_gpt2, monkeypatch):
    import json

    from knowedit.errors import UnsupportedArchitecture
    d = _saved_tiny(tmp_path, tiny_gpt2)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(cfg))
    import transformers
    called = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: called.append(a)))
    with pytest.raises(UnsupportedArchitecture, match="t5"):
        load_model(str(d))
    assert called == []          # refused before any weight was read


@pytest.mark.parametrize("kwargs,field", [
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": "bf15"}, "dtype"),
    ({"device": "cuda:7"}, "device"),
    ({"device": "gpu"}, "device"),
    ({"device_map": {"transformer.h.0": "cpu"}}, "unplaced"),
    ({"device_map": {"": "cpu", "transformer.blocks": "cpu"}}, "does not have"),
    ({"device_map": {"": "disk"}}, "offload_folder"),
    ({"device_map": {"": "cuda:3"}}, "device_map"),
    ({"max_memory": {"cpu": "1GiB"}}, "max_memory"),
])
def test_bad_placement_and_dtype_are_refused_before_loading(tmp_path, tiny_gpt2, monkeypatch, kwargs, field):
    import transformers
    d = _saved_tiny(tmp_path, tiny_gpt2)
    called = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: called.append(a)))
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d), **kwargs)
    assert field in str(e.value) and called == []


def test_dtype_names_and_device_map_with_disk_offload(tmp_path, tiny_gpt2):
    import torch
    d = _saved_tiny(tmp_path, tiny_gpt2)
    assert load_model(str(d), dtype="bf16").dtype == torch.bfloat16
    assert load_model(str(d), dtype="fp16").dtype == torch.float16
    ref = load_model(str(d))
    h = load_model(str(d), device_map={"": "cpu", "transformer.h.1": "disk"}, offload_folder=str(tmp_path / "off"))
    assert h.device_map["transformer.h.1"] == "disk" and h.device.type == "cpu"
    assert any(p.device.type == "meta" for n, p in h.model.named_parameters() if ".h.1." in n)
    b = ref.tokenize(["When Mary and John went to the store"])
    with torch.no_grad():
        assert torch.equal(h.forward(b), ref.forward(b))


def test_cli_reports_bad_dtype_and_device_map_without_loading(tmp_path, capsys):
    import json

    from knowedit.cli.main import main
    req = tmp_path / "r.json"
    req.write_text(json.dumps([{"prompt": "The capital of France is", "subject": "France", "target_new": " Rome"}]))
    base = ["edit", "--editor", "rome", "--requests", str(req), "--save", str(tmp_path / "out")]
    assert main(base + ["--dtype", "int4"]) == 2
    assert "--dtype" in capsys.readouterr().err
    assert main(base + ["--device-map", "{bad json"]) == 2
    assert "--device-map" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lower_precision_load_keeps_the_checkpoint_identity(tmp_path, tiny_llama):
    """A float32 checkpoint loaded in bf16 is the same model: circuits found on the float32 load apply,
    while edits are still detected against the weights as loaded."""
    d = tmp_path / "m"
    tiny_llama.model.save_pretrained(d)
    tiny_llama.tokenizer.save_pretrained(d)
    f32, b16 = load_model(str(d)), load_model(str(d), dtype="bf16")
    assert b16.fingerprint == f32.fingerprint == tiny_llama.fingerprint
    assert b16.loaded_fingerprint != f32.loaded_fingerprint and b16.is_unedited()
    import torch
    with torch.no_grad():
        b16.model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    assert not b16.is_unedited() and b16.fingerprint == f32.fingerprint
