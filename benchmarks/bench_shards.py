"""A sweep split between 2 processes vs 1 process (target: >= 1.6x the cases per second on 2 cores).

Runs the same small suite (N CounterFact cases, one editor, no mask, CounterFact metrics) on the default
model through the real command line (`python -m knowedit eval`), end to end: process start, model load,
the unedited measurements, the edits and their metrics. Three ways, each into a fresh directory:
  1 process, default threads   what a user gets from `knowedit eval SUITE`
  1 process, 1 thread          the same with OMP_NUM_THREADS=1
  2 processes, 1 thread each   `--shard 0/2` and `--shard 1/2` at once (what torchrun would start)
Per-process costs (start, model load, ROME's context prefixes) are paid twice by the split run, so the
ratio grows with N; a second figure leaves them out: the records' own seconds (edit + measurements),
summed per process, the slowest process counting. One untimed case first fills the caches (converted model, covariance statistics).
Every case must come back exactly once from the split run (checked).
Usage: python benchmarks/bench_shards.py [--n 12] [--editor rome] [--data counterfact.json]
       python benchmarks/bench_shards.py --n 2      # a quick end-to-end check, numbers not meaningful"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT.parent / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"


def env(threads: int | None) -> dict:
    from knowedit.evaluation.shards import LAUNCH_VARS   # a launcher's rank must not reach the children
    drop = {v for pair in LAUNCH_VARS for v in pair} | {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["HF_HUB_OFFLINE"] = "1"
    if threads:
        e["OMP_NUM_THREADS"] = e["MKL_NUM_THREADS"] = str(threads)
    return e


def run(suite: Path, out: Path, shards: int, threads: int | None, limit: int | None = None) -> float:
    """Wall seconds from starting the processes to the last one's exit."""
    cmd = [sys.executable, "-m", "knowedit", "eval", str(suite), "--out", str(out), "--no-report"]
    if limit:
        cmd += ["--limit", str(limit)]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    procs = []
    for i in range(shards):
        log = open(out.parent / f"{out.name}-{i}.log", "w")
        procs.append((subprocess.Popen(cmd + (["--shard", f"{i}/{shards}"] if shards > 1 else []), env=env(threads),
                                       stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    for p, log in procs:
        p.wait()
        log.close()
    dt = time.perf_counter() - t0
    for i, (p, log) in enumerate(procs):
        if p.returncode:
            sys.exit(f"{out.name} (process {i}) failed:\n" + Path(log.name).read_text()[-3000:])
    return dt


def keys(out: Path) -> list:
    from knowedit.evaluation.results import load_records
    return sorted(r["key"] for r in load_records(out))


def loop_seconds(out: Path) -> float:
    """The edit loop alone: each process's records' seconds summed, the slowest process."""
    from knowedit.evaluation.results import ResultStore, result_files
    return max(sum(r.get("seconds", 0.0) for r in ResultStore(out, sh).load(repair=False))
               for sh, _ in result_files(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="cases (CounterFact rows, in file order)")
    ap.add_argument("--editor", default="rome", help="rome (default), memit, ft-l or ft-m")
    ap.add_argument("--data", default=str(DEFAULT))
    a = ap.parse_args()
    if not Path(a.data).exists():
        sys.exit(f"{a.data} does not exist; pass --data PATH (a CounterFact JSON file)")
    with tempfile.TemporaryDirectory(prefix="bench_shards-") as tmp:
        tmp = Path(tmp)
        suite = tmp / "suite.json"   # JSON is YAML
        suite.write_text(json.dumps({
            "name": "bench_shards", "editors": [a.editor], "conditions": ["none"], "metrics": ["counterfact"],
            "dataset": {"name": "counterfact", "path": a.data, "n": a.n, "known_only": False}}))
        print("warm-up: 1 case, untimed (fills the model and statistics caches)", flush=True)
        run(suite, tmp / "warm", 1, None, limit=1)
        times, loops = {}, {}
        print(f"{'':32s}{'end to end':^23s}{'edit loop':^23s}")
        for label, shards, threads in (("1 process, default threads", 1, None), ("1 process, 1 thread", 1, 1),
                                       ("2 processes, 1 thread each", 2, 1)):
            out = tmp / label.replace(" ", "_").replace(",", "")
            times[label] = run(suite, out, shards, threads)
            loops[label] = loop_seconds(out)
            print(f"  {label:30s}{times[label]:8.1f} s {a.n / times[label]:6.3f} cases/s"
                  f"{loops[label]:8.1f} s {a.n / loops[label]:6.3f} cases/s", flush=True)
        one, split = tmp / "1_process_default_threads", tmp / "2_processes_1_thread_each"
        assert keys(one) == keys(split) and len(keys(split)) == a.n, "the split run lost or repeated cases"
    import torch
    print(f"sweep of {a.n} {a.editor} cases on the default model, {os.cpu_count()} CPUs (default threads: "
          f"{torch.get_num_threads()}); ratios of cases per second, end to end (edit loop):")
    for name, x, y, note in (("2 processes / 1 process (default threads)", "2 processes, 1 thread each",
                              "1 process, default threads", "   (target >= 1.6)"),
                             ("2 processes / 1 process (1 thread)", "2 processes, 1 thread each", "1 process, 1 thread", ""),
                             ("1 process: default threads / 1 thread", "1 process, default threads", "1 process, 1 thread", "")):
        print(f"  {name:42s}{times[y] / times[x]:6.2f}x  ({loops[y] / loops[x]:.2f}x){note}")


if __name__ == "__main__":
    main()
