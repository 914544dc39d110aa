"""Indirect object identification (Wang et al. 2022): "When Mary and John went to the store,
John gave a drink to" -> " Mary". Metric: logit(IO) - logit(S) at the last position."""
from __future__ import annotations

import random
import re

from ..errors import KnoweditError
from .base import Task
from .positions import span_positions
from .vocab import single_token_words

NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Michael", "Anna",
         "Paul", "Kate", "Mark", "Lisa", "Peter", "Susan", "Tom", "Rachel", "Daniel", "Linda", "Chris",
         "Jessica", "Kevin", "Emily", "Steven", "Amy", "Brian", "Helen", "Eric", "Julia", "Adam", "Grace",
         "Ryan", "Sophie", "Jack", "Lucy", "Sam", "Rose", "Max", "Clara", "Ben", "Nora", "Luke", "Eva"]
PLACES = ["store", "park", "school", "office", "beach", "market", "library", "garden", "hospital",
          "station", "restaurant", "museum", "church", "house", "river"]
OBJECTS = ["drink", "book", "ring", "ball", "letter", "gift", "key", "bag", "basket", "pen", "phone",
           "flower", "snack", "computer", "necklace"]
# {A} is the indirect object (the answer), {B} the subject (repeated). ABBA and BABA orders.
TEMPLATES = {
    "ABBA": [
        "When {A} and {B} went to the {P}, {B} gave a {O} to",
        "After {A} and {B} arrived at the {P}, {B} handed a {O} to",
        "Then, {A} and {B} were working at the {P}. {B} passed a {O} to",
        "While {A} and {B} were walking to the {P}, {B} threw a {O} to",
    ],
    "BABA": [
        "When {B} and {A} went to the {P}, {B} gave a {O} to",
        "After {B} and {A} arrived at the {P}, {B} handed a {O} to",
        "Then, {B} and {A} were working at the {P}. {B} passed a {O} to",
        "While {B} and {A} were walking to the {P}, {B} threw a {O} to",
    ],
}
CORRUPTIONS = ("abc", "swap")


def ioi_task(tokenizer, n: int = 50, seed: int = 0, corruption: str = "abc", orders=("ABBA", "BABA")) -> Task:
    """``corruption='abc'``: three different names (no repeated name, so no S-inhibition signal);
    ``'swap'``: S2 replaced by the IO name, which flips the correct answer."""
    if corruption not in CORRUPTIONS:
        raise KnoweditError(f"corruption: {corruption!r} is unknown; use one of {CORRUPTIONS}")
    if n <= 0:
        raise KnoweditError("n: the number of IOI prompts must be positive")
    names = single_token_words(tokenizer, NAMES)
    places = single_token_words(tokenizer, PLACES)
    objects = single_token_words(tokenizer, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise KnoweditError("IOI: too few single-token names/places/objects for this tokenizer")
    rng = random.Random(seed)
    clean, corrupt, ans, dis = [], [], [], []
    s_pos, io_pos, s2_pos, templates = [], [], [], []
    tok = lambda w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
    for i in range(n):
        order = orders[i % len(orders)]
        tpl = rng.choice(TEMPLATES[order])
        A, B, Cn = rng.sample(names, 3)
        P, O = rng.choice(places), rng.choice(objects)
        clean.append(tpl.format(A=A, B=B, P=P, O=O))
        templates.append(tpl)
        if corruption == "abc":
            # Same template with the repeated subject replaced by a third name.
            corrupt.append(_abc(tpl, A, B, Cn, P, O))
        else:
            corrupt.append(_swap(tpl, A, B, P, O))
        ans.append(tok(A))
        dis.append(tok(B))
        io, s1, s2 = name_positions(tokenizer, clean[-1], A, B)
        s_pos.append([s1, s2])
        io_pos.append([io])
        s2_pos.append([s2])
    return Task("ioi", clean, corrupt, ans, dis, "logit_diff", s_pos,
                meta={"seed": seed, "n": n, "corruption": corruption, "dropped_names": len(NAMES) - len(names),
                      "names": len(names)},
                positions={"answer": io_pos, "S1": [[p[0]] for p in s_pos], "S2": s2_pos}, templates=templates)


def name_positions(tokenizer, text: str, A: str, B: str) -> tuple[int, int, int]:
    """Token positions of the IO name and of the two subject mentions (S1, S2) in ``text``."""
    io = [m.span() for m in re.finditer(rf"\b{re.escape(A)}\b", text)]
    s = [m.span() for m in re.finditer(rf"\b{re.escape(B)}\b", text)]
    return tuple(span_positions(tokenizer, text, [io[0], s[0], s[-1]]))


def _abc(tpl, A, B, C, P, O):
    # The second mention of B becomes C: "When A and B went..., C gave a O to".
    head, tail = tpl.rsplit("{B}", 1)
    return (head.format(A=A, B=B, P=P, O=O) + C + tail.format(A=A, B=B, P=P, O=O))


def _swap(tpl, A, B, P, O):
    head, tail = tpl.rsplit("{B}", 1)
    return (head.format(A=A, B=B, P=P, O=O) + A + tail.format(A=A, B=B, P=P, O=O))
