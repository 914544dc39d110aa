"""MEMIT's δ optimisation one request at a time vs batched (target: >= 4x), on the default model.

N CounterFact records the model knows, the MEMIT hparams of editors/memit/smollm2-135m.yaml (top layer
6): the targets computed one by one (optimise_delta per record, as memit_targets did before batching)
and batched (memit_targets, v_batch_size requests per batch), each timed once (one-by-one 100 records
takes about 17 minutes on a 2-core CPU). Prints both times, the speed ratio and the largest relative
difference ‖δ_batched − δ_alone‖ / ‖δ_alone‖ over the records.

    python benchmarks/bench_batched_values.py            # N = 100
    python benchmarks/bench_batched_values.py --n 16 --batch-size 8
"""
import argparse
import time
from pathlib import Path

import torch

from knowedit import load_model
from knowedit.editing.hparams import load_hparams
from knowedit.editing.keys_values import build_rows, optimise_delta, prefixes
from knowedit.editing.memit import memit_targets
from knowedit.evaluation.datasets import known_records, load_dataset

CF = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="known CounterFact records")
    ap.add_argument("--batch-size", type=int, default=None, help="v_batch_size (default: the hparams' 16)")
    ap.add_argument("--data", default=str(CF))
    a = ap.parse_args()
    h = load_model()
    hp = load_hparams("memit", h)
    if a.batch_size:
        hp["v_batch_size"] = a.batch_size
    recs = known_records(h, load_dataset("counterfact", a.data, n=max(4 * a.n, 100)), n=a.n)
    top = max(hp["layers"])
    ctx = prefixes(h, hp)   # sampled once, outside the timing
    kl = hp["kl_prompts"]

    t = time.perf_counter()
    alone = [optimise_delta(h, r, build_rows(h, r, ctx, kl_prompts=kl), h.adapter.block(top), hp) for r in recs]
    t_alone = time.perf_counter() - t
    print(f"  one by one  {t_alone:8.1f} s", flush=True)
    t = time.perf_counter()
    batched, infos = memit_targets(h, recs, hp)
    t_batched = time.perf_counter() - t
    print(f"  batched     {t_batched:8.1f} s", flush=True)

    rel = [float((b - d).norm() / d.norm()) for b, (d, _) in zip(batched, alone)]
    same_steps = sum(i["steps"] == ai["steps"] for i, (_, ai) in zip(infos, alone))
    early = sum(i["steps"] < hp["v_num_grad_steps"] - 1 for i in infos)
    print(f"MEMIT targets, {len(recs)} known CounterFact records, top layer {top}, v_batch_size "
          f"{hp['v_batch_size']}, {torch.get_num_threads()} threads")
    print(f"  one by one  {t_alone:8.1f} s   ({t_alone / len(recs):.2f} s per record)")
    print(f"  batched     {t_batched:8.1f} s   ({t_batched / len(recs):.2f} s per record)")
    print(f"  ratio       {t_alone / t_batched:8.2f}x  (target >= 4)")
    print(f"  max relative difference of δ {max(rel):.2e} (median {sorted(rel)[len(rel) // 2]:.2e}); "
          f"same step count {same_steps}/{len(recs)}; stopped early {early}/{len(recs)}")


if __name__ == "__main__":
    main()
