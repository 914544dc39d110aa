"""A learned IOI weight mask on the default model must take at most 20 minutes (2-core CPU).

Runs the whole ``discover --method mask`` path (training, top-k mask, held-out faithfulness on 50
IOI prompts of another seed) and prints the time, its ratio to the budget, the density achieved
and the held-out faithfulness. Environment: DENSITY (0.1), STEPS (200), GRANULARITY (weight),
ABLATION (zero), N (48 training prompts), OUT (write the circuit JSON + sidecar there),
CKPT (checkpoint file, resumed from), LOG (progress log file)."""
import json
import os
import sys
import time

import torch

from knowedit import load_model
from knowedit.discovery.learned_mask import run_mask_cli
from knowedit.tasks import get_task

BUDGET_S = 20 * 60


def main():
    torch.manual_seed(0)
    h = load_model()
    task = get_task("ioi", h.tokenizer, n=int(os.environ.get("N", 48)), seed=0)
    log = open(os.environ["LOG"], "a") if os.environ.get("LOG") else sys.stdout

    def progress(step, row):
        if step % 5 == 0 or step == 1:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), file=log,
                  flush=True)

    args = {"granularity": os.environ.get("GRANULARITY", "weight"), "density": float(os.environ.get("DENSITY", 0.1)),
            "mask_ablation": os.environ.get("ABLATION", "zero"), "mask_steps": int(os.environ.get("STEPS", 200)),
            "out": os.environ.get("OUT"), "checkpoint": os.environ.get("CKPT"), "progress": progress}
    t = time.perf_counter()
    c = run_mask_cli(h, task, args)
    dt = time.perf_counter() - t
    if os.environ.get("OUT"):
        c.save(os.environ["OUT"])
    x = c.extra
    print(f"learned {args['granularity']} mask, ablation {args['mask_ablation']}, {args['mask_steps']} steps: "
          f"{dt:.0f} s = {dt / BUDGET_S:.3f} of the 20-min budget")
    print(f"density {x['mask_density']:.4f} of maskable ({x['mask']['param_density']:.4f} of all params); "
          f"norm share {x['mask']['share_of_mask']['norm']:.3f}")
    print(f"faithfulness train {x['train']['faithfulness']:.3f}, held-out {x['heldout']['faithfulness']:.3f} "
          f"(n={x['heldout']['n']})")


if __name__ == "__main__":
    main()
