"""``knowedit demo``: the main job on the default model."""
from __future__ import annotations

import time


def add_parser(sub):
    p = sub.add_parser("demo", help="run the main job on the default model (offline)")
    p.add_argument("--model", default=None, help="Hugging Face id or local directory (default: SmolLM2-135M)")
    p.add_argument("--n", type=int, default=24, help="IOI prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="rows in the head table")
    return p


def run(args):
    from tqdm.auto import tqdm

    from ..._demo import ioi_section
    from ...models import load_model

    t0 = time.time()
    handle = load_model(args.model)
    print(f"model: {handle.name}  ({handle.adapter.family}, {handle.adapter.n_layers} layers, "
          f"{handle.adapter.n_heads} heads / {handle.adapter.n_kv_heads} KV heads, fingerprint {handle.fingerprint})")
    print(ioi_section(handle, n=args.n, seed=args.seed, top=args.top, progress=tqdm))
    print(f"\ndone in {time.time() - t0:.0f} s")
