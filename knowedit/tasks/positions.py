"""Token positions of character spans, found from the tokenization (never hard-coded)."""
from __future__ import annotations

from .vocab import encode


def span_positions(tokenizer, text: str, spans) -> list[int]:
    """For each character span ``(start, end)`` of ``text``, the index of the LAST token overlapping it.

    The last token is where a causal model has read the whole word. Uses offset mappings when the
    tokenizer is fast; otherwise the length of the tokenized prefix up to ``end``."""
    spans = list(spans)
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
