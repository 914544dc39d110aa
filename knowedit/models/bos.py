"""The beginning-of-sequence convention of a model: which token, if any, every prompt starts with.

The circuits published on GPT-2 (Wang et al.'s IOI, EAP-IG, MIB) were found on prompts that start
with ``<|endoftext|>``, although GPT-2's tokenizer never adds it; position 0 then holds a token that
attention heads use as a resting place, and results without it do not reproduce. Llama-family
tokenizers decide themselves (``add_bos_token``); SmolLM2's adds nothing, so its prompts start with
their first word."""
from __future__ import annotations

from ..errors import KnoweditError

GPT2_BOS = "<|endoftext|>"
GPT2_BOS_ID = 50256  # <|endoftext|> in GPT-2's 50,257-token vocabulary (also GPT-Neo's and GPT-J's)


def convention_bos_id(tokenizer) -> int | None:
    """The token id the model's convention puts before every prompt, or None for no BOS."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    if tokenizer.bos_token == GPT2_BOS and bos == GPT2_BOS_ID:
        return bos
    own = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if own and own[0] == bos else None


def uses_bos(tokenizer, bos: bool | None = None) -> bool:
    """``bos`` resolved: None follows the convention; True needs a tokenizer that has a BOS token."""
    if bos is None:
        return convention_bos_id(tokenizer) is not None
    if bos and tokenizer.bos_token_id is None:
        raise KnoweditError("bos: this model's tokenizer has no beginning-of-sequence token; use bos=False "
                            "(--no-bos)")
    return bool(bos)


def bos_prefix(tokenizer, bos: bool | None = None) -> list[int]:
    """``[bos_id]`` or ``[]``: what goes before a prompt's own tokens."""
    return [tokenizer.bos_token_id] if uses_bos(tokenizer, bos) else []
