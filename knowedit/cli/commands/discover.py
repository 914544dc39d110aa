"""``knowedit discover``: find a task's circuit and write it as a versioned JSON file."""
from __future__ import annotations

import argparse
from ..model_options import add_model_args, load_from_args

TASKS = ("ioi", "colored-objects", "seq-numerals", "seq-numwords", "seq-months", "facts")


def add_parser(sub):
    p = sub.add_parser("discover", help="find the circuit a model uses for a task and save it as JSON")
    p.add_argument("--task", default=None, help=f"one of {', '.join(TASKS)} (or give --task-file)")
    p.add_argument("--task-file", default=None, help="JSONL with clean/corrupt/answer/distractor per line")
    add_model_args(p)
    p.add_argument("--method", default="eap", choices=("patching", "eap", "eap-ig", "mask"),
                   help="patching (exact), eap, eap-ig (attribution), or mask: learn a mask over weights, "
                        "neurons or heads at a target --density (Ge et al.)")
    p.add_argument("--granularity", default="weight", choices=("weight", "neuron", "head"),
                   help="--method mask: what one mask entry covers (every weight; an MLP neuron; a head)")
    p.add_argument("--density", type=float, default=None,
                   help="--method mask: the share of candidates the circuit keeps, strictly between 0 and 1")
    p.add_argument("--mask-ablation", default="zero", choices=("zero", "mean"),
                   help="--method mask: what masked-out weights become (zero, as Ge et al.; or their mean input)")
    p.add_argument("--mask-steps", type=int, default=200, help="--method mask: optimisation steps")
    p.add_argument("--mask-batch-size", type=int, default=8, help="--method mask: prompts per step")
    p.add_argument("--checkpoint", default=None, help="--method mask: checkpoint file; a rerun resumes from it")
    p.add_argument("--level", default=None, choices=("node", "edge", "neuron"),
                   help="node: heads and MLPs; edge: connections between them; neuron: single MLP neurons "
                        "(m7.n123), heads always kept (default: node, edge under --protocol mib)")
    p.add_argument("--selection", default="global", choices=("global", "per-layer", "iterative"),
                   help="neuron level: the best neurons over all layers (global), the --per-layer-k best of each, "
                        "or iterative pruning (re-score in the pruned model, drop the weakest 30%%, repeat down to --target)")
    p.add_argument("--per-layer-k", type=int, default=None, help="neuron level: neurons kept in every layer")
    p.add_argument("--verify", type=int, default=20,
                   help="neuron level: re-measure this many top-scored neurons by exact patching (0: skip)")
    p.add_argument("--heldout", type=int, default=0,
                   help="also measure faithfulness on this many other prompts of the task, not used for scoring")
    p.add_argument("--relations", default=None,
                   help="facts: keep only these relations, e.g. P17,P103 (ROME's known-facts ids, with --data) or "
                        "capital,language (the built-in facts)")
    p.add_argument("--data", default=None, help="read the task from the published dataset at this path (a file, its "
                   "folder or the datasets root) instead of the built-in generator")
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


def load_task(name, tokenizer, n, seed, task_file=None, data_dir=None, **options):
    """The task by name through ``knowedit.tasks.get_task`` (IOI also without it)."""
    from ...errors import KnoweditError
    from ... import tasks

    get_task = getattr(tasks, "get_task", None)
    if get_task is not None:
        return get_task(name, tokenizer, n=n, seed=seed, task_file=task_file, data_dir=data_dir, **options)
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
    if m.get("level") == "neuron":
        lines[2] = (f"size: {x['n_neurons']} MLP neurons ({x['neuron_share'] * 100:.2f}% of {x['n_candidate_neurons']}), "
                    f"every head kept; threshold |score| >= {circuit.threshold:.4g}")
        per = ", ".join(f"{k}:{v}" for k, v in sorted(x["neurons_per_layer"].items(), key=lambda kv: -kv[1])[:8])
        lines.append(f"most neurons in: {per}")
        if "verification" in x:
            v = x["verification"]
            lines.append(f"exact patching of the top {len(v['exact'])}: sign agreement {v['sign_agreement']:.2f}, "
                         f"Spearman {v['spearman'] if v['spearman'] is None else round(v['spearman'], 3)}")
    if "faithfulness_heldout" in x:
        gap = (f"m(full)={x['m_full_heldout']:.3f}  m(empty)={x['m_empty_heldout']:.3f}  "
               if "m_full_heldout" in x else "")
        lines.append(f"held-out prompts ({x.get('n_heldout', '?')}): {gap}faithfulness={x['faithfulness_heldout']:.3f}")
    if "mib" in x:
        lines.append(f"MIB areas over sizes {x['mib']['sizes'][0] * 100:g}%..100%: CPR={x['mib']['cpr']:.3f} "
                     f"(higher is better), CMD={x['mib']['cmd']:.3f} (lower is better)")
        if "protocol" in x["mib"]:
            lines.append(f"  protocol: {x['mib']['protocol']}")
    lines += ["", f"{'component':<22}{'score':>10}"]
    items = circuit.edges if circuit.edges else {k: v for k, v in circuit.nodes.items() if v != 0.0}
    if circuit.neurons:
        items = {f"m{l}.n{i}": v for l, t in circuit.neurons.items() for i, v in t.items()}
    for name, s in sorted(items.items(), key=lambda kv: -abs(kv[1]))[:show]:
        lines.append(f"{name:<22}{s:>+10.4f}")
    return "\n".join(lines)


def run(args):
    from tqdm.auto import tqdm

    from ...discovery import discover
    from ...errors import KnoweditError

    if args.task is None and args.task_file is None:
        raise KnoweditError("--task: give a task name or --task-file F.jsonl")
    if args.method == "mask":
        if args.density is None or not 0 < args.density < 1:
            raise KnoweditError(f"--density: {args.density} is not allowed; --method mask needs a share strictly "
                                "between 0 and 1, e.g. --density 0.1")
    handle = load_from_args(args)
    if args.heldout < 0:
        raise KnoweditError(f"--heldout: {args.heldout} must be 0 or a number of prompts")
    if args.level == "neuron" and args.method == "patching":
        raise KnoweditError("--method patching at --level neuron would take one run per neuron (46,080 on the "
                            "default model); use --method eap or eap-ig")
    options = {}
    if args.relations:
        if (args.task or "") != "facts":
            raise KnoweditError("--relations: filters the facts task's relations; use it with --task facts")
        options["relations"] = [r.strip() for r in args.relations.split(",") if r.strip()]
    # Under the MIB protocol the first --n prompts score the edges and the next --n give the curves;
    # --heldout prompts come from the same draw, after the scoring prompts, so the two never overlap.
    n = 2 * args.n if args.protocol == "mib" else args.n + args.heldout
    task = load_task(args.task or "custom", handle.tokenizer, n, args.seed, args.task_file, args.data, **options)
    eval_task = None
    if args.heldout and args.protocol != "mib":
        if len(task) <= args.n:
            raise KnoweditError(f"--heldout: the task has only {len(task)} prompts, none left after the --n {args.n} "
                                "scoring prompts; lower --n or --heldout")
        task, eval_task = task.subset(range(args.n)), task.subset(range(args.n, len(task)))
    if args.method == "mask":
        from ...discovery.learned_mask import run_mask_cli
        circuit = run_mask_cli(handle, task, {
            "granularity": args.granularity, "density": args.density, "mask_ablation": args.mask_ablation,
            "mask_steps": args.mask_steps, "mask_batch_size": args.mask_batch_size, "seed": args.seed,
            "out": args.out, "checkpoint": args.checkpoint, "progress": _mask_progress(args.mask_steps)})
        circuit.save(args.out)
        x = circuit.extra
        print(f"learned {args.granularity} mask for {task.name}: density {x['mask_density']:.4f} in {x['seconds']:.0f} s; "
              f"faithfulness {circuit.faithfulness:.3f}" + (" (held-out prompts)" if x.get("heldout") else ""))
        print(f"\nwrote {args.out} and its mask {x['weight_mask']['file']}" if "weight_mask" in x else f"\nwrote {args.out}")
        return
    circuit = discover(handle, task, method=args.method, level=args.level, ablation=args.ablation,
                       target=args.target, prune=not args.no_prune, top_k=args.top_k, steps=args.steps,
                       batch_size=args.batch_size, candidates=args.candidates, mib=args.mib,
                       protocol=args.protocol, bos=args.bos, progress=tqdm, eval_task=eval_task,
                       per_layer_k=args.per_layer_k, selection=args.selection, verify=args.verify)
    if eval_task is not None and "faithfulness_heldout" not in circuit.extra:
        from ...discovery import circuit_faithfulness
        circuit.extra["faithfulness_heldout"] = round(circuit_faithfulness(handle, circuit, eval_task), 6)
        circuit.extra["n_heldout"] = len(eval_task)
    circuit.save(args.out)
    print(summary(circuit, args.show))
    print(f"\nwrote {args.out}")


def _mask_progress(steps: int):
    """One line every 10 steps: the loss, the expected density against its target, the task metric."""
    def show(step, row):
        if step % 10 == 0 or step == steps:
            print(f"step {step}/{steps}: loss {row['loss']:.4f}, expected density {row['expected_density']:.4f} "
                  f"(target {row['target_density']:.4f}), metric {row['metric']:.3f}, {row['seconds']:.0f} s", flush=True)
    return show
