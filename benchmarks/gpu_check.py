"""GPU check (``make gpu-check``): the main paths on a CUDA GPU, timed, with peak GPU memory.

Two models, both in bf16 on the GPU:

* the default model (SmolLM2-135M-Instruct), with the same steps also timed on this machine's CPU
  in float32 so the table can state the GPU/CPU ratio;
* a randomly initialised model of Llama-2-7B's shape (32 layers, d_model 4096, MLP 11008, 32 heads;
  no weights needed, GPT-2 tokenizer), which shows the memory and time of a 7B-class edit.

Steps: node EAP on 32 IOI prompts, one ROME edit (cold: with its context prefixes and statistics; then
warm), a MEMIT batch of 100, and the edit metrics of 100 CounterFact records. On the random 7B model
the key statistics use ``--stats-samples`` samples (default 2,000 instead of 100,000): their time is
printed apart, and the edits' numbers are timing only (a random model knows no facts).

    python benchmarks/gpu_check.py                 # needs CUDA; prints a Markdown table
    python benchmarks/gpu_check.py --skip-7b --json results/gpu_check.json
    python benchmarks/gpu_check.py --allow-cpu --tiny   # rehearse the script without a GPU (tests do this)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "datasets" / "counterfact" / "counterfact-edit.json"


def records(n: int, tokenizer) -> tuple[list[dict], str]:
    """n CounterFact records, or (where the dataset is not beside the project) n synthetic ones of the
    same form: the timings do not depend on which facts they are."""
    if CF.exists():
        return json.loads(CF.read_text())[:n], str(CF.name)
    cities = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin", "Athens"]
    out = []
    for i in range(n):
        subj = f"The museum number {i}"
        out.append({"prompt": f"{subj} is located in", "subject": subj, "target_new": " " + cities[i % 10],
                    "ground_truth": " " + cities[(i + 3) % 10], "rephrase_prompt": f"Where is {subj}? It is in",
                    "locality_prompt": f"The river number {i} flows through",
                    "locality_ground_truth": " " + cities[(i + 5) % 10]})
    return out, "synthetic (CounterFact not found beside the project)"


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.rows: dict[str, dict] = {}

    def __call__(self, name: str, fn):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        row = {"s": time.perf_counter() - t}
        if cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.rows[name] = row
        print(f"  {name:<34}{row['s']:9.2f} s" + (f"   peak {row['peak_gib']:.2f} GiB" if cuda else ""), flush=True)
        return out


def run_steps(h, timer: Timer, n_records: int, memit_n: int, hp: dict, memit: bool = True) -> None:
    from knowedit.discovery.discover import discover
    from knowedit.editing import edit
    from knowedit.editing.api import warm_caches
    from knowedit.evaluation.edit_metrics import evaluate_requests
    from knowedit.editing import read_requests
    from knowedit.tasks import ioi_task

    task = ioi_task(h.tokenizer, n=32, seed=0)
    timer("EAP on IOI (nodes, 32 prompts)",
          lambda: discover(h, task, method="eap", prune=False, top_k=min(20, len(h.all_heads()))))
    recs, _ = records(max(n_records, memit_n), h.tokenizer)
    e = timer("ROME, one edit (cold)", lambda: edit(h, recs[:1], "rome", hparams=hp.get("rome")))
    e.undo()
    e = timer("ROME, one edit (warm)", lambda: edit(h, recs[1:2], "rome", hparams=hp.get("rome")))
    e.undo()
    if memit:
        timer("MEMIT statistics (cached after)", lambda: warm_caches(h, "memit", hp.get("memit")))
        e = timer(f"MEMIT, batch of {memit_n}", lambda: edit(h, recs[:memit_n], "memit", hparams=hp.get("memit")))
        e.undo()
    reqs = read_requests(recs[:n_records])
    timer(f"evaluation of {n_records} records", lambda: evaluate_requests(h, reqs))


def random_llama(shape: str, dtype, device):
    """A random model of Llama-2-7B's shape (or a tiny one for --tiny) with the real GPT-2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from knowedit.models.gpt2_tokenizer import gpt2_tokenizer
    from knowedit.models.handle import ModelHandle

    tok = gpt2_tokenizer()
    if shape == "7b":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=len(tok), max_position_embeddings=4096)
    else:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return ModelHandle(model, tok, name="llama-2-7b" if shape == "7b" else "tiny-llama-random")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-7b", action="store_true", help="only the default model")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU comparison on the default model")
    ap.add_argument("--records", type=int, default=100, help="records evaluated (default 100)")
    ap.add_argument("--memit-n", type=int, default=100, help="MEMIT batch size (default 100)")
    ap.add_argument("--stats-samples", type=int, default=2000, help="key-statistics samples on the random 7B model")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a rehearsal of the script)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of the default and 7B ones")
    args = ap.parse_args(argv)

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    elif args.allow_cpu:
        dev = torch.device("cpu")
        print("no GPU: rehearsing on the CPU (--allow-cpu); these are not GPU figures")
    else:
        print("gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False), so nothing was "
              "measured. Run it on a machine with an NVIDIA GPU and a CUDA build of torch "
              "(pip install torch==2.13.0 from PyPI is one).")
        return 0

    from knowedit import load_model

    results = {"device": str(dev), "torch": torch.__version__}
    if args.tiny:
        h = random_llama("tiny", torch.bfloat16, dev)
        print(f"\n{h.name}, bf16, {dev}")
        hp = {"rome": {"layers": [1], "mom2_n_samples": 50}, "memit": {"layers": [1, 2], "mom2_n_samples": 50}}
        t = Timer(dev)
        run_steps(h, t, args.records, args.memit_n, hp)
        results["tiny"] = t.rows
    else:
        h = load_model(dtype="bf16", device=str(dev))
        print(f"\n{h.name}, bf16, {dev}")
        t = Timer(dev)
        run_steps(h, t, args.records, args.memit_n, {})
        results["default_bf16_" + dev.type] = t.rows
        if dev.type == "cuda" and not args.no_cpu:
            del h
            torch.cuda.empty_cache()
            hc = load_model()
            print(f"\n{hc.name}, fp32, cpu ({torch.get_num_threads()} threads): for the ratio; MEMIT skipped")
            tc = Timer(torch.device("cpu"))
            run_steps(hc, tc, args.records, args.memit_n, {}, memit=False)
            results["default_fp32_cpu"] = tc.rows
            print("\nGPU (bf16) against CPU (fp32), same steps:")
            for k, row in tc.rows.items():
                print(f"  {k:<34}{row['s'] / t.rows[k]['s']:8.1f}x faster")
            del hc
        if not args.skip_7b:
            h7 = random_llama("7b", torch.bfloat16, dev)
            n_params = sum(p.numel() for p in h7.model.parameters())
            print(f"\nLlama-2-7B shape, random weights (editors/*/llama-2-7b.yaml settings): {n_params / 1e9:.2f}B parameters, bf16, {dev}; statistics from "
                  f"{args.stats_samples} samples")
            hp = {"rome": {"mom2_n_samples": args.stats_samples},
                  "memit": {"mom2_n_samples": args.stats_samples}}
            t7 = Timer(dev)
            run_steps(h7, t7, args.records, args.memit_n, hp)
            results["llama7b_random_bf16"] = {**t7.rows, "params": n_params}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
