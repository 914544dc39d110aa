"""FT-L / FT-M on known CounterFact records of the default model, with no mask and with a hand-made
circuit in its circuit / complement / random conditions. Prints efficacy, paraphrase and
neighbourhood scores (CounterFact probability comparison on the whole target sequence) and the
median seconds per edit.

    python benchmarks/bench_ft_counterfact.py --n 30 --n-masked 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CIRCUIT = ["a23.h3", "a20.h0", "a17.h4", "a18.h0", "a16.h0", "m2", "m3", "m4", "m5", "m6"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"


def known_records(handle, records, n):
    from knowedit.editing.probes import sequence_probs
    from knowedit.editing.request import from_record

    out = []
    for i in range(0, len(records), 32):
        chunk = [from_record(r, i + j) for j, r in enumerate(records[i:i + 32])]
        pt = sequence_probs(handle, [r.text for r in chunk], [r.target_true for r in chunk])
        pn = sequence_probs(handle, [r.text for r in chunk], [r.target_new for r in chunk])
        out += [r for r, a, b in zip(chunk, pt, pn) if a > b]
        if len(out) >= n:
            return out[:n]
    return out


def scores(handle, r):
    from knowedit.editing.probes import sequence_probs

    prompts = [r.text] + r.paraphrase_prompts[:1] + r.neighborhood_prompts[:1]
    pn = sequence_probs(handle, prompts, [r.target_new] * len(prompts))
    pt = sequence_probs(handle, prompts, [r.target_true] * (1 + len(r.paraphrase_prompts[:1])) +
                        [r.locality_answer] * len(r.neighborhood_prompts[:1]))
    s = {"efficacy": pn[0] > pt[0], "p_new": pn[0]}
    if r.paraphrase_prompts:
        s["paraphrase"] = pn[1] > pt[1]
    if r.neighborhood_prompts:
        s["neighborhood"] = pt[-1] > pn[-1]
    return s


def main():
    import torch
    from tqdm.auto import tqdm

    from knowedit import load_model
    from knowedit.circuit import ParameterMask
    from knowedit.editing import edit, tensor_hash
    from knowedit.editing.masking import describe_conditions, format_conditions

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30, help="known records with no mask")
    ap.add_argument("--n-masked", type=int, default=10, help="known records per masked condition")
    ap.add_argument("--methods", default="ft-m,ft-l")
    ap.add_argument("--conditions", default="none,circuit,complement,random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write per-edit rows as JSON lines")
    args = ap.parse_args()

    handle = load_model()
    records = json.loads(DATA.read_text())[:400]
    known = known_records(handle, records, max(args.n, args.n_masked))
    print(f"{len(known)} known records (P(ground_truth) > P(target_new) before the edit)")
    mask = ParameterMask.from_components(handle, CIRCUIT)
    conds = {"circuit": mask, "complement": mask.complement(), "random": mask.random_like(args.seed), "none": None}
    print(format_conditions(describe_conditions(conds)))
    h0 = tensor_hash(torch.cat([p.detach().flatten()[:1000] for p in handle.model.parameters()]))
    rows = []
    out = open(args.out, "w") if args.out else None
    for method in args.methods.split(","):
        for cond in args.conditions.split(","):
            n = args.n if cond == "none" else args.n_masked
            for r in tqdm(known[:n], desc=f"{method} {cond}"):
                t0 = time.perf_counter()
                e = edit(handle, [r], method=method, mask=conds[cond], seed=args.seed)
                dt = time.perf_counter() - t0
                row = {"method": method, "condition": cond, "case_id": r.case_id, "seconds": dt,
                       "steps": e.info["optimizer_steps"], **scores(handle, r)}
                e.undo()
                rows.append(row)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    assert tensor_hash(torch.cat([p.detach().flatten()[:1000] for p in handle.model.parameters()])) == h0
    print(f"\n{'method':<6} {'condition':<11} {'n':>3} {'efficacy':>9} {'paraphrase':>10} {'neighbourhood':>13} "
          f"{'median s/edit':>13} {'median steps':>12}")
    for method in args.methods.split(","):
        for cond in args.conditions.split(","):
            sel = [x for x in rows if x["method"] == method and x["condition"] == cond]
            if not sel:
                continue

            def frac(k):
                v = [x[k] for x in sel if k in x]
                return f"{sum(v) / len(v):.0%}" if v else "-"
            print(f"{method:<6} {cond:<11} {len(sel):>3} {frac('efficacy'):>9} {frac('paraphrase'):>10} "
                  f"{frac('neighborhood'):>13} {statistics.median(x['seconds'] for x in sel):>13.1f} "
                  f"{statistics.median(x['steps'] for x in sel):>12.0f}")
    print("\nScores compare whole-target probabilities (teacher-forced) on the prompt (efficacy: P(new) > P(true)),"
          " the first rephrase prompt, and the first locality prompt (P(locality answer) > P(new)).")


if __name__ == "__main__":
    main()
