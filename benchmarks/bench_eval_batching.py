"""Batched CounterFact scoring vs a naive per-request loop (target: >= 3x).

Scores the unedited default model's CounterFact metric prompts (rewrite, paraphrase and
neighbourhood prompts with the new and true targets: the scoring cost of evaluating N edits) for N
records, three ways:
  batched      knowedit.evaluation.evaluate_requests on all records at once (pairs of all records
               share padded batches; only target positions are unembedded)
  per-request  the same scorer called once per record (one batch per record)
  naive        one forward per (prompt, target) pair, full logits, record after record
Usage: python benchmarks/bench_eval_batching.py [--data counterfact.json] [--n 100] [--repeats 3]"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.evaluation import evaluate_requests  # noqa: E402
from knowedit.evaluation.datasets import load_counterfact  # noqa: E402
from knowedit.evaluation.edit_metrics import _pairs  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"


@torch.no_grad()
def naive(h, reqs):
    tok = h.tokenizer
    out = []
    for r in reqs:
        for _, p, t in _pairs(r):
            pi = tok(p, add_special_tokens=False)["input_ids"]
            ti = tok(t, add_special_tokens=False)["input_ids"]
            logp = h.model(input_ids=torch.tensor([pi + ti])).logits[0].float().log_softmax(-1)
            out.append(-float(sum(logp[len(pi) - 1 + j, x] for j, x in enumerate(ti))) / len(ti))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="one timing of each, no interleaving")
    a = ap.parse_args()
    torch.manual_seed(0)
    h = load_model()
    reqs = load_counterfact(a.data, n=a.n)
    n_pairs = sum(len(_pairs(r)) for r in reqs)
    # same numbers either way (checked once, outside the timing)
    b = evaluate_requests(h, reqs[:5], batch_size=a.batch_size)
    p1 = [evaluate_requests(h, [r])[0] for r in reqs[:5]]
    assert all(abs(x.metrics["cf_em"] - y.metrics["cf_em"]) < 1e-4 for x, y in zip(b, p1))
    fns = {"batched": lambda: evaluate_requests(h, reqs, batch_size=a.batch_size),
           "per-request": lambda: [evaluate_requests(h, [r]) for r in reqs],
           "naive": lambda: naive(h, reqs)}
    if a.quick:  # one side after the other, with times printed as they come (slow, loaded machines)
        med = {}
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            med[k] = time.perf_counter() - t
            print(f"  {k}: {med[k]:.2f} s", flush=True)
    else:
        med = interleaved_medians(fns, repeats=a.repeats, warmup=0)
    print(f"CounterFact scoring, {len(reqs)} records, {n_pairs} (prompt, target) pairs, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    for k, v in med.items():
        print(f"  {k:12s} {v:8.2f} s")
    print(f"  naive / batched        {med['naive'] / med['batched']:6.2f}x   (target >= 3)")
    print(f"  per-request / batched  {med['per-request'] / med['batched']:6.2f}x")


if __name__ == "__main__":
    main()
