"""Dataset loaders: CounterFact (ROME and flattened EasyEdit formats) and zsRE (EasyEdit/MEND format),
with optional KnowEdit-style ``portability`` and ``locality`` fields. All return EditRequests."""
from __future__ import annotations

from pathlib import Path

from ...editing.request import EditRequest, from_record, make_request
from ...errors import KnoweditError
from ...tasks.datafile import read_json_or_lines
from .download import fetch

SOURCES = {
    # ROME's release (MIT). The sha256 is recorded on first download (see download.fetch).
    "counterfact": {"url": "https://rome.baulab.info/data/dsets/counterfact.json", "sha256": None},
    "zsre": {"url": "https://rome.baulab.info/data/dsets/zsre_mem_eval.json", "sha256": None},
}


def read_json_records(path) -> list:
    data = read_json_or_lines(path, "dataset file")
    if isinstance(data, dict):  # some releases wrap the list
        data = data.get("data") or data.get("examples") or [data]
    if not isinstance(data, list):
        raise KnoweditError(f"{path}: expected a list of records")
    return data


def _source_path(name: str, path) -> Path:
    if path is not None:
        if not Path(path).exists():
            raise KnoweditError(f"{name}: dataset file {path} does not exist; pass a local copy with --data PATH, "
                                f"or set the suite's dataset path to null to download {SOURCES[name]['url']}")
        return Path(path)
    src = SOURCES[name]
    return fetch(src["url"], Path(src["url"]).name, src["sha256"])


def _limit(records, n, offset=0):
    records = records[offset:]
    return records if n is None else records[:n]


def _locality(rec) -> tuple[list[str], str | None]:
    """KnowEdit groups locality prompts by kind: {"Relation_Specificity": [{"prompt","ground_truth"}]}."""
    loc = rec.get("locality")
    if not isinstance(loc, dict):
        return [], None
    prompts, answer = [], None
    for items in loc.values():
        for it in items if isinstance(items, list) else [items]:
            if isinstance(it, dict) and it.get("prompt"):
                prompts.append(it["prompt"])
                gt = it.get("ground_truth")
                answer = answer or (gt[0] if isinstance(gt, list) and gt else gt)
    return prompts, answer


def _portability(rec, where) -> list[dict]:
    port = rec.get("portability") or []
    if isinstance(port, dict):
        port = [p for v in port.values() for p in (v if isinstance(v, list) else [v])]
    out = []
    for j, p in enumerate(port):
        if not isinstance(p, dict) or not p.get("prompt"):
            raise KnoweditError(f"{where}: portability item {j} needs a 'prompt' and an 'answer'")
        ans = p.get("answer", p.get("ground_truth"))
        ans = ans[0] if isinstance(ans, list) and ans else ans
        if not isinstance(ans, str) or not ans.strip():
            raise KnoweditError(f"{where}: portability item {j} has no answer")
        out.append({"prompt": p["prompt"], "answer": ans})
    return out


def load_counterfact(path=None, n: int | None = None, offset: int = 0) -> list[EditRequest]:
    """CounterFact from ``path`` (ROME format or the flattened EasyEdit format), or downloaded from
    ROME's site. Rows that are malformed raise KnoweditError naming the row."""
    recs = _limit(read_json_records(_source_path("counterfact", path)), n, offset)
    out = []
    for i, rec in enumerate(recs, start=offset):
        r = from_record(rec, i)
        if not isinstance(rec, dict) or r.target_true is None:
            raise KnoweditError(f"record {i} (case_id {r.case_id}): CounterFact rows need the true answer "
                                "('ground_truth' or requested_rewrite.target_true)")
        lp, la = _locality(rec)
        if lp:
            r.neighborhood_prompts += lp
            r.neighborhood_answer = r.neighborhood_answer or la
        if not r.portability and rec.get("portability"):
            r.portability = _portability(rec, f"record {i}")
        out.append(r)
    return out


def load_zsre(path=None, n: int | None = None, offset: int = 0) -> list[EditRequest]:
    """zsRE in the EasyEdit/MEND format: ``src, rephrase, alt, answers, loc, loc_ans, subject``
    (and optional KnowEdit ``portability``/``locality``)."""
    recs = _limit(read_json_records(_source_path("zsre", path)), n, offset)
    out = []
    for i, rec in enumerate(recs, start=offset):
        where = f"record {i}"
        if not isinstance(rec, dict):
            raise KnoweditError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in ("src", "alt", "subject") if not rec.get(k)]
        if missing:
            raise KnoweditError(f"{where}: missing field(s) {missing}; zsRE rows need src, alt, subject "
                                "(and optionally rephrase, answers, loc, loc_ans)")
        answers = rec.get("answers") or []
        true = answers[0] if isinstance(answers, list) and answers else (answers or None)
        loc = rec.get("loc")
        loc_prompts = [loc[len("nq question: "):] if loc.startswith("nq question: ") else loc] if loc else []
        lp, la = _locality(rec)
        rephrase = rec.get("rephrase")
        new = rec["alt"]
        r = make_request(rec["src"], rec["subject"], new, true if true != new else None,
                         where=where, paraphrase_prompts=[rephrase] if rephrase else [],
                         neighborhood_prompts=loc_prompts + lp,
                         neighborhood_answer=rec.get("loc_ans") or la,
                         portability=_portability(rec, where), case_id=rec.get("case_id", i))
        out.append(r)
    return out


LOADERS = {"counterfact": load_counterfact, "zsre": load_zsre}


def load_dataset(name: str, path=None, n: int | None = None, offset: int = 0) -> list[EditRequest]:
    if name not in LOADERS:
        raise KnoweditError(f"dataset {name!r} is unknown; use one of {sorted(LOADERS)}")
    return LOADERS[name](path, n=n, offset=offset)
