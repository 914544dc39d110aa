"""Checks on a local model directory before anything is loaded: its config names a supported
architecture, and its weights and tokenizer files are there."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedArchitecture

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_local_dir(path, supported) -> dict:
    """The directory's ``config.json`` as a dict, after refusing what cannot load."""
    d = Path(path)
    cfg = d / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"{d}: no config.json in this directory; point --model at the folder "
                             "save_pretrained() wrote (it holds config.json, the weights and the tokenizer)")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg}: not valid JSON ({e}); re-save the model with save_pretrained()") from None
    kind = config.get("model_type")
    if kind not in supported:
        raise UnsupportedArchitecture(
            f"{cfg}: model_type {kind!r} is not supported; knowedit supports {', '.join(sorted(supported))}")
    files = {p.name for p in d.iterdir()}
    if not any(w in files for w in WEIGHTS) and not any(f.endswith(".safetensors") for f in files):
        raise ModelLoadError(f"{d}: no weights found (looked for {', '.join(WEIGHTS)}); copy the weight "
                             "files into the directory or re-save the model with save_pretrained()")
    if not any(all(f in files for f in s) for s in TOKENIZER_SETS):
        want = " or ".join(" + ".join(s) for s in TOKENIZER_SETS)
        raise ModelLoadError(f"{d}: the tokenizer is missing (needs {want}); save it beside the weights "
                             "with tokenizer.save_pretrained(DIR), or copy the files from the original model")
    return config
