"""The circuit-size study: ROME restricted to a share of the edit layer's MLP neurons, chosen by a
knowledge circuit's neuron scores (``top``), at random, or from the other end of the ranking
(``bottom``), against the unrestricted edit.

ROME's key k* and value change δ are read from the full network and do not depend on which neurons
may change, so they are computed once per record; every (share, selection) update is then the
constrained solution ΔW[:, S] = δ (C_SS⁻¹ k*_S)ᵀ / (k*_Sᵀ C_SS⁻¹ k*_S), applied, scored and undone.

Records are CounterFact rewrites the model already knows, whose prompt template is one of a
relation's templates in ROME's known-facts file (that file names the relation, e.g. P17; the
flattened CounterFact file does not). Each record is edited through the neuron circuit of its own
relation. One JSON line per record is appended as it finishes; a rerun resumes after them."""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..circuit import Circuit
from ..errors import KnoweditError
from .collateral import build_task, collateral_metrics, task_scores
from .datasets.known import known_records
from .datasets.loaders import load_counterfact
from .edit_metrics import evaluate_requests

SELECTIONS = ("top", "random", "bottom")
FIELDS = {"name", "study", "description", "model", "seed", "dataset", "editor", "circuits", "shares",
          "selections", "collateral"}


@dataclass
class Study:
    name: str
    circuits: dict                 # relation id -> circuit path
    dataset: dict
    path: Path | None = None
    description: str = ""
    model: str | None = None
    seed: int = 0
    editor: str = "rome"
    shares: list = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    selections: list = field(default_factory=lambda: list(SELECTIONS))
    collateral: dict = field(default_factory=dict)

    def resolve(self, p) -> Path:
        p = Path(p).expanduser()
        if p.is_absolute() or p.exists() or self.path is None:
            return p
        return self.path.parent / p


def load_study(path) -> Study:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    src = str(path)
    unknown = set(data) - FIELDS
    if unknown:
        raise KnoweditError(f"{src}: unknown field(s) {sorted(unknown)}; known fields are {sorted(FIELDS)}")
    if data.get("study") != "restricted-edits":
        raise KnoweditError(f"{src}: field 'study' must be 'restricted-edits'")
    if data.get("editor", "rome") != "rome":
        raise KnoweditError(f"{src}: editor {data.get('editor')!r}: the restricted-edits study runs ROME (its δ is "
                            "shared across neuron sets); use editor: rome")
    if not isinstance(data.get("circuits"), dict) or not data["circuits"]:
        raise KnoweditError(f"{src}: 'circuits' must map relation ids to neuron circuit files, e.g. P17: facts-P17.json")
    for s in data.get("shares", []):
        if not 0 < float(s) <= 1:
            raise KnoweditError(f"{src}: shares: {s} must be in (0, 1]")
    bad = [s for s in data.get("selections", []) if s not in SELECTIONS]
    if bad:
        raise KnoweditError(f"{src}: selections {bad} are unknown; use {SELECTIONS}")
    d = {k: v for k, v in data.items() if k != "study"}
    st = Study(**d)
    st.path = path.resolve()
    return st


def template_relations(known_path) -> dict[str, str]:
    """``{template: relation id}`` from ROME's known-facts file, for templates naming one relation only."""
    seen: dict[str, set] = {}
    for r in json.loads(Path(known_path).read_text()):
        seen.setdefault(r["template"], set()).add(r["relation_id"])
    return {t: next(iter(v)) for t, v in seen.items() if len(v) == 1}


def study_records(handle, st: Study, data_path=None) -> list[tuple[str, object]]:
    """``[(relation, EditRequest)]``: known records of the study's relations, in file order."""
    ds = st.dataset
    reqs = load_counterfact(data_path or st.resolve(ds["path"]), n=ds.get("scan"))
    table = template_relations(st.resolve(ds["known_facts"]))
    tagged = [(table.get(r.prompt), r) for r in reqs]
    tagged = [(rel, r) for rel, r in tagged if rel in st.circuits]
    known = {id(r) for r in known_records(handle, [r for _, r in tagged], n=None)}
    out = [(rel, r) for rel, r in tagged if id(r) in known]
    per = ds.get("per_relation")
    if per:   # at most this many records of each relation, so one relation cannot fill the study
        kept, counts = [], dict.fromkeys(st.circuits, 0)
        for rel, r in out:
            if counts[rel] < per:
                kept.append((rel, r))
                counts[rel] += 1
        out = kept
    return out[:ds.get("n", 50)]


def neuron_sets(circuit: Circuit, layer: int, share: float, selection: str, d_mlp: int, rng) -> torch.Tensor:
    if share >= 1.0:
        return torch.arange(d_mlp)
    k = max(1, round(share * d_mlp))
    if selection == "top":
        idx = circuit.top_neurons(layer, share)
    elif selection == "bottom":
        idx = circuit.top_neurons(layer, share, end="bottom")
    else:
        idx = rng.sample(range(d_mlp), k)
    return torch.tensor(sorted(idx), dtype=torch.long)


def run_study(st: Study, out: Path, handle=None, limit: int | None = None, data_path=None, progress=True,
              model_kwargs: dict | None = None) -> Path:
    from ..editing.covariance import key_stats
    from ..editing.edit import Edit
    from ..editing.errors import EditRefused
    from ..editing.hparams import load_hparams
    from ..editing.rome import check_hparams, key_and_delta, rome_update
    from ..models import load_model

    h = handle or load_model(st.model, **(model_kwargs or {}))
    hp = load_hparams("rome", h)
    opts = check_hparams(hp, h.adapter.n_layers)
    layer = opts["layers"][0]
    circuits = {rel: Circuit.load(st.resolve(p), h) for rel, p in st.circuits.items()}
    for rel, c in circuits.items():
        c.top_neurons(layer, 0.5)   # fails early, naming the circuit, if it has no neuron scores
    out.mkdir(parents=True, exist_ok=True)
    res = out / "results.jsonl"
    done = {json.loads(x)["case"] for x in res.read_text().splitlines()} if res.exists() else set()
    recs = study_records(h, st, data_path)
    if limit:
        recs = recs[:limit]
    col = st.collateral or {}
    tasks = {t: build_task(t, h.tokenizer, n=col.get("n", 24), seed=st.seed) for t in col.get("tasks", [])}
    before = task_scores(h, tasks) if tasks else {}
    C = key_stats(h, [layer], hp)[layer].regularised(opts["ridge"])
    original = h.adapter.mlp_out(layer).weight.detach().clone()
    d_mlp = h.adapter.d_mlp
    meta = {"study": "restricted-edits", "layer": layer, "d_mlp": d_mlp, "records": len(recs), "shares": st.shares,
            "selections": st.selections, "relations": sorted(circuits), "collateral_tasks": sorted(tasks), "collateral_records": col.get("records", 0),
            "collateral_before": before, "variant": opts["variant"]}
    (out / "study.json").write_text(json.dumps(meta, indent=1) + "\n")
    if progress:
        print(f"{len(recs)} known records ({', '.join(f'{r}: {sum(x == r for x, _ in recs)}' for r in sorted(circuits))}); "
              f"ROME layer {layer}; {len(done)} already in {res}", flush=True)
    for n, (rel, req) in enumerate(recs):
        case = str(req.case_id)
        if case in done:
            continue
        t0 = time.perf_counter()
        k_mean, k_plain, delta, info = key_and_delta(h, req, hp, layer, opts)
        line = {"case": case, "relation": rel, "delta_s": round(time.perf_counter() - t0, 2), "results": []}
        with_col = n < col.get("records", 0)
        rng = random.Random(f"{st.seed}-{case}")
        for share in st.shares:
            for sel in (st.selections if share < 1.0 else ["all"]):
                S = neuron_sets(circuits[rel], layer, share, sel, d_mlp, rng)
                r = {"share": share, "selection": sel, "n_neurons": len(S)}
                try:
                    name, new = rome_update(h, req, layer, None if len(S) == d_mlp else S, C, opts, k_mean, k_plain,
                                            delta, dict(info))
                    with Edit(h, {name: new}, "rome"):   # applied for the scoring, undone bit-exactly after
                        m = evaluate_requests(h, [req])[0].metrics
                        r.update(es=m.get("cf_es"), ps=m.get("cf_ps"), ns=m.get("cf_ns"),
                                 dw_norm=float((new.double() - original.double()).norm()))
                        if with_col:
                            r.update(collateral_metrics(before, task_scores(h, tasks)))
                except EditRefused as e:
                    r.update(es=0.0, ps=0.0, ns=None, refused=str(e)[:160])
                line["results"].append(r)
        with res.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if progress:
            print(f"[{n + 1}/{len(recs)}] case {case} ({rel}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return res


def summarise(out: Path) -> list[dict]:
    """One row per (share, selection): means over records (a refused edit scores 0 efficacy)."""
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    groups: dict = {}
    for ln in lines:
        for r in ln["results"]:
            groups.setdefault((r["share"], r["selection"]), []).append(r)
    rows = []
    for (share, sel), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], SELECTIONS.index(kv[0][1])
                                                                   if kv[0][1] in SELECTIONS else -1)):
        mean = lambda k: (sum(x[k] for x in rs if x.get(k) is not None) /  # noqa: E731
                          max(1, sum(x.get(k) is not None for x in rs)))
        row = {"share": share, "selection": sel, "n_neurons": rs[0]["n_neurons"], "records": len(rs),
               "es": mean("es"), "ps": mean("ps"), "ns": mean("ns"), "dw_norm": mean("dw_norm"),
               "refused": sum("refused" in x for x in rs)}
        for k in sorted({k for x in rs for k in x if k.endswith("_delta")}):
            row[k] = mean(k)
        rows.append(row)
    return rows
