"""Keep only the words that are one token for the tokenizer at hand (with a leading space)."""
from __future__ import annotations


def single_token_words(tokenizer, words, prefix: str = " ") -> list[str]:
    keep = []
    for w in words:
        if len(tokenizer(prefix + w, add_special_tokens=False)["input_ids"]) == 1:
            keep.append(w)
    return keep


def single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None
