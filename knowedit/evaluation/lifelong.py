"""Lifelong (sequential) editing: N edits in batches of b, the model carrying every earlier edit,
measured at checkpoints, resumable bit-exactly.

Each editor of the study is its own run on the original weights (restored bit-exactly between editors).
Its batches go through ``knowedit.editing.edit(..., state=state)`` in dataset order with one ``state``
dict for the whole run (editors that remember earlier edits keep them there); batch i is seeded with
``seed + i·b``, so no other random state needs saving. An edit that raises a :class:`KnoweditError`
(``EditRefused`` included) changes nothing; it is recorded and the run goes on with the next batch.

At edit count 0 (the unedited model), every ``checkpoint_every`` edits and at the end, a row measures:

* retention over every edit applied so far: ``cf_es``/``cf_ps``/``cf_ns`` (CounterFact probability
  protocol) and ``ee_rewrite_acc``/``ee_rephrase_acc``/``ee_locality_acc`` (EasyEdit token accuracy; locality
  against the unedited model's argmax on the same prompts); ``cf_es_latest`` over the edits since the
  previous checkpoint. At 0 edits the same metrics are the unedited model's over all N requests.
* ``ppl_heldout`` (built-in held-out text), ``gen_entropy`` (ROME's n-gram entropy of seeded top-k
  generations from a fixed prompt set: the first ``generation.prompts`` requests' prompts),
  ``task_<name>`` and ``task_<name>_delta`` for each circuit task;
* ``collapse``: perplexity >= ``perplexity_ratio`` x the unedited one (or not finite), or entropy <
  ``entropy_min``; ``collapse_reasons`` says which.
* ``seconds`` (wall time of this editor's run so far, evaluation included, across restarts),
  ``edit_seconds`` (the part spent in edit calls) and ``eval_seconds`` (this checkpoint's measurement).

A restart with the same ``--out`` checks the study, the model fingerprint and the selected requests against
``run.json`` (any difference is an error that changes nothing), skips finished editors and continues the
others from their last checkpoint. Before loading a checkpoint's weights and state it fills, from the original
weights, what the editor computes on first use (sampled context prefixes, statistics, preserved tasks' keys:
``knowedit.editing.api.warm_caches``), so the continued run is bit-identical to an uninterrupted one.
With a shard (``--shard i/n`` or a multi-process launch) a process runs whole editors: those at positions
``i, i + n, ...`` of the study's list, since an editor's edits are sequential by nature.
Files: see :mod:`knowedit.evaluation.lifelong_checkpoint`."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import KnoweditError
from ..editing.edit import values_before
from ..models.cache import file_lock
from ..models.weights import read_param, write_param
from . import lifelong_checkpoint as ck
from .collateral import build_task, collateral_metrics, task_scores
from .edit_metrics import RequestEval, aggregate_cf_s, evaluate_requests
from .fluency import generate, mean_ngram_entropy
from .lifelong_suite import LifelongSuite, checkpoint_counts
from .perplexity import perplexity
from .runner import _hparams, select_requests
from .shards import Shard, check_shard_count

MEAN_KEYS = ("cf_es", "cf_ps", "cf_ns", "ee_rewrite_acc", "ee_rephrase_acc", "ee_locality_acc")
TIMING = ("seconds", "edit_seconds", "eval_seconds")   # the only row fields two identical runs may differ in


def apply_batch(handle, requests, method: str, hparams, seed: int, state: dict | None):
    """One ``edit()`` call; returns the applied edit (the seam the tests wrap). ``edit`` hands ``state``
    only to editors that remember earlier edits; for the others it stays empty."""
    from ..editing import edit
    return edit(handle, requests, method=method, hparams=hparams, seed=seed, state=state)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(evals: list[RequestEval]) -> dict:
    m = {k: _mean([e.metrics.get(k) for e in evals]) for k in MEAN_KEYS}
    m["cf_s"] = aggregate_cf_s(m["cf_es"], m["cf_ps"], m["cf_ns"])
    return m


def collapse_reasons(ppl: float, ppl0: float, entropy: float | None, rules: dict) -> list[str]:
    """Why a checkpoint counts as collapsed (empty: it does not); a perplexity that is not finite counts."""
    out = []
    if not math.isfinite(ppl) or ppl >= rules["perplexity_ratio"] * ppl0:
        out.append("perplexity")
    if rules.get("entropy_min") is not None and entropy is not None and not entropy >= rules["entropy_min"]:
        out.append("entropy")
    return out


@dataclass
class Bench:
    """What every checkpoint measures, fixed for the whole run."""
    suite: LifelongSuite
    requests: list
    pre: list[RequestEval]          # the unedited model's evaluation of every request
    tasks: dict
    tasks0: dict                    # unedited task scores
    gen_prompts: list[str]
    baseline: dict                  # the measurements of the unedited model (the rows at 0 edits)
    progress: bool = True

    def evaluate(self, handle, idx: list[int], reference: bool = True) -> list[RequestEval]:
        """Both protocols for requests ``idx``, in chunks (a progress bar when there are many)."""
        from tqdm.auto import tqdm
        bs = self.suite.eval_batch_size
        chunk = 8 * bs
        out = []
        starts = range(0, len(idx), chunk)
        for s in tqdm(starts, desc="retention", unit="chunk", leave=False,
                      disable=not self.progress or len(starts) < 2):
            part = idx[s:s + chunk]
            ref = [self.pre[i] for i in part] if reference else None
            out += evaluate_requests(handle, [self.requests[i] for i in part], reference=ref, batch_size=bs)
        return out

    def health(self, handle) -> dict:
        """Perplexity, generation entropy and task scores under the current weights."""
        g = self.suite.generation
        ent = (mean_ngram_entropy(generate(handle, self.gen_prompts, g["tokens"], seed=self.suite.seed))
               if self.gen_prompts else None)
        scores = task_scores(handle, self.tasks, self.suite.eval_batch_size) if self.tasks else {}
        if not self.tasks0:   # the first call measures the unedited model
            self.tasks0 = scores
        return {"ppl_heldout": perplexity(handle), "gen_entropy": ent, **collateral_metrics(self.tasks0, scores)}

    def measure(self, handle, applied: list[int], latest: list[int]) -> dict:
        evals = self.evaluate(handle, applied)
        row = summarise(evals)
        pos = {i: j for j, i in enumerate(applied)}
        row["cf_es_latest"] = _mean([evals[pos[i]].metrics.get("cf_es") for i in latest if i in pos])
        row.update(self.health(handle))
        return row


def _suite_key(suite: LifelongSuite, hps: list) -> dict:
    """The study's content as a restart must match it (hparams files read; the description is free)."""
    d = suite.to_dict()
    d.pop("description", None)
    for e, hp in zip(d["editors"], hps):
        e["hparams"] = hp
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _request_digest(requests) -> str:
    return ck.digest([[r.case_id, r.text, r.target_new, r.target_true, r.paraphrase_prompts,
                       r.neighborhood_prompts] for r in requests])


def editor_hparams(spec, suite) -> dict | None:
    hp = _hparams(spec, suite)
    if spec.preserve is not None:
        hp = {**(hp or {}), "preserve": spec.preserve}
    return hp


def _prepare(handle, suite, requests, tasks: dict, out: Path, run_key: str, progress: bool) -> Bench:
    gen = [(r.generation_prompts or [r.text])[0] for r in requests[:suite.generation["prompts"]]]
    bench = Bench(suite, requests, [], tasks, {}, gen, {}, progress)
    cached = ck.read_json(out / ck.PRE)
    if cached is not None and cached.get("run") == run_key:
        bench.pre = [RequestEval(m, a) for m, a in zip(cached["metrics"], cached["locality_argmax"])]
        bench.tasks0 = {t: cached["tasks0"][t] for t in tasks}   # the suite's order, as in a fresh run
        bench.baseline = cached["baseline"]
        return bench
    t0 = time.perf_counter()
    _log(out, progress, f"measuring the unedited model on {len(requests)} requests")
    bench.pre = bench.evaluate(handle, list(range(len(requests))), reference=False)
    bench.baseline = {**summarise(bench.pre), "cf_es_latest": None, **bench.health(handle),
                      "eval_seconds": time.perf_counter() - t0}
    ck.write_json(out / ck.PRE, {"run": run_key, "metrics": [e.metrics for e in bench.pre],
                                 "locality_argmax": [e.locality_argmax for e in bench.pre],
                                 "tasks0": bench.tasks0, "baseline": bench.baseline})
    return bench


def _log(out: Path, progress: bool, line: str) -> None:
    ck.append_log(out, line)
    if progress:
        from tqdm.auto import tqdm
        tqdm.write(line)


def _fmt(v, nd=3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def log_line(row: dict, n: int) -> str:
    tasks = " ".join(f"{k[5:]} {_fmt(v, 2)}" for k, v in row.items()
                     if k.startswith("task_") and not k.endswith("_delta"))
    flag = f" COLLAPSE({','.join(row['collapse_reasons'])})" if row["collapse"] else ""
    return (f"[{row['editor']}] edits {row['edits']}/{n} (refused {row['refused']}) ES {_fmt(row['cf_es'])} "
            f"PS {_fmt(row['cf_ps'])} NS {_fmt(row['cf_ns'])} ppl {_fmt(row['ppl_heldout'], 2)} "
            f"entropy {_fmt(row['gen_entropy'], 2)} {tasks} | {row['seconds']:.0f} s (edit {row['edit_seconds']:.0f} s)"
            f"{flag}")


def _edits_of(e) -> list:
    """The plain edits inside an Edit or an EditSequence."""
    return [x for sub in e.edits for x in _edits_of(sub)] if hasattr(e, "edits") else [e]


class EditorRun:
    """One editor's sequential run; ``originals`` holds the unedited value of every tensor it changed."""

    def __init__(self, handle, bench: Bench, spec, hparams, out: Path, run_key: str):
        self.h, self.bench, self.spec, self.hp, self.out, self.run_key = handle, bench, spec, hparams, out, run_key
        self.path = ck.checkpoint_path(out, spec.label)
        self.params = dict(handle.model.named_parameters())
        self.originals: dict[str, torch.Tensor] = {}
        self.state: dict = {}
        self.edits, self.applied, self.refused, self.rows = 0, [], [], []
        self.seconds = self.edit_seconds = 0.0
        self.done = False

    # ---- checkpoints ----------------------------------------------------------------------------
    def load(self) -> bool:
        """Continue from this editor's checkpoint, if any; returns whether there was one."""
        c = ck.load_checkpoint(self.path, self.run_key, self.h.device)
        if c is None:
            return False
        self.edits, self.applied, self.refused = c["edits"], c["applied"], c["refused"]
        self.rows, self.seconds, self.edit_seconds, self.done = c["rows"], c["seconds"], c["edit_seconds"], c["done"]
        if self.done:
            return True
        if self.edits:
            self._prime()
        with torch.no_grad():
            for n, v in c["weights"].items():
                if n not in self.params:
                    raise KnoweditError(f"{self.path}: parameter {n!r} is not in this model; pass another --out")
                self.originals[n] = read_param(self.h.model, n).clone()
                write_param(self.h.model, n, v)
        self.state = c["state"]
        if self.h.current_fingerprint() != c["fingerprint"]:
            raise KnoweditError(f"{self.path}: the weights after loading differ from those saved; delete the file "
                                "to restart this editor")
        return True

    def _prime(self) -> None:
        """Fill what the editor computes on first use (sampled prefixes, statistics, preserved keys) from
        the original weights, as an uninterrupted run did, before the checkpoint's weights load."""
        from ..editing.api import warm_caches
        warm_caches(self.h, self.spec.name, copy.deepcopy(self.hp))

    def save(self) -> None:
        weights = {n: read_param(self.h.model, n).cpu().clone() for n in sorted(self.originals)}
        ck.save_checkpoint(self.path, {
            "run": self.run_key, "editor": self.spec.label, "method": self.spec.name, "edits": self.edits,
            "done": self.done, "applied": self.applied, "refused": self.refused, "rows": self.rows,
            "seconds": self.seconds, "edit_seconds": self.edit_seconds, "state": self.state, "weights": weights,
            "fingerprint": self.h.current_fingerprint()})

    def restore(self) -> None:
        """Back to the original weights, bit-exactly."""
        with torch.no_grad():
            for n, v in self.originals.items():
                write_param(self.h.model, n, v)
        self.originals.clear()

    # ---- the run ---------------------------------------------------------------------------------
    def row(self, measured: dict, prev_edits: int) -> dict:
        b = self.bench
        r = {"editor": self.spec.label, "method": self.spec.name, "batch": self.spec.batch, "edits": self.edits,
             "applied": len(self.applied), "refused": sum(len(x["cases"]) for x in self.refused),
             "refused_new": [x for x in self.refused if prev_edits <= x["at"] < self.edits],
             "scope": "edits applied so far" if self.edits else "all requests, unedited", **measured,
             "seconds": self.seconds, "edit_seconds": self.edit_seconds}
        r["ppl_ratio"] = r["ppl_heldout"] / b.baseline["ppl_heldout"]
        r["collapse_reasons"] = collapse_reasons(r["ppl_heldout"], b.baseline["ppl_heldout"], r["gen_entropy"],
                                                 b.suite.collapse)
        r["collapse"] = bool(r["collapse_reasons"])
        return r

    def checkpoint(self, measured: dict, prev_edits: int) -> dict:
        self.rows.append(self.row(measured, prev_edits))
        self.done = self.edits >= len(self.bench.requests)
        self.save()
        return self.rows[-1]

    def run(self, on_checkpoint) -> list[dict]:
        from tqdm.auto import tqdm

        b, spec, n = self.bench, self.spec, len(self.bench.requests)
        if not self.load():
            self.checkpoint(dict(b.baseline), 0)
            on_checkpoint(self)
        if self.done:
            return self.rows
        marks = set(checkpoint_counts(n, b.suite.checkpoint_every))
        start, prev = time.perf_counter() - self.seconds, self.edits
        bar = tqdm(total=n, initial=self.edits, desc=f"lifelong {spec.label}", unit="edit", disable=not b.progress)
        try:
            while self.edits < n:
                idx = list(range(self.edits, min(self.edits + spec.batch, n)))
                self._edit(idx)
                self.edits = idx[-1] + 1
                bar.update(len(idx))
                if self.edits in marks:
                    t0 = time.perf_counter()
                    measured = b.measure(self.h, self.applied, [i for i in self.applied if i >= prev])
                    measured["eval_seconds"] = time.perf_counter() - t0
                    self.seconds = time.perf_counter() - start
                    self.checkpoint(measured, prev)
                    prev = self.edits
                    on_checkpoint(self)
        finally:
            bar.close()
        return self.rows

    def _edit(self, idx: list[int]) -> None:
        reqs = [self.bench.requests[i] for i in idx]
        fp = self.h.current_fingerprint()
        t0 = time.perf_counter()
        try:
            e = apply_batch(self.h, reqs, self.spec.name, copy.deepcopy(self.hp), self.bench.suite.seed + idx[0],
                            self.state)
        except KnoweditError as err:
            if self.h.current_fingerprint() != fp:
                raise KnoweditError(f"editor {self.spec.label!r} raised ({err}) but left the weights changed; "
                                    "the run stops (results so far are saved)") from err
            self.refused.append({"at": idx[0], "cases": [r.case_id for r in reqs], "error": str(err),
                                 "type": type(err).__name__})
        else:
            left_out = {}   # requests an editor refused alone while editing the rest of the batch
            for name, v in values_before(_edits_of(e)).items():
                self.originals.setdefault(name, v)
            for x in _edits_of(e):
                left_out.update({int(r["position"]): r for r in x.info.get("refused", [])})
            if left_out:
                self.refused.append({"at": idx[0], "cases": [reqs[p].case_id for p in sorted(left_out)],
                                     "error": "; ".join(r["reason"] for r in list(left_out.values())[:3]),
                                     "type": "EditRefused"})
            self.applied += [i for p, i in enumerate(idx) if p not in left_out]
        self.edit_seconds += time.perf_counter() - t0


def run_lifelong(suite: LifelongSuite, out, handle=None, limit: int | None = None, data_path=None,
                 progress: bool = True, shard: Shard | None = None, model_kwargs: dict | None = None) -> Path:
    """Run the lifelong study ``suite`` into ``out`` (resuming what is there); returns ``rows.jsonl``.
    ``limit`` caps the number of edits (it is part of what a restart must match). ``shard`` runs only
    that shard's editors and returns its rows file."""
    from ..editing.hparams import load_hparams
    from ..models import load_model

    out = Path(out)
    shard = shard if shard is not None and shard.count > 1 else None
    check_shard_count(ck.read_run(out), shard, out)
    if limit is not None:
        suite = replace(suite, dataset={**suite.dataset, "n": min(limit, suite.n)})
    hps = [editor_hparams(e, suite) for e in suite.editors]
    key = _suite_key(suite, hps)
    ck.verify_run(out, {"study": "lifelong", "suite": key})
    handle = handle or load_model(suite.model, **(model_kwargs or {}))
    if not handle.is_unedited():
        raise KnoweditError(f"model {handle.name!r} is edited (its weights differ from those loaded); "
                            "undo the edits or load it again")
    ck.verify_run(out, {"model": handle.name, "model_fingerprint": handle.fingerprint})
    for e, hp in zip(suite.editors, hps):   # unknown methods and hparams fail here, before anything runs
        load_hparams(e.name, handle, copy.deepcopy(hp))
    ds = suite.dataset
    requests = select_requests(handle, ds, suite.n, data_path or suite.resolve(ds.get("path")), suite.eval_batch_size)
    if not requests:
        raise KnoweditError(f"{suite.name}: no records selected from dataset {ds['name']!r}")
    digest = _request_digest(requests)
    ck.verify_run(out, {"requests": {"n": len(requests), "digest": digest}})
    run_key = ck.digest([key, handle.fingerprint, digest])
    tasks = {t: build_task(t, handle.tokenizer, n=suite.task_n, seed=suite.seed) for t in suite.tasks}
    out.mkdir(parents=True, exist_ok=True)
    ck.write_run(out, {"study": "lifelong", "suite_name": suite.name, "description": suite.description, "suite": key,
                       "model": handle.name, "model_fingerprint": handle.fingerprint, "run_key": run_key,
                       "requests": {"n": len(requests), "digest": digest},
                       "tasks": {k: {"metric": t.metric, "n": len(t)} for k, t in tasks.items()},
                       "checkpoints": checkpoint_counts(len(requests), suite.checkpoint_every),
                       **({"shards": shard.count} if shard else {})})
    if len(requests) < suite.n:
        _log(out, progress, f"note: only {len(requests)} of the {suite.n} requested records were selected "
                            "(raise dataset.scan to find more known facts)")
    # The shards share the unedited measurements: one computes them, the others wait and read them.
    with file_lock(out / ck.PRE) if shard else contextlib.nullcontext():
        bench = _prepare(handle, suite, requests, tasks, out, run_key, progress)
    rows: dict[str, list] = {}

    def on_checkpoint(r: EditorRun) -> None:
        rows[r.spec.label] = r.rows
        ck.write_rows(out, [x for lab in rows for x in rows[lab]], shard)
        _log(out, progress, log_line(r.rows[-1], len(requests)))

    mine = list(zip(suite.editors, hps))
    for spec, hp in (shard.take(mine) if shard else mine):
        r = EditorRun(handle, bench, spec, hp, out, run_key)
        try:
            rows[spec.label] = r.run(on_checkpoint)
        finally:
            r.restore()
        if not handle.is_unedited():
            raise KnoweditError(f"editor {spec.label!r} changed weights outside its edits; the original weights "
                                "could not be restored")
    ck.write_rows(out, [x for lab in rows for x in rows[lab]], shard)
    return out / (shard.file_name(ck.ROWS) if shard else ck.ROWS)


def is_complete(out) -> bool:
    """Whether every editor of the run in ``out`` has reached its last edit, whatever shard ran it."""
    meta = ck.read_run(out)
    n = (meta.get("requests") or {}).get("n")
    labels = [e.get("label") or e.get("name") for e in (meta.get("suite") or {}).get("editors", [])]
    try:
        rows = ck.read_rows(out)
    except KnoweditError:
        return False
    last = {}
    for r in rows:
        last[r["editor"]] = max(last.get(r["editor"], 0), r["edits"])
    return bool(labels) and n is not None and all(last.get(lab) == n for lab in labels)
