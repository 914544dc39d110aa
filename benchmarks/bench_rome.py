"""ROME and MEMIT on the default model: time of one ROME edit with cached statistics (budget 10 s on
a 2-core CPU), and CounterFact numbers on records the model knows.

    python benchmarks/bench_rome.py                       # timing only
    python benchmarks/bench_rome.py --counterfact 50      # + ROME efficacy/paraphrase/neighbourhood
    python benchmarks/bench_rome.py --memit 100 --memit-lambdas 15000,5000   # + MEMIT batch efficacy per λ
    python benchmarks/bench_rome.py --sweep 2,4,6 --counterfact 20   # layer sweep for editors/README.md

Protocol (CounterFact probability comparison, as in ROME): a record is *known* when the teacher-forced
mean log-probability of " " + ground_truth exceeds that of " " + target_new on its prompt. Efficacy:
share of edits where P(new) > P(true) on the prompt; paraphrase: same on rephrase_prompt;
neighbourhood: share where P(true) > P(new) on locality_prompt after the edit."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from knowedit import load_model
from knowedit.editing import read_requests
from knowedit.editing.memit import MEMIT_DEFAULTS, apply_memit, memit_targets
from knowedit.editing.rome import ROME_DEFAULTS, apply_rome

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"


@torch.no_grad()
def target_logprob(h, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """Mean log-probability of each " "+target's tokens after its prompt (teacher forced)."""
    tok = h.tokenizer
    seqs, spans = [], []
    for p, t in zip(prompts, targets):
        a = tok(p, add_special_tokens=False)["input_ids"]
        b = tok(" " + t, add_special_tokens=False)["input_ids"]
        seqs.append(a + b)
        spans.append((len(a), len(b)))
    T = max(map(len, seqs))
    x = torch.full((len(seqs), T), tok.pad_token_id)
    m = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
        m[i, :len(s)] = 1
    lp = h.model(input_ids=x, attention_mask=m, use_cache=False).logits.float().log_softmax(-1)
    out = []
    for i, (s, n) in enumerate(spans):
        ids = x[i, s:s + n]
        out.append(lp[i, s - 1:s - 1 + n].gather(1, ids[:, None]).mean())
    return torch.stack(out)


def known_records(h, n: int, start: int = 0) -> list[dict]:
    recs = json.loads(CF.read_text())[start:]
    out = []
    for i in range(0, len(recs), 32):
        chunk = recs[i:i + 32]
        gt = target_logprob(h, [r["prompt"] for r in chunk], [r["ground_truth"] for r in chunk])
        new = target_logprob(h, [r["prompt"] for r in chunk], [r["target_new"] for r in chunk])
        out += [r for r, a, b in zip(chunk, gt, new) if a > b]
        if len(out) >= n:
            return out[:n]
    return out


def scores(h, recs: list[dict]) -> dict:
    def prefer(prompts, first, second):
        return (target_logprob(h, prompts, first) > target_logprob(h, prompts, second)).float()
    new, true = [r["target_new"] for r in recs], [r["ground_truth"] for r in recs]
    loc_true = [r.get("locality_ground_truth") or r["ground_truth"] for r in recs]
    return {"efficacy": prefer([r["prompt"] for r in recs], new, true),
            "paraphrase": prefer([r["rephrase_prompt"] for r in recs], new, true),
            "neighbourhood": prefer([r["locality_prompt"] for r in recs], loc_true, new)}


def hparams(method: str, layers=None) -> dict:
    f = ROOT / "editors" / method / "smollm2-135m.yaml"
    hp = {**(ROME_DEFAULTS if method == "rome" else MEMIT_DEFAULTS), **(yaml.safe_load(f.read_text()) if f.exists() else {})}
    if layers is not None:
        hp["layers"] = layers
    return hp


def rome_eval(h, recs, hp) -> dict:
    from tqdm.auto import tqdm
    rows, times, refused = [], [], 0
    for r in tqdm(recs, desc=f"ROME layer {hp['layers']}"):
        req = read_requests([r])
        t = time.perf_counter()
        try:
            e = apply_rome(h, req, hp)
        except Exception as ex:  # a refused edit counts as a failure
            refused += 1
            print("  refused:", ex, file=sys.stderr)
            continue
        times.append(time.perf_counter() - t)
        s = scores(h, [r])
        e.undo()
        rows.append({k: float(v[0]) for k, v in s.items()})
    n = len(recs)
    out = {k: sum(x[k] for x in rows) / n for k in ("efficacy", "paraphrase", "neighbourhood")}
    out.update(n=n, refused=refused, median_s=sorted(times)[len(times) // 2] if times else float("nan"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counterfact", type=int, default=0)
    ap.add_argument("--memit", type=int, default=0)
    ap.add_argument("--sweep", default="")
    ap.add_argument("--memit-lambdas", default="15000", help="mom2_update_weight values to try on one set of targets")
    ap.add_argument("--memit-targets", default="", help="a file that keeps the MEMIT targets z between runs")
    ap.add_argument("--repeats", type=int, default=int(os.environ.get("REPEATS", 3)))
    args = ap.parse_args()
    torch.manual_seed(0)
    h = load_model()
    hp = hparams("rome")
    req = read_requests([{"prompt": "The capital of {} is", "subject": "France", "target_new": "London",
                          "ground_truth": "Paris"}])
    apply_rome(h, req, hp).undo()  # statistics and prefixes cached; the timed edits below use them
    ts = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        e = apply_rome(h, req, hp)
        ts.append(time.perf_counter() - t)
        e.undo()
    med = sorted(ts)[len(ts) // 2]
    print(f"one ROME edit (layer {hp['layers']}, cached statistics), median of {args.repeats}: {med:.2f} s; "
          f"ratio to the 10 s budget {med / 10:.2f}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not CF.exists() or not (args.counterfact or args.memit):
        return
    recs = known_records(h, max(args.counterfact, args.memit))
    print(f"{len(recs)} known CounterFact records (P(true) > P(new) before the edit)")
    layers = [int(x) for x in args.sweep.split(",")] if args.sweep else [None]
    if args.counterfact:
        print("| layer | n | efficacy | paraphrase | neighbourhood | refused | median s |")
        print("|---|---|---|---|---|---|---|")
        for L in layers:
            hpl = hparams("rome", None if L is None else [L])
            r = rome_eval(h, recs[:args.counterfact], hpl)
            print(f"| {hpl['layers'][0]} | {r['n']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | "
                  f"{r['neighbourhood']:.2f} | {r['refused']} | {r['median_s']:.1f} |", flush=True)
    if args.memit:
        batch = recs[:args.memit]
        hpm = hparams("memit")
        reqs = read_requests(batch)
        t = time.perf_counter()
        keep = Path(args.memit_targets) if args.memit_targets else None
        if keep is not None and keep.exists():
            targets = torch.load(keep, weights_only=False)
        else:
            targets = memit_targets(h, reqs, hpm)  # computed once; λ only enters the solve
            if keep is not None:
                torch.save(targets, keep)
        dt = time.perf_counter() - t
        print(f"MEMIT batch of {len(batch)} at layers {hpm['layers']}: targets z in {dt:.0f} s")
        print("| mom2_update_weight λ | efficacy | paraphrase | neighbourhood | solve s |")
        print("|---|---|---|---|---|")
        for lam in [float(x) for x in args.memit_lambdas.split(",")]:
            t = time.perf_counter()
            e = apply_memit(h, reqs, {**hpm, "mom2_update_weight": lam}, targets=targets)
            dt = time.perf_counter() - t
            s = scores(h, batch)
            e.undo()
            print(f"| {lam:g} | {float(s['efficacy'].mean()):.2f} | {float(s['paraphrase'].mean()):.2f} | "
                  f"{float(s['neighbourhood'].mean()):.2f} | {dt:.0f} |", flush=True)

if __name__ == "__main__":
    main()
