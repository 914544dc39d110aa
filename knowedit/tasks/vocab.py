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


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_tokens(tokenizer, prompt: str, answers, first: bool = False) -> tuple[str, list[int]] | None:
    """Make every string in ``answers`` a single, distinct next token after ``prompt``, or return None.

    Tokenizers such as SmolLM2's split " 5" into " " + "5"; then the shared leading whitespace moves
    into the prompt (``"done in "`` -> ``"5"``), as long as the prompt's tokens stay a prefix of the
    tokens of prompt + answer. With ``first=True`` a multi-token answer counts by its first token.
    Returns the (possibly extended) prompt and one id per answer."""
    answers = list(answers)
    for lead in _leads(answers):
        head = prompt + lead
        head_ids = encode(tokenizer, head)
        ids = []
        for a in answers:
            full = encode(tokenizer, prompt + a)
            if len(full) <= len(head_ids) or full[:len(head_ids)] != head_ids:
                break
            if len(full) > len(head_ids) + 1 and not first:
                break
            ids.append(full[len(head_ids)])
        else:
            if len(set(ids)) == len(ids):
                return head, ids
    return None


def _leads(answers):
    # First try the answers as written; then move their common leading whitespace into the prompt.
    yield ""
    stripped = [a.lstrip() for a in answers]
    leads = {a[:len(a) - len(s)] for a, s in zip(answers, stripped)}
    if len(leads) == 1 and (lead := leads.pop()):
        yield lead
