"""Run a suite: for each case the model knows, each editor and each mask condition, apply the edit,
measure everything, undo it, and append one record. Restarting skips the records already written.

With a :class:`~knowedit.evaluation.shards.Shard` the process runs every COUNT-th selected case into its
own results file; the shards of a run share ``--out`` and its ``run.json`` (identical in every shard)."""
from __future__ import annotations

import contextlib
import importlib
import json
import time
from pathlib import Path

import torch

from ..errors import KnoweditError
from ..models.cache import atomic_write_text, file_lock
from .collateral import build_task, collateral_metrics, task_scores
from .conditions import condition_circuit, load_circuit
from .datasets import known_records, load_dataset
from .edit_metrics import evaluate_requests
from .editors import get_editor, register_editor
from .fluency import generate, mean_ngram_entropy
from .perplexity import perplexity
from .results import ResultStore, load_records, record_key
from .shards import Shard, check_shard_count
from .suite import Suite

RUN_META = "run.json"


def _editor_fn(spec):
    if spec.callable:
        mod, _, attr = spec.callable.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise KnoweditError(f"editor {spec.name!r}: cannot import callable {spec.callable!r} ({e})") from None
        register_editor(spec.name, fn)
    return get_editor(spec.name)


def _hparams(spec, suite: Suite):
    h = spec.hparams
    if isinstance(h, str):  # a YAML file, e.g. editors/rome/smollm2-135m.yaml
        import yaml
        p = suite.resolve(h)
        if not p.exists():
            raise KnoweditError(f"editor {spec.name!r}: hparams file {p} does not exist")
        return yaml.safe_load(p.read_text())
    return h


def _gen_prompts(req, k: int) -> list[str]:
    return (req.generation_prompts or [req.text])[:k]


def read_meta(out: Path) -> dict:
    p = Path(out) / RUN_META
    return json.loads(p.read_text()) if p.exists() else {}


def _check_meta(out: Path, meta: dict, shard: Shard | None) -> None:
    # Shards start together: the lock keeps one from writing run.json between another's check and write.
    with file_lock(out / RUN_META) if shard else contextlib.nullcontext():
        old = read_meta(out)
        if old:
            for key in ("suite_name", "model_fingerprint"):
                if old.get(key) != meta.get(key):
                    raise KnoweditError(f"{out}: holds results of a different run ({key} {old.get(key)!r} != "
                                        f"{meta.get(key)!r}); use another --out directory")
            check_shard_count(old, shard, out)
        atomic_write_text(out / RUN_META, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def is_complete(out) -> bool:
    """Whether ``out`` holds a record for every (case, editor, condition) of its run, whatever shard wrote it."""
    meta = read_meta(out)
    s = meta.get("suite") or {}
    want = meta.get("n_cases", 0) * len(s.get("editors") or []) * len(s.get("conditions") or [])
    return bool(want) and len(load_records(out)) >= want


def select_requests(handle, ds: dict, n: int, path, batch_size: int = 32) -> list:
    """The suite's ``dataset`` records: the first ``n`` (after ``offset``), or with ``known_only`` the
    first ``n`` the model knows among the first ``scan`` rows."""
    if ds.get("known_only", False):
        pool = load_dataset(ds["name"], path, n=ds.get("scan", max(10 * n, 100)), offset=ds.get("offset", 0))
        return known_records(handle, pool, n=n, batch_size=batch_size)
    return load_dataset(ds["name"], path, n=n, offset=ds.get("offset", 0))


def run_suite(suite: Suite, out, handle=None, limit: int | None = None, data_path=None, progress=True,
              shard: Shard | None = None, model_kwargs: dict | None = None) -> Path:
    """Run ``suite`` into directory ``out``; returns the results file. ``limit`` caps the cases (before
    they are split); ``shard`` runs only that shard's cases, into its own file. ``model_kwargs`` go to
    ``load_model`` (dtype, device, device_map, ...) when no ``handle`` is given."""
    from tqdm.auto import tqdm

    from ..models import load_model

    out = Path(out)
    shard = shard if shard is not None and shard.count > 1 else None
    check_shard_count(read_meta(out), shard, out)   # before anything is loaded or written
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(suite.seed)
    if handle is None:
        handle = load_model(suite.model, **(model_kwargs or {}))
    editors = {e.name: (_editor_fn(e), _hparams(e, suite)) for e in suite.editors}
    circuit = load_circuit(suite.resolve(suite.circuit), handle) if suite.circuit else None
    masks = {}
    if circuit is not None and circuit.extra.get("weight_mask"):
        # a learned weight mask: the controls are drawn element-wise (same count per matrix type)
        from ..editing.masking import mask_conditions
        allc = mask_conditions(handle, circuit.parameter_mask(handle), seed=suite.seed)
        masks = {c: allc[c] for c in suite.conditions}
    else:
        circuits = {c: condition_circuit(circuit, c, seed=suite.seed) for c in suite.conditions}
        for c, circ in circuits.items():
            if circ is not None:
                circ.save(out / "circuits" / f"{c}.json")
            masks[c] = circ.parameter_mask(handle) if circ is not None else None

    ds = dict(suite.dataset)
    n = ds.get("n", 10) if limit is None else min(limit, ds.get("n", limit))
    requests = select_requests(handle, ds, n, data_path or suite.resolve(ds.get("path")), suite.batch_size)
    if not requests:
        raise KnoweditError(f"suite {suite.name!r}: no records selected from dataset {ds['name']!r}")

    tasks = {t: build_task(t, handle.tokenizer, n=suite.task_n, seed=suite.seed) for t in suite.tasks} \
        if "collateral" in suite.metrics else {}
    # The same in every shard (no shard index): the shards of one run agree on it.
    _check_meta(out, {"suite_name": suite.name, "suite": suite.to_dict(), "model": handle.name,
                      "model_fingerprint": handle.fingerprint, "n_cases": len(requests),
                      "shards": shard.count if shard else 1,
                      "tasks": {k: {"metric": t.metric, "n": len(t)} for k, t in tasks.items()}}, shard)

    store = ResultStore(out, shard)
    done = store.done_keys()
    # Split after the selection, which every shard repeats identically, so the shards partition one case list.
    cases = shard.take(requests) if shard else requests
    jobs = [(r, e, c) for r in cases for e in editors for c in suite.conditions
            if record_key(r.case_id, e, c) not in done]
    if not jobs:
        return store.path
    pending = list({id(r): r for r, _, _ in jobs}.values())
    m = set(suite.metrics)
    # Everything measured before editing is measured once per case, batched across cases.
    before_ev = evaluate_requests(handle, pending, batch_size=suite.batch_size)
    before = {id(r): ev for r, ev in zip(pending, before_ev)}
    ppl0 = perplexity(handle) if "perplexity" in m else None
    tasks0 = task_scores(handle, tasks, suite.batch_size) if tasks else {}
    gk, gt = suite.generation.get("prompts", 2), suite.generation.get("tokens", 100)
    gen0 = {id(r): generate(handle, _gen_prompts(r, gk), gt, seed=suite.seed) for r in pending} \
        if "generation" in m else {}
    fp0 = handle.current_fingerprint()

    bar = tqdm(jobs, desc=f"eval {suite.name}" + (f" [shard {shard}]" if shard else ""), disable=not progress,
               unit="edit")
    for req, ename, cond in bar:
        bar.set_postfix_str(f"{ename}/{cond}/{req.case_id}")
        fn, hp = editors[ename]
        mask = masks[cond]
        rec = {"key": record_key(req.case_id, ename, cond), "case_id": req.case_id, "editor": ename,
               "condition": cond, "subject": req.subject, "prompt": req.text, "target_new": req.target_new,
               "target_true": req.target_true, "seed": suite.seed, "error": None}
        b = before[id(req)]
        rec["before"] = _pick(b.metrics, m)
        if ppl0 is not None:
            rec["before"]["ppl_heldout"] = ppl0
        for k, v in tasks0.items():
            rec["before"]["task_" + k.replace("-", "_")] = v
        t0 = time.perf_counter()
        torch.manual_seed(suite.seed)
        try:
            edit = fn(handle, [req], hparams=hp, mask=mask, mode=suite.mode, seed=suite.seed)
        except KnoweditError as e:  # e.g. the mask leaves the editor nothing to change: a result, not a crash
            rec["error"] = str(e)
            rec["metrics"] = {}
            store.append(rec)
            continue
        try:
            if not edit.applied:
                edit.apply()
            rec["edit_seconds"] = time.perf_counter() - t0
            after = evaluate_requests(handle, [req], reference=[b], batch_size=suite.batch_size)[0]
            met = _pick(after.metrics, m)
            if "perplexity" in m:
                met["ppl_heldout"] = perplexity(handle)
            if "norms" in m:
                norms = edit.norms()
                rec["norms"] = norms
                met["edit_norm_total"] = float(sum(v * v for v in norms.values()) ** 0.5)
                met["edit_n_matrices"] = len(norms)
            if "generation" in m:
                g1 = generate(handle, _gen_prompts(req, gk), gt, seed=suite.seed)
                met["cf_gen_entropy"] = mean_ngram_entropy(g1)
                rec["before"]["cf_gen_entropy"] = mean_ngram_entropy(gen0[id(req)])
                rec["generation"] = {"prompt": _gen_prompts(req, gk)[0], "before": gen0[id(req)][0], "after": g1[0]}
            if tasks:
                met.update(collateral_metrics(tasks0, task_scores(handle, tasks, suite.batch_size)))
            rec["metrics"] = met
        finally:
            edit.undo()
        if handle.current_fingerprint() != fp0:
            raise KnoweditError(f"editor {ename!r} left the model changed after undo (case {req.case_id}); "
                                "results so far are saved")
        rec["seconds"] = time.perf_counter() - t0
        store.append(rec)
    return store.path


def _pick(metrics: dict, groups: set) -> dict:
    keep = []
    if "counterfact" in groups:
        keep.append("cf_")
    if "easyedit" in groups:
        keep.append("ee_")
    return {k: v for k, v in metrics.items() if k.startswith(tuple(keep))}
