"""Edit requests, and readers for the CounterFact/EasyEdit (flattened) and ROME formats."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..errors import KnoweditError


@dataclass
class EditRequest:
    """One fact to write. ``prompt`` holds ``{}`` where the subject goes; targets are stored
    without a leading space (editors tokenise ``" " + target``)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answer: str | None = None   # defaults to target_true (ROME's convention)
    generation_prompts: list[str] = field(default_factory=list)
    portability: list[dict] = field(default_factory=list)  # KnowEdit-style [{"prompt", "answer"}]
    case_id: str | int | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def label(self) -> str:
        return f"case {self.case_id}" if self.case_id is not None else f"request {self.subject!r}"

    @property
    def locality_answer(self) -> str | None:
        return self.neighborhood_answer or self.target_true


def make_request(prompt: str, subject: str, target_new: str, target_true: str | None = None, where: str = "request",
                 **kw) -> EditRequest:
    """Validate and normalise one request; errors name the record and the field."""
    if not isinstance(subject, str) or not subject.strip():
        raise KnoweditError(f"{where}: field 'subject' is empty; give the entity whose fact changes")
    if not isinstance(prompt, str) or not prompt.strip():
        raise KnoweditError(f"{where}: field 'prompt' is empty")
    if "{}" not in prompt:
        if subject not in prompt:
            raise KnoweditError(f"{where}: subject {subject!r} does not occur in prompt {prompt!r}; put the subject "
                                "in the prompt or mark its place with '{}'")
        prompt = prompt.replace(subject, "{}", 1)
    if prompt.count("{}") != 1:
        raise KnoweditError(f"{where}: field 'prompt' must contain exactly one '{{}}' for the subject")
    tn = (target_new or "").strip() if isinstance(target_new, str) else ""
    if not tn:
        raise KnoweditError(f"{where}: field 'target_new' is empty; give the new answer to write")
    tt = target_true.strip() if isinstance(target_true, str) and target_true.strip() else None
    if tt is not None and tt == tn:
        raise KnoweditError(f"{where}: field 'target_new' equals 'target_true' ({tn!r}); the edit would change nothing")
    return EditRequest(prompt=prompt.rstrip(), subject=subject, target_new=tn, target_true=tt, **kw)


def _as_list(v) -> list:
    if v is None:
        return []
    return [v] if isinstance(v, (str, dict)) else list(v)


def from_record(rec: dict, index: int = 0) -> EditRequest:
    """Read one record in either the ROME format (``requested_rewrite``) or the flattened
    CounterFact/EasyEdit/MEND format (``prompt, subject, target_new, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth``)."""
    if not isinstance(rec, dict):
        raise KnoweditError(f"record {index}: expected a JSON object, got {type(rec).__name__}")
    where = f"record {index}" + (f" (case_id {rec['case_id']})" if "case_id" in rec else "")
    if "requested_rewrite" in rec:
        rw = rec["requested_rewrite"]
        tn, tt = rw.get("target_new"), rw.get("target_true")
        return make_request(
            rw.get("prompt", ""), rw.get("subject", ""),
            tn.get("str") if isinstance(tn, dict) else tn,
            tt.get("str") if isinstance(tt, dict) else tt, where=where,
            paraphrase_prompts=_as_list(rec.get("paraphrase_prompts")),
            neighborhood_prompts=_as_list(rec.get("neighborhood_prompts")),
            generation_prompts=_as_list(rec.get("generation_prompts")),
            case_id=rec.get("case_id", index))
    missing = [k for k in ("prompt", "subject", "target_new") if k not in rec]
    if missing:
        raise KnoweditError(f"{where}: missing field(s) {missing}; expected the ROME format (requested_rewrite) "
                            "or the flattened format (prompt, subject, target_new, ground_truth, ...)")
    port = rec.get("portability") or []
    if isinstance(port, dict):  # KnowEdit groups portability prompts by kind
        port = [p for v in port.values() for p in _as_list(v)]
    return make_request(
        rec["prompt"], rec["subject"], rec["target_new"], rec.get("ground_truth", rec.get("target_true")),
        where=where,
        paraphrase_prompts=_as_list(rec.get("rephrase_prompt") or rec.get("paraphrase_prompts")),
        neighborhood_prompts=_as_list(rec.get("locality_prompt") or rec.get("neighborhood_prompts")),
        neighborhood_answer=rec.get("locality_ground_truth"),
        portability=port, case_id=rec.get("case_id", index))


def read_requests(records: Iterable[dict]) -> list[EditRequest]:
    """Read and validate a batch; a duplicate (same subject and prompt) is an error."""
    out, seen = [], {}
    for i, rec in enumerate(records):
        r = rec if isinstance(rec, EditRequest) else from_record(rec, i)
        key = (r.subject, r.prompt)
        if key in seen:
            raise KnoweditError(f"record {i}: duplicate edit of {r.subject!r} with prompt {r.prompt!r} "
                                f"(same as record {seen[key]}); one batch edits each fact once")
        seen[key] = i
        out.append(r)
    if not out:
        raise KnoweditError("requests: the list is empty; give at least one edit request")
    return out
