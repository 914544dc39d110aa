"""Colored Objects (Merullo et al. 2024), one-shot: a scene of coloured objects, then "What color is
the X?\\nA:" -> " Blue". Metric: exact top-1 accuracy over the full vocabulary. The corruption asks
about a different object of the same scene, whose colour is the distractor."""
from __future__ import annotations

import random
import re

from ..errors import KnoweditError
from .base import Task
from .positions import span_positions
from .vocab import answer_tokens, single_token_words

COLORS = ["red", "orange", "yellow", "green", "blue", "brown", "purple", "pink", "black", "white",
          "grey", "silver", "gold", "teal", "magenta"]
OBJECTS = ["pencil", "notebook", "mug", "bracelet", "envelope", "scarf", "stapler", "candle", "wallet",
           "spoon", "kite", "sock", "marble", "teapot", "lamp", "ruler", "balloon", "glove", "bowl",
           "clock", "umbrella", "backpack", "hat", "comb", "vase", "trophy", "fork", "plate", "key"]
SURFACES = ["table", "desk", "floor", "shelf", "counter", "nightstand", "bed", "windowsill"]
PHRASES = ["I see", "there is", "you see"]

# One question: "Q: On the {surface}, {phrase} a c1 o1, a c2 o2, and a c3 o3. What color is the oX?\nA:"
_QUESTION = re.compile(r"On the (?P<surface>[^,]+), (?P<phrase>I see|there is|you see) (?P<items>[^.]+)\. "
                       r"What color is the (?P<query>[^?]+)\?")
_ITEM = re.compile(r"an? (?P<color>\w+) (?P<object>.+)")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def scene_sentence(surface: str, phrase: str, items, query: str) -> str:
    parts = [f"{article(c)} {c} {o}" for c, o in items]
    listing = " and ".join(parts) if len(parts) == 2 else ", ".join(parts[:-1]) + ", and " + parts[-1]
    return f"On the {surface}, {phrase} {listing}. What color is the {query}?"


def parse_last_question(text: str) -> dict:
    """The objects, their colours and the character spans of the colours and the queried object, for
    the LAST question in ``text``. Raises ValueError when it does not look like a Colored Objects prompt."""
    matches = list(_QUESTION.finditer(text))
    if not matches:
        raise ValueError("no 'On the ..., I see .... What color is the ...?' question found")
    m = matches[-1]
    items, pos = [], m.start("items")
    for chunk in re.split(r", and |, | and ", m.group("items")):
        pos = text.index(chunk, pos)
        im = _ITEM.fullmatch(chunk)
        if not im:
            raise ValueError(f"cannot read the object {chunk!r}")
        items.append({"color": im.group("color"), "object": im.group("object"),
                      "color_span": (pos + im.start("color"), pos + im.end("color"))})
        pos += len(chunk)
    query = m.group("query")
    owners = [i for i, it in enumerate(items) if it["object"] == query]
    if len(owners) != 1:
        raise ValueError(f"the queried object {query!r} is not exactly one object of the scene")
    return {"surface": m.group("surface"), "phrase": m.group("phrase"), "items": items, "query": owners[0],
            "query_span": (m.start("query"), m.end("query"))}


def build_item(tokenizer, clean: str, corrupt: str, answer_color: str, distractor_color: str):
    """Token ids and positions for one prompt pair, or None when an answer is not one token."""
    scene = parse_last_question(clean)
    return item_from_spans(tokenizer, clean, corrupt, answer_color, distractor_color,
                           [it["color_span"] for it in scene["items"]], scene["query"], scene["query_span"])


def item_from_spans(tokenizer, clean: str, corrupt: str, answer_color: str, distractor_color: str, color_spans,
                    q: int, query_span):
    """As :func:`build_item`, from the character spans of the last scene's colours (``q``: the asked
    item's index) and of the queried object."""
    got = answer_tokens(tokenizer, clean, [" " + answer_color.capitalize(), " " + distractor_color.capitalize()])
    if got is None or got[0] != clean:
        return None
    pos = span_positions(tokenizer, clean, list(color_spans) + [query_span])
    return {"clean": clean, "corrupt": corrupt, "answer": got[1][0], "distractor": got[1][1],
            "distractor_positions": [p for i, p in enumerate(pos[:-1]) if i != q],
            "answer_position": [pos[q]], "query_position": [pos[-1]]}


def make_task(name: str, items: list, dropped: int, meta: dict) -> Task:
    if not items:
        raise KnoweditError(f"task {name!r}: no item has single-token answer and distractor colours for this "
                            f"tokenizer ({dropped} dropped)")
    return Task(name, [it["clean"] for it in items], [it["corrupt"] for it in items],
                [it["answer"] for it in items], [it["distractor"] for it in items], "accuracy",
                [it["distractor_positions"] for it in items],
                {**meta, "n": len(items), "dropped": dropped},
                {"answer": [it["answer_position"] for it in items], "query": [it["query_position"] for it in items]})


def sample_items(n: int, draw) -> tuple[list, int]:
    """Up to ``n`` items from ``draw()`` (None: dropped) and the number dropped. Bounded, so a tokenizer
    with almost no single-token colours fails instead of looping forever."""
    items, dropped = [], 0
    for _ in range(20 * n):
        if len(items) == n:
            break
        item = draw()
        if item is None:
            dropped += 1
        else:
            items.append(item)
    return items, dropped


def _random_scene(rng, objects, colors=COLORS):
    colors = rng.sample(colors, 3)
    objects = rng.sample(objects, 3)
    return rng.choice(SURFACES), rng.choice(PHRASES), list(zip(colors, objects))


def colored_objects_task(tokenizer, n: int = 50, seed: int = 0, colors=None, objects=None) -> Task:
    """``n`` one-shot prompts from the built-in colour/object lists, or ``colors``/``objects`` (items
    whose colours are not single tokens for ``tokenizer`` are dropped and counted in ``meta['dropped']``)."""
    if n <= 0:
        raise KnoweditError("n: the number of Colored Objects prompts must be positive")
    colors = list(COLORS if colors is None else colors)
    # Single-token objects keep the clean and corrupt prompts the same length, position by position.
    given = OBJECTS if objects is None else list(objects)
    objects = single_token_words(tokenizer, given)
    if len(colors) < 3 or len(objects) < 3:
        raise KnoweditError(f"colors/objects: a scene needs 3 colours and 3 single-token objects (got "
                            f"{len(colors)} colours, {len(objects)} single-token objects)")
    rng = random.Random(seed)

    def draw():
        s_surface, s_phrase, s_items = _random_scene(rng, objects, colors)
        k = rng.randrange(3)
        shot = (f"Q: {scene_sentence(s_surface, s_phrase, s_items, s_items[k][1])}\n"
                f"A: {s_items[k][0].capitalize()}\n")
        surface, phrase, scene = _random_scene(rng, objects, colors)
        q, other = rng.sample(range(3), 2)
        clean = shot + f"Q: {scene_sentence(surface, phrase, scene, scene[q][1])}\nA:"
        corrupt = shot + f"Q: {scene_sentence(surface, phrase, scene, scene[other][1])}\nA:"
        return build_item(tokenizer, clean, corrupt, scene[q][0], scene[other][0])
    items, dropped = sample_items(n, draw)
    return make_task("colored-objects", items, dropped, {"seed": seed, "source": "generated",
                                                         "dropped_objects": len(given) - len(objects)})
