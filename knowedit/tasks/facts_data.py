"""Factual-recall records from CounterFact (the flattened EasyEdit format) or ROME's known facts."""
from __future__ import annotations

from pathlib import Path

from ..errors import KnoweditError
from .base import Task
from .datafile import read_json
from .facts import facts_task


def fact_records(path) -> list[dict]:
    """Records ``{prompt, subject, object, relation}`` from either format (detected from the keys).
    CounterFact's flattened records carry no relation id, so the prompt template stands in for it."""
    data = read_json(path, "facts file")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise KnoweditError(f"facts file {path}: expected a JSON list of records")
    out = []
    for i, r in enumerate(data):
        if {"prompt", "subject", "ground_truth"} <= r.keys():
            prompt, subject, obj, rel = r["prompt"], r["subject"], r["ground_truth"], None
        elif {"prompt", "subject", "attribute", "relation_id"} <= r.keys():
            prompt, subject, obj, rel = r["prompt"], r["subject"], r["attribute"], r["relation_id"]
        else:
            raise KnoweditError(f"facts file {path}, record {i}: needs prompt/subject/ground_truth (CounterFact) "
                                f"or prompt/subject/attribute/relation_id (known facts)")
        if not all(isinstance(x, str) and x for x in (prompt, subject, obj)):
            raise KnoweditError(f"facts file {path}, record {i}: prompt, subject and object must be non-empty strings")
        if subject not in prompt:
            continue  # a few records paraphrase the subject; the subject swap needs it verbatim
        out.append({"prompt": prompt, "subject": subject, "object": obj,
                    "relation": rel or prompt.replace(subject, "{}", 1)})
    return out


def load_facts(tokenizer, path, n: int = 50, seed: int = 0) -> Task:
    return facts_task(tokenizer, fact_records(path), n=n, seed=seed, source=str(Path(path)))
