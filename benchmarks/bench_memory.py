"""Peak memory of editing the default model, relative to the model's size: loading it, one ROME edit,
and one MEMIT batch of N CounterFact requests (budget: a ROME edit's peak ≤ 1.2 × the model's
parameter bytes plus its covariance statistics).

Each measurement runs in a fresh process, so one's leftovers cannot hide in another's numbers. A
process notes its resident set after importing torch, transformers and knowedit (the runtime, not
counted), loads the model and runs one short forward (the weights are memory-mapped from the cache and
read in by that forward), then measures the peak resident set while the step runs (Linux: the kernel's
high-water mark, reset just before the step through /proc/self/clear_refs; elsewhere a 2 ms RSS
sampler). The step's *extra* is that peak minus the process just before it, so the tokenizer and
torch's fixed buffers, which do not grow with the model, stay out of the budget figure
(parameter bytes + extra − statistics) ÷ parameter bytes. The statistics (C in float64 at each edited
layer) are stated separately; they must already be cached (any earlier edit on the default model
caches them). The peak net of the runtime alone is printed too.

    python benchmarks/bench_memory.py              # ROME, and MEMIT on 100 CounterFact requests
    python benchmarks/bench_memory.py --n 10       # a quicker MEMIT batch
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"
MB = 2 ** 20


class Peak:
    """Peak resident bytes of this process from :meth:`reset` to :meth:`read`."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # resets VmHWM, the kernel's own peak
            self.kernel = True
        except OSError:
            self.kernel = False

    @staticmethod
    def rss() -> int:
        import psutil
        return psutil.Process().memory_info().rss

    def reset(self):
        if self.kernel:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        self.top, self.stop = self.rss(), False

        def sample():
            while not self.stop:
                self.top = max(self.top, self.rss())
                time.sleep(0.002)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def read(self) -> int:
        if self.kernel:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        self.stop = True
        self.thread.join()
        return max(self.top, self.rss())


def child(what: str, n: int) -> dict:
    """One measurement in this (fresh) process."""
    peak = Peak()
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (the runtime: baseline)

    import knowedit  # noqa: F401
    from knowedit.editing import read_requests
    from knowedit.editing.hparams import editor_kwargs, load_hparams
    from knowedit.editing.memit import apply_memit
    from knowedit.editing.rome import apply_rome
    from knowedit.models import load_model

    torch.manual_seed(0)
    base = peak.rss()
    peak.reset()
    h = load_model()
    out = {"what": what, "runtime": base, "load_peak": peak.read(),
           "params": sum(p.numel() * p.element_size() for p in h.model.parameters()), "kernel_peak": peak.kernel}
    with torch.no_grad():   # weights memory-mapped from the cache are read in by the first forward
        h.forward(h.tokenize(["The capital of France is"]))
    out["ready"] = peak.rss()
    if what == "load":
        return out
    method = "rome" if what == "rome" else "memit"
    hp = editor_kwargs(load_hparams(method, h))
    recs = json.loads(CF.read_text())[:1 if method == "rome" else n]
    reqs = read_requests(recs)
    d = h.adapter.d_mlp
    layers = hp["layers"]
    out["stats"] = len(layers) * d * d * 8   # C in float64 per edited layer, as the editors hold it
    out["before_edit"] = peak.rss()   # the model ready to run: the edit's extra is counted from here
    peak.reset()
    t = time.perf_counter()
    e = (apply_rome if method == "rome" else apply_memit)(h, reqs, hp)
    out["seconds"] = time.perf_counter() - t
    out["edit_peak"] = peak.read()
    out["edit_holds"] = e.nbytes
    out["touched"] = sum(h.model.get_parameter(n).numel() * h.model.get_parameter(n).element_size() for n in e.changes)
    out["requests"] = len(reqs)
    e.undo()
    return out


def run_child(what: str, n: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, __file__, "--child", what, "--n", str(n)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        sys.exit(f"{what}: the measuring process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="MEMIT batch size (CounterFact requests)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: load, rome, memit")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n)))
        return
    if not CF.exists():
        sys.exit(f"{CF} is absent; the MEMIT batch reads CounterFact requests from it")
    skip = set(filter(None, args.skip.split(",")))
    rows = [run_child(w, args.n) for w in ("load", "rome", "memit") if w not in skip]
    P = rows[0]["params"]
    r0 = rows[0]
    print(f"default model: {P / MB:.0f} MB of parameters. Runtime (torch, transformers, knowedit imported): "
          f"{r0['runtime'] / MB:.0f} MB, not counted. Loaded and run once: {(r0['ready'] - r0['runtime']) / MB:.0f} MB "
          f"(the tokenizer and torch's first-forward buffers included). Peaks from "
          f"{'the kernel high-water mark' if r0['kernel_peak'] else 'a 2 ms RSS sampler'}.")
    print("extra = peak during the step − the process just before it (model loaded and run once); "
          "budget figure = (parameters + extra − statistics) ÷ parameters")
    print(f"{'step':<20} {'peak−runtime MB':>15} {'÷ params':>8} {'extra MB':>9} {'stats MB':>9} "
          f"{'budget figure':>13} {'edit holds MB':>13} {'touched MB':>10} {'s':>6}")
    for r in rows:
        if r["what"] == "load":
            net = r["load_peak"] - r["runtime"]
            print(f"{'load':<20} {net / MB:>15.0f} {net / P:>8.2f} {'-':>9} {'-':>9} {'-':>13} {'-':>13} {'-':>10} "
                  f"{'-':>6}")
            continue
        net, extra = r["edit_peak"] - r["runtime"], r["edit_peak"] - r["before_edit"]
        label = "ROME, 1 request" if r["what"] == "rome" else f"MEMIT, {r['requests']} requests"
        print(f"{label:<20} {net / MB:>15.0f} {net / P:>8.2f} {extra / MB:>9.0f} {r['stats'] / MB:>9.1f} "
              f"{(P + extra - r['stats']) / P:>13.3f} {r['edit_holds'] / MB:>13.2f} {r['touched'] / MB:>10.2f} "
              f"{r['seconds']:>6.1f}")
    for r in rows:
        if r["what"] == "rome":
            print(f"ROME: budget figure {(P + r['edit_peak'] - r['before_edit'] - r['stats']) / P:.3f}   (budget ≤ 1.2)")

if __name__ == "__main__":
    main()
