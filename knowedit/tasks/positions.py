"""Token positions of character spans, found from the tokenization (never hard-coded)."""
from __future__ import annotations

from ..models.bos import bos_prefix
from .vocab import encode


def span_positions(tokenizer, text: str, spans, bos: bool | None = None) -> list[int]:
    """For each character span ``(start, end)`` of ``text``, the index of the LAST token overlapping it.

    The last token is where a causal model has read the whole word. Positions count in the model's
    tokenization, so they start after the BOS token where ``bos`` (None: the model's convention) puts
    one. Uses offset mappings when the tokenizer is fast; otherwise the length of the tokenized prefix."""
    shift = len(bos_prefix(tokenizer, bos))
    return [p + shift for p in _text_positions(tokenizer, text, list(spans))]


def _text_positions(tokenizer, text: str, spans) -> list[int]:
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out = []
        for start, end in spans:
            hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
            if not hits:
                raise ValueError(f"span {start}:{end} ({text[start:end]!r}) covers no token")
            out.append(hits[-1])
        return out
    return [len(encode(tokenizer, text[:end])) - 1 for _, end in spans]
