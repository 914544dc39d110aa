"""Facts to trace, read from edit-request files (CounterFact/EasyEdit flattened or ROME's
``requested_rewrite``) or ROME's known-facts file (``subject, attribute, prompt``).

A fact needs a prompt and a subject that occurs in it (or a ``{}`` marking its place); the answer
whose probability is traced is the first of ``answer``, ``target_true``, ``ground_truth``,
``attribute`` that is present, else the model's own top prediction. Fields that mean something in
these formats but not to a trace (``target_new``, paraphrases, ...) are ignored; any other field is
an error, since a misspelt answer field would otherwise silently trace the model's prediction."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import KnoweditError

ANSWER_FIELDS = ("answer", "target_true", "ground_truth", "attribute")
IGNORED = {"case_id", "known_id", "target_new", "rephrase_prompt", "paraphrase_prompts", "locality_prompt",
           "locality_ground_truth", "neighborhood_prompts", "attribute_prompts", "generation_prompts", "portability",
           "template", "prediction", "relation_id", "pararel_idx", "requested_rewrite", "relation", "subject_id",
           "target_id", "id"}


@dataclass
class TraceRequest:
    prompt: str
    subject: str
    answer: str | None
    label: str

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt


def _str(v, where, name):
    if not isinstance(v, str) or not v.strip():
        raise KnoweditError(f"{where}: field {name!r} is {'empty' if isinstance(v, str) else 'missing or not text'}; "
                            f"give the {'entity the fact is about' if name == 'subject' else 'text before the answer'}")
    return v


def trace_request(rec: dict, index: int = 0) -> TraceRequest:
    if not isinstance(rec, dict):
        raise KnoweditError(f"record {index}: expected a JSON object with 'prompt' and 'subject', got "
                            f"{type(rec).__name__}")
    cid = rec.get("case_id", rec.get("known_id"))
    where = f"record {index}" + (f" (id {cid})" if cid is not None else "")
    known = set(IGNORED) | {"prompt", "subject"} | set(ANSWER_FIELDS)
    for k in rec:
        if k not in known and "/" not in k:   # "org/model": per-model flags in the known-facts file
            near = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)
            raise KnoweditError(f"{where}: unknown field {k!r}" + (f"; did you mean {near[0]!r}?" if near else
                                f"; a fact needs 'prompt', 'subject' and optionally one of {', '.join(ANSWER_FIELDS)}"))
    src = rec
    if "requested_rewrite" in rec:
        src = rec["requested_rewrite"]
        if not isinstance(src, dict):
            raise KnoweditError(f"{where}: field 'requested_rewrite' must be an object with prompt, subject, ...")
    prompt, subject = _str(src.get("prompt"), where, "prompt"), _str(src.get("subject"), where, "subject")
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise KnoweditError(f"{where}: field 'prompt' must contain exactly one '{{}}' for the subject")
    elif subject not in prompt:
        raise KnoweditError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; put the subject in "
                            "the prompt or mark its place with '{}'")
    answer = None
    for k in ANSWER_FIELDS:
        v = src.get(k)
        if isinstance(v, dict):
            v = v.get("str")
        if v is not None:
            if not isinstance(v, str) or not v.strip():
                raise KnoweditError(f"{where}: field {k!r} is empty; give the true answer or leave the field out")
            answer = v.strip()
            break
    label = f"case {cid}" if cid is not None else f"record {index}"
    return TraceRequest(prompt, subject, answer, label)


def read_trace_requests(records) -> list[TraceRequest]:
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        raise KnoweditError("requests: expected a list of fact objects (prompt, subject, answer)")
    out = [trace_request(r, i) for i, r in enumerate(records)]
    if not out:
        raise KnoweditError("requests: the list is empty; give at least one fact")
    return out
