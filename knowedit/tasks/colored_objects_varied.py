"""Colored Objects prompts for *training* a repair: several scene wordings, none of them the
"On the X, I see ..." sentence that the generated, cobjs and BIG-bench evaluation prompts share, over
colour, object and place vocabularies disjoint from the evaluation pools. A repair trained on these
and scored on the others is tested on colours, objects and wording it never saw.

Positions come from the character spans recorded while each prompt is built, so no parser for the
new wordings is needed."""
from __future__ import annotations

import random
import re

from ..errors import KnoweditError
from .colored_objects import OBJECTS, item_from_spans, make_task, sample_items

# The colours the published data use (BIG-bench's 18, a superset of cobjs'): the evaluation pool.
EVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "brown", "magenta", "fuchsia", "mauve", "teal",
               "turquoise", "burgundy", "silver", "gold", "black", "grey", "purple", "pink"]
# Objects of the generated evaluation prompts (the default generator's list) and of the published files.
EVAL_OBJECTS = sorted(set(OBJECTS) | {
    "ball", "bottle", "bowl", "bracelet", "cup", "envelope", "jug", "leash", "lighter", "mug", "necklace",
    "notebook", "pen", "pencil", "plate", "puzzle", "textbook", "booklet", "cat toy", "crayon", "dog leash",
    "fidget spinner", "keychain", "pair of sunglasses", "paperclip", "scrunchiephone charger", "sheet of paper",
    "stress ball", "teddy bear"})
TRAIN_COLORS = ["white", "navy", "tan", "olive", "coral", "cream", "copper", "bronze", "salmon", "mint", "rust",
                "azure", "ruby", "rose", "sand", "violet", "cyan", "lime", "ivory", "indigo", "amber", "peach",
                "plum", "jade", "scarlet"]
TRAIN_OBJECTS = ["hammer", "ladder", "bucket", "pillow", "blanket", "towel", "basket", "carpet", "chair", "bench",
                 "drum", "guitar", "helmet", "kettle", "jacket", "shirt", "boot", "shoe", "ribbon", "button",
                 "rope", "brush", "mirror", "shovel", "wagon", "flag", "ticket", "coin", "bell", "whistle",
                 "feather", "barrel", "sponge", "tray", "jar", "bag", "cap"]
TRAIN_PLACES = ["garage", "garden", "kitchen", "attic", "basement", "closet", "drawer", "cupboard", "hallway",
                "porch", "trunk", "workshop"]

# Scene + question wordings; {L} the listing, {P} the place, {O} the queried object.
TEMPLATES = [
    "In the {P} there are {L}. Which colour is the {O}?",
    "Someone left {L} in the {P}. What is the colour of the {O}?",
    "The {P} holds {L}. Tell me the color of the {O}.",
    "Look inside the {P}: {L}. The {O} is which color?",
    "Here are {L}, all in the {P}. What shade is the {O}?",
    "My {P} contains {L}. Name the color of the {O}.",
]
# Each item's wording; the colour before or after the object, so no fixed token order is learnt.
ITEM_FORMS = ["a {c} {o}", "one {c} {o}", "a {o} painted {c}", "the {c} {o}"]
JOINS = [(", ", ", and "), ("; ", "; and "), (", ", " plus ")]
FRAMES = [("Q: ", "\nA:"), ("Q: ", "\nA:"), ("Question: ", "\nAnswer:")]


def vocabulary_overlap(train_words, eval_words) -> set[str]:
    """Words of ``train_words`` that occur (as whole words) in ``eval_words``' phrases or vice versa."""
    split = lambda ws: {t for w in ws for t in w.lower().split()}  # noqa: E731
    return split(train_words) & split(eval_words)


def leaked_words(text: str, words=None) -> list[str]:
    """Training-pool words (whole words, any case) that occur in ``text``; an evaluation prompt must have none."""
    words = TRAIN_COLORS + TRAIN_OBJECTS + TRAIN_PLACES if words is None else words
    low = text.lower()
    return [w for w in words if re.search(rf"\b{re.escape(w)}\b", low)]


def _scene(rng, colors, objects, k: int):
    """One question: its text, the character spans of every colour and of the queried object, the
    colours and objects, and the indices of the asked and of a distractor item."""
    cs, os_ = rng.sample(colors, k), rng.sample(objects, k)
    template = rng.choice(TEMPLATES)
    sep, last = rng.choice(JOINS)
    q, other = rng.sample(range(k), 2)
    head, rest = template.split("{L}")
    head = head.replace("{P}", rng.choice(TRAIN_PLACES))
    text, spans = head, []
    for i, (c, o) in enumerate(zip(cs, os_)):
        if i:
            text += last if i == k - 1 else sep
        form = rng.choice(ITEM_FORMS)
        word = form.replace("{c}", c).replace("{o}", o)
        if word.startswith("a ") and word[2] in "aeiou":
            word = "an " + word[2:]
        start = len(text) + word.index(c) if form.index("{c}") < form.index("{o}") else \
            len(text) + word.rindex(c)
        spans.append((start, start + len(c)))
        text += word
    place = rng.choice(TRAIN_PLACES)
    before_o, after_o = rest.replace("{P}", place).split("{O}")
    text += before_o
    query_span = (len(text), len(text) + len(os_[q]))
    text += os_[q] + after_o
    return text, spans, query_span, cs, os_, q, other


def varied_colored_objects_task(tokenizer, n: int = 200, seed: int = 0, colors=None, objects=None):
    """``n`` one-shot prompts in the varied wordings over the training pools (or ``colors``/``objects``).
    Items whose answer or distractor colour is not one token for ``tokenizer`` are dropped and counted."""
    colors = list(TRAIN_COLORS if colors is None else colors)
    objects = list(TRAIN_OBJECTS if objects is None else objects)
    if n <= 0:
        raise KnoweditError("n: the number of training prompts must be positive")
    if len(colors) < 5 or len(objects) < 5:
        raise KnoweditError(f"colors/objects: need at least 5 of each for scenes of up to 5 items "
                            f"(got {len(colors)} colours, {len(objects)} objects)")
    rng = random.Random(seed)

    def draw():
        pre, post = rng.choice(FRAMES)
        s_text, _, _, s_cs, _, s_q, _ = _scene(rng, colors, objects, rng.randint(2, 5))
        shot = f"{pre}{s_text}{post} {s_cs[s_q].capitalize()}\n{pre}"
        text, spans, qspan, cs, os_, q, other = _scene(rng, colors, objects, rng.randint(2, 5))
        clean = shot + text + post
        off = len(shot)
        corrupt = clean[:qspan[0] + off] + os_[other] + clean[qspan[1] + off:]
        return item_from_spans(tokenizer, clean, corrupt, cs[q], cs[other], [(a + off, b + off) for a, b in spans],
                               q, (qspan[0] + off, qspan[1] + off))
    items, dropped = sample_items(n, draw)
    return make_task("colored-objects", items, dropped, {"seed": seed, "source": "generated-varied",
                                                         "pools": "train"})
