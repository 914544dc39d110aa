"""Tasks by name, as the CLI's ``--task`` / ``--task-file`` / data path select them."""
from __future__ import annotations

from pathlib import Path

from ..errors import KnoweditError
from .base import Task
from .colored_objects import colored_objects_task
from .colored_objects_data import load_bigbench, load_cobjs
from .custom import custom_task
from .facts import builtin_records, facts_task
from .facts_data import fact_records
from .ioi import ioi_task
from .seqcont import seqcont_task
from .seqcont_data import load_seqcont

SEQ = {"seq-numerals": ("numerals", "en"), "seq-numwords": ("numwords", "en"), "seq-months": ("months", "en"),
       "seq-numwords-es": ("numwords", "es"), "seq-months-es": ("months", "es")}
TASKS = ("ioi", "colored-objects", *SEQ, "facts", "custom")


def get_task(name: str, tokenizer, n: int = 50, seed: int = 0, task_file=None, data_dir=None,
             bos: bool | None = None, **options) -> Task:
    """Build task ``name``. ``data_dir`` (a dataset file, its folder, or the datasets root) switches the
    data-backed tasks from their built-in generators to the published data; ``options`` go to the
    generator (e.g. ``corruption='swap'`` for IOI, ``step=2`` for sequences). ``bos`` runs the prompts
    with or without the model's BOS token (None: the model's convention)."""
    return _build(name, tokenizer, n, seed, task_file, data_dir, **options).with_bos(bos, tokenizer)


def _build(name, tokenizer, n, seed, task_file, data_dir, **options) -> Task:
    if task_file is not None:
        if name not in (None, "custom"):
            raise KnoweditError(f"--task-file gives a custom task; use --task custom (got --task {name})")
        return custom_task(tokenizer, task_file, **options)
    if name == "custom":
        raise KnoweditError("task 'custom' needs a JSONL file: pass --task-file F.jsonl")
    if name not in TASKS:
        raise KnoweditError(f"task {name!r} is unknown; use one of {', '.join(TASKS)}")
    if name == "ioi":
        return ioi_task(tokenizer, n=n, seed=seed, **options)
    if name == "colored-objects":
        if data_dir is None:
            return colored_objects_task(tokenizer, n=n, seed=seed)
        path = _find(data_dir, ["colored_objects/cobjs_data_42.json", "cobjs_data_42.json"])
        if "bigbench" in path.name:
            return load_bigbench(tokenizer, path, n=n, seed=seed)
        return load_cobjs(tokenizer, path, n=n)
    if name in SEQ:
        kind, language = SEQ[name]
        if data_dir is None or language != "en":
            # Spanish members are rarely one token in English-centred vocabularies: score first tokens.
            options.setdefault("first_token", language != "en")
            return seqcont_task(tokenizer, kind, n=n, seed=seed, language=language, **options)
        root = Path(data_dir)
        root = root / "seqcont" if (root / "seqcont").is_dir() else root
        return load_seqcont(tokenizer, root, kind, n=n, **options)
    relations = options.pop("relations", None)
    if data_dir is None:
        return facts_task(tokenizer, only_relations(builtin_records(), relations, "the built-in facts"), n=n, seed=seed)
    path = _find(data_dir, ["facts/known_1000.json", "known_1000.json", "counterfact/counterfact-edit.json",
                            "counterfact-edit.json"])
    return facts_task(tokenizer, only_relations(fact_records(path), relations, str(path)), n=n, seed=seed,
                      source=str(path))


def only_relations(records: list[dict], relations, source: str) -> list[dict]:
    """The records of the named relations (all when ``relations`` is None)."""
    if relations is None:
        return records
    have = sorted({r["relation"] for r in records})
    unknown = [r for r in relations if r not in have]
    if unknown:
        shown = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "")
        raise KnoweditError(f"relations: {unknown} not in {source}; it has {shown}")
    return [r for r in records if r["relation"] in set(relations)]


def _find(data_dir, candidates) -> Path:
    root = Path(data_dir)
    if root.is_file():
        return root
    for c in candidates:
        if (root / c).is_file():
            return root / c
    raise KnoweditError(f"data path {root}: none of {candidates} found there; pass the file itself")
