"""Does a persistent repair generalise? Train it on varied-wording prompts over the training pools,
score it on held-out Colored Objects prompts it shares no colour, object or wording with: generated
ones over the evaluation pools, and, when the data are at hand, Merullo et al.'s cobjs prompts and
BIG-bench's (evaluation only: the BIG-bench file carries a canary string)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import KnoweditError
from ..tasks.colored_objects import OBJECTS, colored_objects_task
from ..tasks.colored_objects_data import load_bigbench, load_cobjs
from ..tasks.colored_objects_varied import EVAL_COLORS, leaked_words, varied_colored_objects_task
from .persistent import DEFAULTS, collateral, distil_steering
from .steering import steered_scores

TRAIN_SAMPLE = 16
FILES = {"cobjs": "cobjs_data_42.json", "bigbench": "bigbench_reasoning_about_colored_objects.json"}


def _data_file(data_dir, name: str) -> Path | None:
    if data_dir is None:
        return None
    root = Path(data_dir)
    for p in (root / "colored_objects" / name, root / name):
        if p.is_file():
            return p
    return None


def held_out_sets(tokenizer, n: int = 50, seed: int = 0, data_dir=None) -> dict:
    """``{source: Task}``: ``generated`` (evaluation pools, the default wording), plus ``cobjs`` and
    ``bigbench`` when ``data_dir`` holds them. Prompts naming a training-pool word are dropped
    (counted in ``meta['leaked']``), so no held-out prompt shares vocabulary with training."""
    if n < 1:
        raise KnoweditError("eval_n: need at least 1 held-out prompt per source")
    if data_dir is not None and not Path(data_dir).exists():
        raise KnoweditError(f"data_dir: {data_dir} does not exist; pass the datasets root (e.g. ../shared/datasets)")
    # Over-ask, then drop leaked prompts and keep n, so every source gets n when it can.
    sets = {"generated": colored_objects_task(tokenizer, n=2 * n, seed=seed + 1, colors=EVAL_COLORS, objects=OBJECTS)}
    if (p := _data_file(data_dir, FILES["cobjs"])) is not None:
        sets["cobjs"] = load_cobjs(tokenizer, p, n=2 * n)
    if (p := _data_file(data_dir, FILES["bigbench"])) is not None:
        sets["bigbench"] = load_bigbench(tokenizer, p, n=2 * n, seed=seed)
    out = {}
    for name, t in sets.items():
        clean = [i for i, text in enumerate(t.clean) if not leaked_words(text)]
        sub = t.subset(clean[:n])
        sub.meta.update(source=name, leaked=len(t) - len(clean))
        out[name] = sub
    return out


def gain_kept(unsteered: float, steered: float, repaired: float) -> float:
    """The share of the steering gain the persistent repair keeps (NaN when steering gains nothing)."""
    gain = steered - unsteered
    return (repaired - unsteered) / gain if gain > 0 else float("nan")


def transfer_table(handle, edit, heads, held: dict, batch_size: int = 16) -> pd.DataFrame:
    """Per source and pooled: ``n, unsteered, steered, repaired, gain_kept`` (exact top-1 accuracy)."""
    per = {}
    for name, t in held.items():
        base = steered_scores(handle, t, [], batch_size=batch_size)
        steer = steered_scores(handle, t, heads, batch_size=batch_size)
        with edit:
            rep = steered_scores(handle, t, [], batch_size=batch_size)
        per[name] = (base, steer, rep)
    rows = [(name, len(b), b.mean().item(), s.mean().item(), r.mean().item()) for name, (b, s, r) in per.items()]
    n = sum(r[1] for r in rows)
    pooled = [sum(r[1] * r[k] for r in rows) / n for k in (2, 3, 4)]
    rows.append(("all", n, *pooled))
    df = pd.DataFrame(rows, columns=["source", "n", "unsteered", "steered", "repaired"])
    df["gain_kept"] = [gain_kept(u, s, r) for u, s, r in zip(df["unsteered"], df["steered"], df["repaired"])]
    return df


def transfer_repair(handle, heads, train_n: int = 200, eval_n: int = 50, seed: int = 0, data_dir=None,
                    source_task=None, facts=None, persistent_kwargs: dict | None = None, batch_size: int = 16,
                    progress=None) -> dict:
    """Distil the steering of ``heads`` on ``train_n`` varied training prompts and score it on the held-out
    sets. Returns ``{"table", "edit", "collateral", "train", "held_out"}``; the edit is not applied."""
    if train_n < 1:
        raise KnoweditError("train_n: need at least 1 training prompt (the issue asks for >= 200)")
    tok = handle.tokenizer
    train = varied_colored_objects_task(tok, n=train_n, seed=seed)
    held = held_out_sets(tok, n=eval_n, seed=seed, data_dir=data_dir)
    edit = distil_steering(handle, train, heads, progress=progress, **{**DEFAULTS, **(persistent_kwargs or {})})
    table = transfer_table(handle, edit, heads, held, batch_size=batch_size)
    side = collateral(handle, edit, None, source_task, facts, batch_size=batch_size)
    # How well the repair fits its own training prompts, on a sample (the full set costs as much as the held-out).
    fit = train.subset(range(min(len(train), TRAIN_SAMPLE)))
    side["train_steered"] = steered_scores(handle, fit, heads, batch_size=batch_size).mean().item()
    with edit:
        side["train_repaired"] = steered_scores(handle, fit, [], batch_size=batch_size).mean().item()
    side["train_unsteered"] = steered_scores(handle, fit, [], batch_size=batch_size).mean().item()
    side["train_sample"] = len(fit)
    return {"table": table, "edit": edit, "collateral": side, "train": train, "held_out": held}
