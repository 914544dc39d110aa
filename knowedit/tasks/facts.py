"""Factual recall: "The capital of France is" -> " Paris". The corruption swaps the subject for another
subject of the same relation ("The capital of Germany is"), whose answer (" Berlin") is the distractor.
Answers are the first token of the object; items whose two first tokens coincide are dropped."""
from __future__ import annotations

import random
from collections import defaultdict

from ..errors import KnoweditError
from .base import Task
from .positions import span_positions
from .vocab import answer_tokens, encode

# Well-known facts, so the task works offline with no dataset: relation -> (template, {subject: object}).
BUILTIN = {
    "capital": ("The capital of {} is", {
        "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
        "Russia": "Moscow", "Egypt": "Cairo", "China": "Beijing", "England": "London", "Greece": "Athens",
        "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Poland": "Warsaw", "Norway": "Oslo",
        "Sweden": "Stockholm", "Canada": "Ottawa", "Kenya": "Nairobi", "Thailand": "Bangkok",
        "Turkey": "Ankara", "Peru": "Lima", "Cuba": "Havana", "Hungary": "Budapest", "Denmark": "Copenhagen",
        "Finland": "Helsinki", "Belgium": "Brussels", "Argentina": "Buenos", "Mexico": "Mexico",
        "Iran": "Tehran", "Iraq": "Baghdad", "India": "New", "Australia": "Canberra", "Chile": "Santiago"}),
    "language": ("The official language of {} is", {
        "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Japan": "Japanese",
        "Russia": "Russian", "China": "Chinese", "Portugal": "Portuguese", "Greece": "Greek",
        "Poland": "Polish", "Sweden": "Swedish", "Turkey": "Turkish", "Egypt": "Arabic", "Brazil": "Portuguese",
        "Mexico": "Spanish", "Netherlands": "Dutch", "Finland": "Finnish", "Hungary": "Hungarian",
        "Korea": "Korean", "Thailand": "Thai", "Vietnam": "Vietnamese", "Norway": "Norwegian",
        "Denmark": "Danish", "Iran": "Persian", "Israel": "Hebrew"}),
    "continent": ("{} is a country in the continent of", {
        "France": "Europe", "Germany": "Europe", "Japan": "Asia", "China": "Asia", "India": "Asia",
        "Brazil": "South", "Kenya": "Africa", "Egypt": "Africa", "Nigeria": "Africa", "Canada": "North",
        "Australia": "Australia", "Italy": "Europe", "Thailand": "Asia", "Ghana": "Africa",
        "Argentina": "South", "Mexico": "North", "Spain": "Europe", "Vietnam": "Asia"}),
    "currency": ("The currency of {} is the", {
        "Japan": "yen", "England": "pound", "Russia": "ruble", "India": "rupee", "China": "yuan",
        "Mexico": "peso", "Germany": "euro", "Switzerland": "franc", "Korea": "won", "Poland": "zloty",
        "Brazil": "real", "Sweden": "krona", "Turkey": "lira", "Israel": "shekel"}),
}


def builtin_records() -> list[dict]:
    return [{"prompt": tpl.format(s), "subject": s, "object": o, "relation": rel}
            for rel, (tpl, pairs) in BUILTIN.items() for s, o in pairs.items()]


def facts_task(tokenizer, records=None, n: int = 50, seed: int = 0, name: str = "facts",
               source: str = "builtin") -> Task:
    """Records are dicts with ``prompt`` (containing ``subject``), ``subject``, ``object`` (the true
    answer, without leading space) and ``relation``. Defaults to the built-in facts."""
    records = builtin_records() if records is None else list(records)
    by_rel = defaultdict(list)
    for r in records:
        by_rel[r["relation"]].append(r)
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    items, dropped, misaligned = [], 0, 0
    for i in order:
        if len(items) == n:
            break
        r = records[i]
        others = [o for o in by_rel[r["relation"]] if o["subject"] != r["subject"]]
        rng.shuffle(others)
        # Prefer a subject of the same token length, so clean and corrupt prompts align position by position.
        n_clean = len(encode(tokenizer, r["prompt"]))
        others.sort(key=lambda o: len(encode(tokenizer, _swap(r, o))) != n_clean)
        pick = next(((o, got) for o in others
                     if (got := answer_tokens(tokenizer, r["prompt"], [" " + r["object"], " " + o["object"]],
                                              first=True))), None)
        if pick is None:
            dropped += 1
            continue
        o, (head, (a, d)) = pick
        corrupt = _swap(r, o)
        misaligned += len(encode(tokenizer, corrupt)) != n_clean
        start = r["prompt"].index(r["subject"])
        subj = span_positions(tokenizer, r["prompt"], [(start, start + len(r["subject"]))])
        items.append((head, corrupt + head[len(r["prompt"]):], a, d, subj, r["relation"],
                      r["prompt"].replace(r["subject"], "{}", 1)))
    if not items:
        raise KnoweditError(f"task {name!r}: no fact has distinct answer and distractor first tokens "
                            f"({dropped} dropped); check the records or the data file")
    return Task(name, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                [i[3] for i in items], "logit_diff", None,
                {"seed": seed, "n": len(items), "dropped": dropped, "source": source, "answer_tokens": "first",
                 "length_mismatch": misaligned,
                 "relations": sorted({i[5] for i in items})},
                {"subject_last": [i[4] for i in items]},
                # means are grouped by the prompt's own wording, so position t lines up within a group
                # (a relation of the published data has several wordings)
                templates=[i[6] for i in items])



def _swap(r: dict, other: dict) -> str:
    start = r["prompt"].index(r["subject"])
    return r["prompt"][:start] + other["subject"] + r["prompt"][start + len(r["subject"]):]
