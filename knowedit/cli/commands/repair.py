"""``knowedit repair``: steer the heads a target task shares with a source task (circuit reuse)."""
from __future__ import annotations

import time
from pathlib import Path

from ...errors import KnoweditError
from .edit import _check_save_dir
from ..model_options import add_model_args, load_from_args


def add_parser(sub):
    p = sub.add_parser("repair", help="repair a task by steering heads it shares with another (Merullo et al. 2024)")
    p.add_argument("--source", default="ioi", help="task whose circuit lends the heads (default ioi)")
    p.add_argument("--target", default="colored-objects", help="task to repair (default colored-objects)")
    add_model_args(p)
    p.add_argument("--heads", default=None, help="comma-separated heads to steer, e.g. a12.h3,a13.h4 (default: chosen)")
    p.add_argument("--source-circuit", default=None, help="the source task's circuit JSON (default: its top heads "
                   "by attention + |DLA|)")
    p.add_argument("--target-circuit", default=None, help="the target task's circuit JSON (same default)")
    p.add_argument("--top-share", type=float, default=None,
                   help="take each circuit's top share of heads by |score| (e.g. 0.1) instead of its selected heads")
    p.add_argument("--preset", default=None, choices=["gpt2-medium"], help="the published head set for that model")
    p.add_argument("--data-dir", default=None, help="datasets root or file for the target task (default: generated)")
    p.add_argument("--method", default="greedy", choices=["greedy", "topk"], help="how the set is chosen")
    p.add_argument("--k", type=int, default=4, help="at most this many heads in the chosen set")
    p.add_argument("--persistent", action="store_true", help="distil the steering into the heads' q/k weights")
    p.add_argument("--save", default=None, help="with --persistent: write the repaired model here (save_pretrained)")
    p.add_argument("--train-n", type=int, default=200,
                   help="with --persistent: varied-wording training prompts over training-only colours/objects")
    p.add_argument("--eval-n", type=int, default=50, help="with --persistent: held-out prompts per source")
    p.add_argument("--held-out-data", default=None,
                   help="with --persistent: datasets root holding colored_objects/cobjs_data_42.json and the "
                        "BIG-bench file, scored as held-out sources (default: generated held-out prompts only)")
    p.add_argument("--persistent-only", action="store_true",
                   help="with --persistent and --heads: skip the ranking and controls (the held-out table only)")
    p.add_argument("--distil", default=None, metavar="KEY=VALUE,...",
                   help="with --persistent: distillation settings, e.g. steps=4,lr=1e-3,output_weight=1,"
                        "keep_weight=1,attention_weight=0,ce_weight=0,batch_size=8")
    p.add_argument("--n", type=int, default=40, help="prompts per task")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args):
    from tqdm.auto import tqdm

    from ...circuit import Circuit
    from ...reuse import PRESETS, repair

    if args.save and not args.persistent:
        raise KnoweditError("--save writes the persistent repair; add --persistent")
    save = _check_save_dir(args.save)
    if args.n < 2:
        raise KnoweditError("--n: need at least 2 prompts")
    if args.train_n < 1 or args.eval_n < 1:
        raise KnoweditError(f"--train-n {args.train_n} / --eval-n {args.eval_n}: need at least 1 prompt each")
    distil = _distil_options(args.distil)
    if args.persistent_only and not (args.persistent and (args.heads or args.preset)):
        raise KnoweditError("--persistent-only needs --persistent and the heads (--heads or --preset)")
    if args.held_out_data and not Path(args.held_out_data).is_dir():
        raise KnoweditError(f"--held-out-data: {args.held_out_data} is not a directory; pass the datasets root "
                            f"(e.g. ../shared/datasets)")
    heads = args.heads
    if args.preset:
        if heads:
            raise KnoweditError("--preset and --heads both choose the heads; pass one of them")
        heads = list(PRESETS[args.preset].heads)
    for role in ("source", "target"):
        path = getattr(args, f"{role}_circuit")
        if path and not Path(path).is_file():  # before the model loads
            raise KnoweditError(f"--{role}-circuit: {path} does not exist; write it with "
                                f"`knowedit discover --task {getattr(args, role)} --out {path}`")
    t0 = time.time()
    handle = load_from_args(args)
    circuits = {}
    for role in ("source", "target"):
        path = getattr(args, f"{role}_circuit")
        if path:
            c = Circuit.load(path, handle)
            circuits[f"{role}_heads"] = c.top_heads(args.top_share) if args.top_share else c
    res = repair(handle, args.source, args.target, heads=heads, n=args.n, seed=args.seed, data_dir=args.data_dir,
                 method=args.method, k=args.k, persistent=args.persistent, apply=bool(save), progress=tqdm,
                 train_n=args.train_n, eval_n=args.eval_n, held_out_data=args.held_out_data,
                 persistent_kwargs=distil, persistent_only=args.persistent_only, **circuits)
    print(res)
    if save is not None:
        handle.save_pretrained(save)
        print(f"saved the repaired model to {save}")
    print(f"\ndone in {time.time() - t0:.0f} s")


def _distil_options(text):
    """``--distil steps=4,lr=1e-3`` as keyword arguments for ``distil_steering``; unknown keys are refused
    before the model loads."""
    from ...reuse.persistent import DEFAULTS

    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in DEFAULTS:
            raise KnoweditError(f"--distil: {part!r} is not KEY=VALUE with KEY one of {', '.join(DEFAULTS)}")
        try:
            out[key] = int(value) if key in ("steps", "batch_size") else float(value)
        except ValueError:
            raise KnoweditError(f"--distil: {key}={value!r} is not a number") from None
    return out
