"""Covariance statistics of the default model from its own samples (the offline default, about
125,000 tokens): time to sample the corpus and to collect E[k kᵀ] at the edit layers, against the
budget of 5 minutes for 100,000 tokens at one layer on a 2-core CPU. The first run also fills the
cache that ROME and MEMIT use (a later run reports the cached files and times nothing).

    python benchmarks/bench_covariance.py                 # ROME's and MEMIT's layers (2-6)
    python benchmarks/bench_covariance.py --layers 4"""
import argparse
import os
import time

import torch

from knowedit import load_model
from knowedit.editing.covariance import (SETTINGS_DEFAULTS, _path, corpus_ids, key_stats, settings, shipped_corpus,
                                         write_ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,3,4,5,6")
    ap.add_argument("--n-samples", type=int, default=SETTINGS_DEFAULTS["mom2_n_samples"])
    ap.add_argument("--ship", action="store_true", help="also write the sampled corpus to data/covariance/")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    h = load_model()
    hp = {"mom2_n_samples": args.n_samples}
    s = settings(hp)
    if args.ship:
        path = shipped_corpus(h, s)
        write_ids(path, corpus_ids(h, s))
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    if all(_path(h, s, l).exists() for l in layers):
        print(f"statistics for layers {layers} are cached ({_path(h, s, layers[0]).parent}); nothing timed")
        return
    t = time.perf_counter()
    ids = corpus_ids(h, s)
    t_sample = time.perf_counter() - t
    n = sum(map(len, ids))
    t = time.perf_counter()
    stats = key_stats(h, layers, hp)
    t_collect = time.perf_counter() - t
    total = t_sample + t_collect
    per100k = total * 100_000 / n
    print(f"corpus: {len(ids)} texts, {n} tokens; sampling {t_sample:.0f} s ({n / t_sample:.0f} tokens/s), "
          f"collecting layers {layers} {t_collect:.0f} s")
    print(f"total {total:.0f} s = {per100k:.0f} s per 100k tokens; ratio to the 300 s budget {per100k / 300:.2f}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for l, st in stats.items():
        ev = torch.linalg.eigvalsh(st.mom2)
        print(f"  layer {l}: {st.n_tokens} tokens, eigenvalues of C from {float(ev[0]):.3g} to {float(ev[-1]):.3g} "
              f"(condition number {float(ev[-1] / ev[0]):.3g})")


if __name__ == "__main__":
    main()
