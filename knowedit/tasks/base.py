"""The Task type: clean and corrupted prompts, answer and distractor tokens, and a metric."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import KnoweditError
from ..models.bos import uses_bos

METRICS = ("logit_diff", "accuracy", "prob")


@dataclass
class Task:
    """One prompt set. ``answers[i]`` / ``distractors[i]`` are single token ids for prompt i.

    ``distractor_positions[i]`` (optional) lists the token positions in ``clean[i]`` that hold the
    distractors, found from the tokenization; attention steering needs them. ``positions`` (optional)
    maps a role (e.g. ``"answer"``, ``"query"``) to per-prompt lists of token positions in ``clean[i]``.

    ``bos``: whether the prompts are run after the model's BOS token (None: the model's convention,
    :mod:`knowedit.models.bos`); every position counts in that tokenization. ``templates`` (optional)
    names each prompt's template; mean ablation averages the corrupted prompts of one template."""

    name: str
    clean: list[str]
    corrupt: list[str]
    answers: list[int]
    distractors: list[int]
    metric: str = "logit_diff"
    distractor_positions: list[list[int]] | None = None
    meta: dict = field(default_factory=dict)
    positions: dict[str, list[list[int]]] | None = None
    bos: bool | None = None
    templates: list[str] | None = None

    def __post_init__(self):
        n = len(self.clean)
        if n == 0:
            raise KnoweditError(f"task {self.name!r} has no valid items; check the generator's vocabulary or the data file")
        for fld in ("corrupt", "answers", "distractors"):
            if len(getattr(self, fld)) != n:
                raise KnoweditError(f"task {self.name!r}: {fld} has {len(getattr(self, fld))} items, clean has {n}")
        if self.templates is not None and len(self.templates) != n:
            raise KnoweditError(f"task {self.name!r}: templates has {len(self.templates)} items, clean has {n}")
        for role, per_prompt in (self.positions or {}).items():
            if len(per_prompt) != n:
                raise KnoweditError(f"task {self.name!r}: positions[{role!r}] has {len(per_prompt)} items, clean has {n}")
        if self.metric not in METRICS:
            raise KnoweditError(f"task {self.name!r}: metric {self.metric!r} is unknown; use one of {METRICS}")

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, idx) -> "Task":
        idx = list(idx)
        pos = [self.distractor_positions[i] for i in idx] if self.distractor_positions else None
        roles = {r: [v[i] for i in idx] for r, v in self.positions.items()} if self.positions else None
        return Task(self.name, [self.clean[i] for i in idx], [self.corrupt[i] for i in idx],
                    [self.answers[i] for i in idx], [self.distractors[i] for i in idx], self.metric, pos,
                    dict(self.meta), roles, self.bos,
                    [self.templates[i] for i in idx] if self.templates is not None else None)

    def with_bos(self, bos: bool | None, tokenizer) -> "Task":
        """The same task run with (``True``) or without (``False``) the BOS token, positions moved to
        match; ``None`` keeps it as it is."""
        if bos is None:
            return self
        shift = int(uses_bos(tokenizer, bos)) - int(uses_bos(tokenizer, self.bos))
        move = lambda per_prompt: [[p + shift for p in ps] for ps in per_prompt]
        return dataclasses.replace(
            self, bos=bool(bos),
            distractor_positions=move(self.distractor_positions) if self.distractor_positions else None,
            positions={r: move(v) for r, v in self.positions.items()} if self.positions else None)


def per_prompt_scores(logits: torch.Tensor, answers: torch.Tensor, distractors: torch.Tensor,
                      metric: str) -> torch.Tensor:
    """Score last-position logits ``[B, V]``. Accuracy is exact top-1 over the full vocabulary."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    if metric == "logit_diff":
        return logits[rows, answers] - logits[rows, distractors]
    if metric == "accuracy":
        return (logits.argmax(-1) == answers).to(logits.dtype)
    return logits.softmax(-1)[rows, answers]


def score(handle, task: Task, prompts: str = "clean", batch_size: int = 32,
          intervention: Callable[[object], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Per-prompt metric values on the clean (or corrupt) prompts, optionally under an intervention.

    ``intervention(batch)`` returns a context manager entered around each batch's forward pass."""
    texts = task.clean if prompts == "clean" else task.corrupt
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = handle.tokenize(texts[i:i + batch_size], bos=task.bos)
            ctx = intervention(batch, slice(i, i + len(batch))) if intervention else contextlib.nullcontext()
            with ctx:
                logits = handle.last_logits(batch)
            a = torch.tensor(task.answers[i:i + batch_size], device=logits.device)
            d = torch.tensor(task.distractors[i:i + batch_size], device=logits.device)
            out.append(per_prompt_scores(logits.float(), a, d, task.metric))
    return torch.cat(out)
