"""``knowedit discover``: find a task's circuit and write it as a versioned JSON file."""
from __future__ import annotations

import argparse

TASKS = ("ioi", "colored-objects", "seq-numerals", "seq-numwords", "seq-months", "facts")


def add_parser(sub):
    p = sub.add_parser("discover", help="find the circuit a model uses for a task and save it as JSON")
    p.add_argument("--task", default=None, help=f"one of {', '.join(TASKS)} (or give --task-file)")
    p.add_argument("--task-file", default=None, help="JSONL with clean/corrupt/answer/distractor per line")
    p.add_argument("--model", default=None, help="Hugging Face id or local directory (default: SmolLM2-135M)")
    p.add_argument("--method", default="eap", choices=("patching", "eap", "eap-ig"))
    p.add_argument("--level", default=None, choices=("node", "edge"), help="default: node (edge under --protocol mib)")
    p.add_argument("--candidates", default="heads", choices=("heads", "nodes"),
                   help="heads: MLPs always kept (Wang et al.); nodes: heads and MLPs can be left out")
    p.add_argument("--ablation", default=None, choices=("mean", "patch"),
                   help="what replaces nodes outside the circuit: means over the corrupted prompts of the same "
                        "template (default), or each prompt's corrupted counterpart (default for eap-ig)")
    p.add_argument("--target", type=float, default=0.8, help="faithfulness the circuit must keep")
    p.add_argument("--top-k", type=int, default=None, help="take exactly the k best instead of searching")
    p.add_argument("--no-prune", action="store_true", help="skip greedy pruning")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps")
    p.add_argument("--n", type=int, default=50, help="number of task prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mib", action="store_true", help="also measure the MIB faithfulness curves (CPR, CMD) on "
                   "the same prompts; see --protocol mib for numbers comparable with MIB's")
    p.add_argument("--protocol", default="knowedit", choices=("knowedit", "mib"),
                   help="mib: MIB's circuit track (edges including the embedding's, counterfactual patching, "
                        "pruning after top-n); --n prompts score the edges and --n other prompts give the curves")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every prompt with the model's beginning-of-sequence token (default: the model's "
                        "convention: <|endoftext|> on GPT-2, the tokenizer's own choice on Llama-family models; "
                        "none on SmolLM2)")
    p.add_argument("--show", type=int, default=15, help="rows in the summary table")
    p.add_argument("--out", required=True, help="where to write the circuit JSON")
    return p


def load_task(name, tokenizer, n, seed, task_file=None):
    """The task by name through ``knowedit.tasks.get_task`` (IOI also without it)."""
    from ...errors import KnoweditError
    from ... import tasks

    get_task = getattr(tasks, "get_task", None)
    if get_task is not None:
        return get_task(name, tokenizer, n=n, seed=seed, task_file=task_file)
    if task_file is None and name == "ioi":
        return tasks.ioi_task(tokenizer, n=n, seed=seed)
    raise KnoweditError(f"--task {name!r}: this knowedit has no generator for it; use --task ioi")


def summary(circuit, show: int = 15) -> str:
    m, x = circuit.method, circuit.extra
    lines = [f"task {circuit.task['name']} (n={circuit.task['n']}, seed={circuit.task.get('seed')}), "
             f"method {m['name']} ({m['level']}, ablation={m['ablation']}, candidates={m.get('candidates')})",
             f"m(full)={x['m_full']:.3f}  m(empty)={x['m_empty']:.3f}  faithfulness={circuit.faithfulness:.3f}",
             f"size: {x.get('n_heads', 0)} heads ({x.get('head_share', 0) * 100:.1f}% of heads), "
             f"{x.get('n_mlps', 0)} MLPs, {len(circuit.edges)} edges; threshold |score| >= {circuit.threshold:.4g}",
             ]
    if "faithfulness_heldout" in x:
        lines.append(f"held-out prompts: m(full)={x['m_full_heldout']:.3f}  m(empty)={x['m_empty_heldout']:.3f}  "
                     f"faithfulness={x['faithfulness_heldout']:.3f}")
    if "mib" in x:
        lines.append(f"MIB areas over sizes {x['mib']['sizes'][0] * 100:g}%..100%: CPR={x['mib']['cpr']:.3f} "
                     f"(higher is better), CMD={x['mib']['cmd']:.3f} (lower is better)")
        if "protocol" in x["mib"]:
            lines.append(f"  protocol: {x['mib']['protocol']}")
    lines += ["", f"{'component':<22}{'score':>10}"]
    items = circuit.edges if circuit.edges else {k: v for k, v in circuit.nodes.items() if v != 0.0}
    for name, s in sorted(items.items(), key=lambda kv: -abs(kv[1]))[:show]:
        lines.append(f"{name:<22}{s:>+10.4f}")
    return "\n".join(lines)


def run(args):
    from tqdm.auto import tqdm

    from ...discovery import discover
    from ...errors import KnoweditError
    from ...models import load_model

    if args.task is None and args.task_file is None:
        raise KnoweditError("--task: give a task name or --task-file F.jsonl")
    handle = load_model(args.model)
    # Under the MIB protocol the first --n prompts score the edges and the next --n give the curves.
    n = 2 * args.n if args.protocol == "mib" else args.n
    task = load_task(args.task or "custom", handle.tokenizer, n, args.seed, args.task_file)
    circuit = discover(handle, task, method=args.method, level=args.level, ablation=args.ablation,
                       target=args.target, prune=not args.no_prune, top_k=args.top_k, steps=args.steps,
                       batch_size=args.batch_size, candidates=args.candidates, mib=args.mib,
                       protocol=args.protocol, bos=args.bos, progress=tqdm)
    circuit.save(args.out)
    print(summary(circuit, args.show))
    print(f"\nwrote {args.out}")
