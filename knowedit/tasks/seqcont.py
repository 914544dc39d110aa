"""Sequence continuation (Lan & Barez 2024): "Van done in 1. Hat done in 2. Ring done in 3. Desk done
in 4. Sun done in" -> " 5". The distractor is the repeated last member (" 4"); the corruption keeps the
words but puts members out of order. Metric: logit(next) - logit(last)."""
from __future__ import annotations

import random

from ..errors import KnoweditError
from .base import Task
from .positions import span_positions
from .vocab import answer_tokens, encode

SEQUENCES = {
    ("numerals", "en"): [str(i) for i in range(1, 31)],
    ("numwords", "en"): ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                         "eighteen", "nineteen", "twenty"],
    ("months", "en"): ["January", "February", "March", "April", "May", "June", "July", "August",
                       "September", "October", "November", "December"],
    ("numwords", "es"): ["uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez",
                         "once", "doce", "trece", "catorce", "quince", "dieciséis", "diecisiete",
                         "dieciocho", "diecinueve", "veinte"],
    ("months", "es"): ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto",
                       "septiembre", "octubre", "noviembre", "diciembre"],
}
# Each sentence is "{word}{verb} {member}."; the prompt ends with "{word}{verb}".
FRAMES = {
    "en": (" done in", ["Boat", "Lamp", "Door", "Cake", "Bird", "Chair", "Coin", "Shoe", "Tree", "Road",
                        "Cup", "Bell", "Kite", "Star", "Rock", "Fish", "Book", "Milk", "Horse", "Leaf"]),
    "es": (" nació en", ["Ana", "Luis", "Marta", "Pablo", "Sofía", "Carlos", "Lucía", "Diego", "Elena",
                         "Jorge", "Carmen", "Javier", "Isabel", "Miguel", "Laura", "Raúl"]),
}
LENGTH = 4  # members shown before the blank


def seqcont_task(tokenizer, kind: str = "numerals", n: int = 50, seed: int = 0, step: int = 1,
                 language: str = "en", first_token: bool = False) -> Task:
    """``kind`` in numerals|numwords|months, ``step`` 1 or 2 (intervaled), ``language`` en|es.
    Items whose next or last member is not one token for ``tokenizer`` are dropped (``meta['dropped']``);
    ``first_token=True`` keeps multi-token members, scored by their (distinct) first tokens."""
    if (kind, language) not in SEQUENCES:
        raise KnoweditError(f"sequence {kind!r} in language {language!r} is unknown; use one of "
                            f"{sorted(SEQUENCES)}")
    if step < 1:
        raise KnoweditError("step: must be a positive integer")
    if n <= 0:
        raise KnoweditError("n: the number of sequence prompts must be positive")
    seq = SEQUENCES[kind, language]
    verb, words = FRAMES[language]
    starts = len(seq) - LENGTH * step
    if starts <= 0:
        raise KnoweditError(f"step {step} is too long for the {len(seq)} members of {kind!r}")
    rng = random.Random(seed)
    items, dropped = [], 0
    for _ in range(20 * n):
        if len(items) == n:
            break
        s = rng.randrange(starts)
        members = [seq[s + k * step] for k in range(LENGTH)]
        answer = seq[s + LENGTH * step]
        nouns = rng.sample(words, LENGTH + 1)
        clean, spans = _prompt(nouns, verb, members)
        corrupt = _corrupt(tokenizer, rng, nouns, verb, seq, len(encode(tokenizer, clean)))
        got = answer_tokens(tokenizer, clean, [" " + answer, " " + members[-1]], first=first_token)
        if got is None:
            dropped += 1
            continue
        head, (a, d) = got
        pos = span_positions(tokenizer, clean, spans)
        items.append((head, corrupt + head[len(clean):], a, d, pos))
    if not items:
        raise KnoweditError(f"seq-{kind} ({language}): no item has single-token answer and distractor for this "
                            f"tokenizer ({dropped} dropped)")
    return Task(f"seq-{kind}", [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                [i[3] for i in items], "logit_diff", [[i[4][-1]] for i in items],
                {"seed": seed, "n": len(items), "dropped": dropped, "kind": kind, "step": step,
                 "language": language, "first_token": first_token, "source": "generated"},
                {"members": [i[4] for i in items]})


def _prompt(nouns, verb, members):
    text, spans = "", []
    for noun, m in zip(nouns, members):
        text += f"{noun}{verb} "
        spans.append((len(text), len(text) + len(m)))
        text += f"{m}. "
    return text + nouns[-1] + verb, spans


def _corrupt(tokenizer, rng, nouns, verb, seq, n_tokens, tries: int = 50):
    """Random members that form no constant-step run (so no "next member" is implied), preferring a
    prompt as long in tokens as the clean one."""
    fallback = None
    while tries > 0 or fallback is None:
        idx = [rng.randrange(len(seq)) for _ in range(LENGTH)]
        if len({b - a for a, b in zip(idx, idx[1:])}) == 1:
            continue
        text, _ = _prompt(nouns, verb, [seq[i] for i in idx])
        if len(encode(tokenizer, text)) == n_tokens:
            return text
        fallback, tries = fallback or text, tries - 1
    return fallback
