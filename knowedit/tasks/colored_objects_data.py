"""Loaders for published Colored Objects data: Merullo et al.'s ``cobjs_*`` JSON (``[prompt, " Answer"]``
pairs; the ``mindiff`` file asks about another object of the same scene) and BIG-bench's
``reasoning_about_colored_objects`` (its ``what_color`` questions)."""
from __future__ import annotations

import random
from pathlib import Path

from ..errors import KnoweditError
from .base import Task
from .datafile import read_json
from .colored_objects import build_item, make_task, parse_last_question, scene_sentence


def load_cobjs(tokenizer, clean_path, corrupt_path=None, n: int | None = None) -> Task:
    """``clean_path`` is e.g. ``cobjs_data_42.json``; ``corrupt_path`` defaults to the ``mindiff`` file
    beside it (record i of both files shares its scene)."""
    clean_path = Path(clean_path)
    if corrupt_path is None:
        corrupt_path = clean_path.with_name(clean_path.name.replace("cobjs_", "cobjs_mindiff_"))
    clean = read_json(clean_path, "cobjs clean file")
    corrupt = read_json(corrupt_path, "cobjs corrupt (mindiff) file")
    if len(clean) != len(corrupt):
        raise KnoweditError(f"cobjs: {clean_path.name} has {len(clean)} records but {corrupt_path.name} has "
                            f"{len(corrupt)}; they must pair record by record")
    items, dropped = [], 0
    for i, (c, k) in enumerate(zip(clean, corrupt)):
        if n is not None and len(items) == n:
            break
        try:
            (cp, ca), (kp, ka) = c, k
            parse_last_question(cp)
        except (ValueError, TypeError) as e:
            raise KnoweditError(f"cobjs record {i}: not a [prompt, answer] Colored Objects pair ({e})") from None
        item = build_item(tokenizer, cp, kp, ca.strip(), ka.strip())
        if item is None:
            dropped += 1
        else:
            items.append(item)
    return make_task("colored-objects", items, dropped, {"source": str(clean_path)})


def load_bigbench(tokenizer, path, n: int | None = None, seed: int = 0, one_shot: bool = True) -> Task:
    """BIG-bench ``what_color`` questions as "Q: ...\\nA:" prompts (with one other question as the shot).
    The corruption asks about another object of the same scene with a different colour."""
    data = read_json(path, "BIG-bench colored objects file")
    examples = data.get("examples") if isinstance(data, dict) else None
    if not examples:
        raise KnoweditError(f"BIG-bench colored objects: {path} has no 'examples' list")
    questions = []
    for i, ex in enumerate(examples):
        if ex.get("comment") != "what_color":
            continue
        try:
            scene = parse_last_question(ex["input"])
        except (ValueError, KeyError) as e:
            raise KnoweditError(f"BIG-bench example {i}: unreadable 'input' ({e})") from None
        questions.append((ex["input"], scene))
    rng = random.Random(seed)
    items, dropped = [], 0
    for j, (text, scene) in enumerate(questions):
        if n is not None and len(items) == n:
            break
        its, q = scene["items"], scene["query"]
        others = [i for i, it in enumerate(its) if it["color"] != its[q]["color"]]
        if not others:
            dropped += 1
            continue
        other = rng.choice(others)
        shot = ""
        if one_shot:
            s_text, s_scene = questions[(j + 1) % len(questions)]
            shot = f"Q: {s_text}\nA: {s_scene['items'][s_scene['query']]['color'].capitalize()}\n"
        surface, phrase = scene["surface"], scene["phrase"]
        pairs = [(it["color"], it["object"]) for it in its]
        clean = shot + f"Q: {scene_sentence(surface, phrase, pairs, its[q]['object'])}\nA:"
        corrupt = shot + f"Q: {scene_sentence(surface, phrase, pairs, its[other]['object'])}\nA:"
        item = build_item(tokenizer, clean, corrupt, its[q]["color"], its[other]["color"])
        if item is None:
            dropped += 1
        else:
            items.append(item)
    return make_task("colored-objects", items, dropped, {"source": str(path), "seed": seed})

