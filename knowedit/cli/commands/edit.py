"""``knowedit edit``: apply ROME, MEMIT, AlphaEdit, FT-L or FT-M edits, optionally restricted by a circuit
and kept off the circuit tasks' inputs (``--preserve``)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ...errors import KnoweditError
from ...tasks.datafile import read_json_or_lines
from ..model_options import add_model_args, load_from_args

PROB_NOTE = ("P(x) = probability of the whole target x given the prompt (teacher-forced product over its "
             "tokens, target tokenised with a leading space); 'new' = target_new, 'true' = target_true.")


def add_parser(sub):
    p = sub.add_parser("edit", help="edit facts in a model (ROME, MEMIT, AlphaEdit, FT-L, FT-M), optionally inside a "
                                    "circuit or keeping circuit tasks untouched")
    add_model_args(p)
    p.add_argument("--editor", required=True, choices=["rome", "memit", "alphaedit", "ft-l", "ft-m"])
    p.add_argument("--requests", required=True, help="JSON list (or JSONL) of requests, CounterFact/EasyEdit or ROME format")
    p.add_argument("--hparams", default=None, help="YAML/JSON hyperparameters (EasyEdit's files work) over editors/<editor>/<model>.yaml")
    p.add_argument("--circuit", default=None, help="circuit JSON whose parameter mask restricts the edit")
    p.add_argument("--mode", default="restrict", choices=["restrict", "ablate"])
    p.add_argument("--mask", default="circuit", choices=["circuit", "complement", "random"],
                   help="which condition of the circuit to use (random: same head and neuron counts, --seed)")
    p.add_argument("--ports", default="qkvo", help="head ports a circuit head contributes (default qkvo)")
    p.add_argument("--include-norms", action="store_true", help="let masks include LayerNorm/RMSNorm weights")
    p.add_argument("--preserve", default=None, metavar="TASKS",
                   help="comma-separated tasks whose inputs to the edited matrices the edit must not change, e.g. "
                        "ioi,colored-objects (sets hparams 'preserve'; see preserve_threshold)")
    p.add_argument("--sequential", action="store_true", help="one edit per request, in order (default: one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the edited model + tokenizer here (save_pretrained)")
    return p


def read_request_file(path) -> list:
    data = read_json_or_lines(path, "--requests", "give a JSON list or JSON lines of edit requests")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise KnoweditError(f"--requests: {path} must hold a list of request objects")
    return data


def _check_save_dir(save) -> Path | None:
    if save is None:
        return None
    d = Path(save)
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise KnoweditError(f"--save: {d} exists and is not empty; choose a new directory")
    return d


def format_table(reqs, before, after) -> str:
    w = max(12, min(48, max(len(r.text) for r in reqs)))
    head = (f"{'case':>6}  {'prompt':<{w}}  {'new':<12} {'true':<12} {'P(new) before':>13} {'P(new) after':>12} "
            f"{'P(true) before':>14} {'P(true) after':>13}")
    lines = [head]
    for i, r in enumerate(reqs):
        def f(x):
            return "-" if x is None else f"{x:.4f}"
        text = r.text if len(r.text) <= w else r.text[: w - 1] + "…"
        lines.append(f"{str(r.case_id if r.case_id is not None else i):>6}  {text:<{w}}  {r.target_new[:12]:<12} "
                     f"{(r.target_true or '-')[:12]:<12} {f(before[0][i]):>13} {f(after[0][i]):>12} "
                     f"{f(before[1][i]):>14} {f(after[1][i]):>13}")
    return "\n".join(lines)


def run(args):
    from ...editing import edit, editor, read_requests
    from ...editing.masking import describe_conditions, format_conditions, mask_conditions
    from ...editing.probes import sequence_probs

    editor(args.editor)  # an editor missing from this installation fails before the model loads
    save = _check_save_dir(args.save)
    reqs = read_requests(read_request_file(args.requests))
    if args.circuit is None and (args.mode != "restrict" or args.mask != "circuit"):
        raise KnoweditError("--mode/--mask need --circuit")
    handle = load_from_args(args)
    print(f"model: {handle.name} ({handle.adapter.family}, {handle.adapter.n_layers} layers)  editor: {args.editor}")
    mask = None
    if args.circuit:
        from ...circuit import Circuit

        circuit = Circuit.load(args.circuit, handle)
        conds = mask_conditions(handle, circuit, seed=args.seed, ports=args.ports, include_norms=args.include_norms)
        print(f"\ncircuit {args.circuit}: {len(circuit.heads())} heads, {len(circuit.mlps())} MLPs; "
              f"using the {args.mask!r} mask, mode {args.mode!r}")
        print(format_conditions(describe_conditions(conds)))
        mask = conds[args.mask]

    def probs():
        new = sequence_probs(handle, [r.text for r in reqs], [r.target_new for r in reqs])
        idx = [i for i, r in enumerate(reqs) if r.target_true]
        tv = sequence_probs(handle, [reqs[i].text for i in idx], [reqs[i].target_true for i in idx]) if idx else []
        true = [None] * len(reqs)
        for i, v in zip(idx, tv):
            true[i] = v
        return new, true

    hparams = args.hparams
    if args.preserve:
        from ...editing.hparams import load_hparams
        hparams = dict(load_hparams(args.editor, handle, args.hparams),
                       preserve=[t.strip() for t in args.preserve.split(",") if t.strip()])
        hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
        tasks_before = _task_scores(handle, hparams["preserve"])
    before = probs()
    t0 = time.perf_counter()
    e = edit(handle, reqs, method=args.editor, hparams=hparams, mask=mask, mode=args.mode, seed=args.seed,
             sequential=args.sequential)
    dt = time.perf_counter() - t0
    after = probs()
    for n in e.info.get("hparams_notes", []) if not args.sequential else e.edits[0].info.get("hparams_notes", []):
        print(f"note: {n}")
    print(f"\n{len(reqs)} request(s) edited in {dt:.1f} s ({'sequential' if args.sequential else 'one batch'})")
    for x in (list(e) if args.sequential else [e]):
        norms = x.norms()
        total = sum(v * v for v in norms.values()) ** 0.5
        extra = "".join(f", {k.replace('_', ' ')} {x.info[k]:,}" for k in ("trained_elements", "pruned_elements",
                                                                         "optimizer_steps") if k in x.info)
        print(f"  {x.method}: {len(norms)} tensor(s) changed, |delta| {total:.3g}{extra}")
    print()
    print(format_table(reqs, before, after))
    print(f"\n{PROB_NOTE}")
    if args.preserve:
        _print_preserve(list(e) if args.sequential else [e], tasks_before, _task_scores(handle, hparams["preserve"]))
    if save is not None:
        handle.save_pretrained(save)
        edits = list(e) if args.sequential else [e]
        meta = {"editor": args.editor, "mode": args.mode, "mask": args.mask if args.circuit else None,
                "circuit": args.circuit, "seed": args.seed, "requests": args.requests,
                "hparams": edits[0].info.get("hparams"), "norms": [x.norms() for x in edits]}
        (save / "knowedit_edit.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        print(f"saved the edited model and tokenizer to {save} (loads with AutoModelForCausalLM.from_pretrained)")


def _task_scores(handle, names) -> dict:
    from ...evaluation.collateral import build_task, task_scores
    return task_scores(handle, {t: build_task(t, handle.tokenizer, n=100, seed=1) for t in names})


def _print_preserve(edits, before: dict, after: dict) -> None:
    print("\npreserved tasks (100 prompts each, not those the projection was computed from):")
    for t in before:
        print(f"  {t:<16} before {before[t]:.4f}  after {after[t]:.4f}  change {after[t] - before[t]:+.2e}")
    for x in edits:
        reqs = [r for r in x.info.get("requests", []) if isinstance(r, dict) and "preserve_removed" in r]
        proj = x.info.get("preserve", {}).get("projection", [])
        for r in reqs:
            print(f"  {r.get('case')}: the projection removed {r['preserve_removed']:.1%} of the update's direction; "
                  f"{r['preserve_free_share']:.1%} of the key is outside the preserved span")
        for p in proj:
            print(f"  layer {p['layer']}: the projection removed {p['removed']:.1%} of the update")
