"""``knowedit sae``: train an SAE or transcoder through sparsify (``train``) and measure one (``eval``)."""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from pathlib import Path

from ...errors import KnoweditError
from ..model_options import add_model_args, load_from_args


def add_parser(sub):
    p = sub.add_parser("sae", help="sparse autoencoders / transcoders: train through sparsify, evaluate")
    s = p.add_subparsers(dest="sae_command", required=True)
    t = s.add_parser("train", help="train a TopK SAE (or transcoder) on a model's activations with sparsify")
    add_model_args(t)
    t.add_argument("--hookpoint", required=True,
                   help="where: 'layers.L' (the residual stream after block L; 'h.L' and 'r{L}' work too) or "
                        "'layers.L.mlp' (MLP L, for --kind transcoder)")
    t.add_argument("--kind", default="sae", choices=("sae", "transcoder"))
    t.add_argument("--k", type=int, default=32, help="active latents per token (TopK)")
    t.add_argument("--expansion", type=int, default=16, help="latents per model dimension (width = expansion x d_model)")
    t.add_argument("--tokens", type=int, default=None,
                   help="training tokens (default: the training text once); more than the text makes several passes "
                        "over its activations, which are read from the model once")
    t.add_argument("--text", nargs="+", default=None,
                   help="training text files (.txt: paragraphs split by blank lines; .jsonl/.json: a 'text' field). "
                        "Default: the model-sampled corpus of the covariance statistics (offline)")
    t.add_argument("--samples", type=int, default=1000,
                   help="without --text: texts in the model-sampled corpus (1000 x 128 tokens ships for the default "
                        "model; more are sampled once and cached)")
    t.add_argument("--heldout", type=float, default=0.05,
                   help="share of the training texts kept out of training (measured as the same-source held-out set)")
    t.add_argument("--eval-text", nargs="+", default=None,
                   help="held-out text files, written differently from the training text, for the card's metrics "
                        "(default: knowedit's built-in written text: plain paragraphs and task prompts)")
    t.add_argument("--ctx-len", type=int, default=128, help="tokens per training row")
    t.add_argument("--batch-size", type=int, default=8,
                   help="rows per optimiser step (with --shuffle tokens: batch-size x ctx-len tokens per step)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: sparsify's, scaled by width)")
    t.add_argument("--optimizer", default="signum", choices=("signum", "adam", "muon"),
                   help="sparsify's optimizers (default signum: SignSGD with schedule-free averaging, sparsify's "
                        "default). With small batches on a ~100k-token corpus, adam trains far better: on SmolLM2-135M "
                        "layers.22 (expansion 8, k 32, 3M tokens) signum's averaged weights reached FVE 0.65 with 35%% "
                        "dead latents, adam with --lr 2e-3 --auxk-alpha 0.03125 FVE 0.82 with 0.2%% dead")
    t.add_argument("--auxk-alpha", type=float, default=0.0, help="weight of sparsify's AuxK loss for dead latents")
    t.add_argument("--dead-after", type=int, default=None,
                   help="a latent is dead after this many training tokens without firing (AuxK and progress; "
                        "default: one pass over the training activations, at most sparsify's 10M)")
    t.add_argument("--shuffle", default="tokens", choices=("tokens", "rows"),
                   help="minibatches of positions drawn from all cached activations (tokens) or whole rows in the "
                        "order sparsify's trainer takes them (rows)")
    t.add_argument("--activations", default="cache", choices=("cache", "stream"),
                   help="cache: read the site's activations once and train on them for every pass; stream: "
                        "sparsify's own Trainer, which runs the model again for every row")
    t.add_argument("--act-dtype", default="float16", choices=("float16", "float32"),
                   help="dtype of the cached activations (memory-mapped under the cache root above 2 GiB)")
    t.add_argument("--checkpoint-every", type=int, default=250_000,
                   help="training tokens between checkpoints: OUT/<hookpoint>/ then holds the SAE so far (its card "
                        "says 'partial') and train_state.pt, from which a rerun of the same command resumes (0: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-dtype", default="float16", choices=("float16", "float32", "bfloat16"),
                   help="dtype of the written weights")
    t.add_argument("--out", required=True, help="directory; the SAE goes to OUT/<hookpoint>/ in sparsify's layout")
    e = s.add_parser("eval", help="FVE, L0, dead latents and CE increase of an SAE on held-out text")
    add_model_args(e)
    e.add_argument("--sae", required=True, help="SAE directory (sparsify or SAELens format) or hub id")
    e.add_argument("--hookpoint", default=None, help="which SAE, when the directory holds several")
    e.add_argument("--text", nargs="+", default=None, help="text files (default: the SAE card's held-out texts)")
    e.add_argument("--max-texts", type=int, default=200)
    c = s.add_parser("circuit", help="a latent-level circuit of a task at the SAE's site (EAP on latents), with "
                                     "the heads that write its latents and a description of each")
    add_model_args(c)
    c.add_argument("--sae", required=True, help="SAE directory (sparsify or SAELens format) or hub id")
    c.add_argument("--hookpoint", default=None, help="which SAE, when the directory holds several")
    c.add_argument("--task", default="ioi", help="a built-in task (ioi, facts, seq-months, ...)")
    c.add_argument("--n", type=int, default=50, help="task prompts")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--target", type=float, default=0.7, help="faithfulness the latent circuit must keep")
    c.add_argument("--max-latents", type=int, default=50, help="at most this many latents")
    c.add_argument("--ablation", default="patch", choices=("patch", "mean"),
                   help="latents outside the circuit take their value on the corrupted counterpart (patch) or "
                        "their mean over the corrupted prompts' tokens (mean)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--contexts", type=int, default=200,
                   help="texts of the SAE's training corpus scanned for each latent's top contexts (0: none)")
    c.add_argument("--out", required=True, help="circuit JSON file")
    d = s.add_parser("describe", help="describe latents: top contexts, promoted / suppressed tokens, one line")
    add_model_args(d)
    d.add_argument("--sae", required=True)
    d.add_argument("--hookpoint", default=None)
    d.add_argument("--latents", nargs="+", required=True, help="latent names, e.g. r22.f45 r22.f1203")
    d.add_argument("--contexts", type=int, default=200, help="texts of the SAE's corpus to scan (0: none)")
    d.add_argument("--text", nargs="+", default=None, help="scan these text files instead of the SAE's corpus")
    return p


def _corpus(handle, args) -> tuple[list[list[int]], dict]:
    """Token ids of the training text and a description of it for the card (the covariance corpus
    code reads both the model-sampled corpus and user files)."""
    from ...editing.covariance import MODEL_SAMPLES, corpus_ids, settings

    if args.text is None:
        s = settings({"mom2_dataset": MODEL_SAMPLES, "mom2_n_samples": args.samples})
        ids = corpus_ids(handle, s)
        return ids, {"source": MODEL_SAMPLES, "n_texts": len(ids), "seed": s["seed"],
                     "tokens_per_text": s["sample_tokens"], "sampling": "temperature 1 from one-word starts, as "
                     "knowedit.editing.covariance samples its offline corpus"}
    ids, files = [], []
    for f in args.text:
        p = Path(f).expanduser()
        if not p.is_file():
            raise KnoweditError(f"--text: {f} is not a file")
        part = corpus_ids(handle, settings({"mom2_dataset": str(p), "mom2_n_samples": 10 ** 9,
                                            "mom2_sample_tokens": 10 ** 9}))
        ids += part
        files.append({"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "n_texts": len(part)})
    return ids, {"source": "files", "files": files, "n_texts": len(ids)}


WRITTEN_TASKS = (("ioi", 50), ("facts", 50), ("colored-objects", 20), ("seq-months", 30))


def _written_ids(handle) -> tuple[list[list[int]], dict]:
    """knowedit's built-in text written by people rather than sampled from a model: the plain held-out
    paragraphs of :mod:`knowedit.evaluation.perplexity` and the prompts (seed 0) of some built-in tasks,
    each followed by its answer token. Offline and the same on every machine."""
    from ...evaluation.perplexity import HELDOUT
    from ...tasks.registry import get_task

    tok = handle.tokenizer
    texts, parts = list(HELDOUT), {"paragraphs": len(HELDOUT)}
    for name, n in WRITTEN_TASKS:
        try:
            task = get_task(name, tok, n=n, seed=0)
        except KnoweditError:   # a task this tokenizer cannot build (e.g. multi-token answers): leave it out
            continue
        texts += [c + tok.decode([a]) for c, a in zip(task.clean, task.answers)]
        parts[name] = len(task)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [r for r in ids if r], {"source": "builtin", "what": "knowedit's built-in written text: the held-out "
                                   "paragraphs of knowedit.evaluation.perplexity and built-in task prompts (seed 0) "
                                   "followed by their answer token", "texts": parts}


def _file_ids(handle, files, max_texts: int = 10 ** 9) -> tuple[list[list[int]], list[dict]]:
    from ...editing.covariance import corpus_ids, settings
    ids, described = [], []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise KnoweditError(f"text file {f}: not a file")
        part = corpus_ids(handle, settings({"mom2_dataset": str(p), "mom2_n_samples": max_texts,
                                            "mom2_sample_tokens": 10 ** 9}))
        ids += part
        described.append({"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "n_texts": len(part)})
    return ids[:max_texts], described


def _check(args) -> None:
    for name in ("k", "expansion", "ctx_len", "batch_size", "samples"):
        if getattr(args, name) <= 0:
            raise KnoweditError(f"--{name.replace('_', '-')}: {getattr(args, name)}; give a positive integer")
    if args.tokens is not None and args.tokens <= 0:
        raise KnoweditError(f"--tokens: {args.tokens}; give a positive number of tokens")
    if not 0 < args.heldout < 1:
        raise KnoweditError(f"--heldout: {args.heldout}; give a share strictly between 0 and 1")
    if args.checkpoint_every < 0 or (args.dead_after is not None and args.dead_after <= 0):
        raise KnoweditError("--checkpoint-every must be 0 or more and --dead-after positive")
    if args.auxk_alpha < 0 or (args.lr is not None and args.lr <= 0):
        raise KnoweditError("--auxk-alpha must be 0 or more and --lr positive")
    for f in args.eval_text or []:
        if not Path(f).expanduser().is_file():
            raise KnoweditError(f"--eval-text: {f} is not a file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise KnoweditError(f"--out: {out} is a file; give a directory")


STATE = "train_state.pt"


def _versions() -> dict:
    from importlib.metadata import version
    return {"knowedit": version("knowedit"), "eai-sparsify": version("eai-sparsify"), "torch": version("torch"),
            "transformers": version("transformers"), "python": platform.python_version()}


def _train(args):
    from ...sae.metrics import evaluate
    from ...sae.save import save_sparsify
    from ...sae.site import check_layer, parse_site, sparsify_hookpoint
    from ...sae.train import train_sae

    _check(args)
    site = parse_site(args.hookpoint)
    if args.kind == "transcoder" and site.kind != "m":
        raise KnoweditError(f"--hookpoint {args.hookpoint}: a transcoder needs an MLP hookpoint such as "
                            f"'layers.{site.layer}.mlp'")
    handle = load_from_args(args)
    check_layer(site, handle)
    t0 = time.perf_counter()
    ids, corpus = _corpus(handle, args)
    n_held = max(1, round(args.heldout * len(ids)))
    if len(ids) - n_held < 1:
        raise KnoweditError(f"training text: {len(ids)} text(s) leave nothing to train on after holding out "
                            f"{n_held}; give more text")
    train_ids, held = ids[:-n_held], ids[-n_held:]
    if args.eval_text:
        written, files = _file_ids(handle, args.eval_text)
        written_info = {"source": "files", "what": "held-out text files given with --eval-text", "files": files}
    else:
        written, written_info = _written_ids(handle)
    print(f"model: {handle.name}; site {site}; {len(train_ids)} training texts "
          f"({sum(map(len, train_ids))} tokens), {len(held)} held out; corpus: {corpus['source']}", flush=True)
    hookpoint = sparsify_hookpoint(handle, site)
    d = Path(args.out) / hookpoint
    base_card = {"model": handle.name, "model_source": handle.source, "fingerprint": handle.fingerprint,
                 "dtype": str(handle.dtype).replace("torch.", ""), "hookpoint": hookpoint, "site": str(site),
                 "component_names": f"{site}.f{{i}}",
                 "corpus": {**corpus, "train_texts": len(train_ids), "heldout_texts": len(held),
                            "heldout": "the last texts"},
                 "command": "knowedit " + " ".join(sys.argv[1:])}

    def partial(sae, info):   # a kill keeps the SAE so far, said to be partial
        sae.hookpoint, sae.site = hookpoint, site
        save_sparsify(sae, d, dtype=args.save_dtype,
                      card={**base_card, "status": "partial", "training": info, "versions": _versions()})

    checkpoint = d / STATE if args.checkpoint_every and args.activations == "cache" else None
    sae, info = train_sae(handle, site, train_ids, kind=args.kind, k=args.k, expansion=args.expansion,
                          tokens=args.tokens, ctx_len=args.ctx_len, batch_size=args.batch_size, seed=args.seed,
                          lr=args.lr, auxk_alpha=args.auxk_alpha, optimizer=args.optimizer, shuffle=args.shuffle,
                          activations=args.activations, act_dtype=args.act_dtype, dead_after=args.dead_after,
                          checkpoint=checkpoint, checkpoint_every=args.checkpoint_every or None,
                          on_checkpoint=partial)
    secs = info.get("train_seconds", info["seconds"])
    print(f"trained in {info['seconds']:.0f} s ({info['tokens']} tokens; {secs:.0f} s of it training, "
          f"{1e6 * secs / info['tokens']:.0f} s per 1M tokens); measuring on held-out text", flush=True)
    n_cmp = min(len(held), len(train_ids))
    metrics = evaluate(handle, sae, written)
    same_source = evaluate(handle, sae, held)
    train_side = evaluate(handle, sae, train_ids[:n_cmp])
    card = {**base_card, "status": "complete", "training": info, "metrics": metrics,
            "metrics_text": written_info,
            "metrics_heldout_corpus": same_source,
            "metrics_train_corpus": {**train_side, "texts": f"the first {n_cmp} training texts (compare with "
                                                              "metrics_heldout_corpus for overfitting)"},
            "metrics_protocol": "knowedit.sae.metrics: FVE over every real token but each text's first; L0 per "
                                "token; dead = never active on that text; CE in nats per next-token position, "
                                "spliced without the error term minus clean. 'metrics' are on held-out text "
                                "written differently from the training text (metrics_text says which); "
                                "metrics_heldout_corpus on the held-out texts of the training corpus; "
                                "metrics_train_corpus on as many training texts",
            "seconds_total": round(time.perf_counter() - t0, 1), "versions": _versions()}
    d = save_sparsify(sae, d, dtype=args.save_dtype, card=card)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    size = sum(f.stat().st_size for f in d.iterdir())
    print(json.dumps({"metrics": metrics, "text": written_info["what"], "heldout_corpus": same_source,
                      "train_corpus": train_side}, indent=1))
    print(f"wrote {d} ({size / 2 ** 20:.1f} MiB)")


def _eval(args):
    from ...sae import load_sae
    from ...sae.metrics import evaluate

    handle = load_from_args(args)
    sae = load_sae(args.sae, handle, args.hookpoint)
    if args.text:
        ids, _ = _file_ids(handle, args.text, args.max_texts)
    else:
        card = sae.source.get("card") or {}
        text = card.get("metrics_text") or {}
        if text.get("source") == "builtin":
            ids, _ = _written_ids(handle)
        elif text.get("source") == "files":
            missing = [f["path"] for f in text["files"] if not Path(f["path"]).is_file()]
            if missing:
                raise KnoweditError(f"--text: the card's held-out files are not here ({', '.join(missing)}); "
                                    "give held-out text files")
            ids, _ = _file_ids(handle, [f["path"] for f in text["files"]])
        elif card.get("corpus", {}).get("source") == "model_samples":   # cards written before metrics_text
            from ...editing.covariance import MODEL_SAMPLES, corpus_ids, settings
            c = card["corpus"]
            ids = corpus_ids(handle, settings({"mom2_dataset": MODEL_SAMPLES, "mom2_n_samples": c["n_texts"]}))
            ids = ids[-c["heldout_texts"]:]
        else:
            raise KnoweditError("--text: this SAE has no card naming its held-out text; give held-out text files")
    print(json.dumps(evaluate(handle, sae, ids), indent=1))


def _context_ids(handle, sae, n: int, files=None) -> list[list[int]] | None:
    """Texts to find latents' top contexts in: the files given, else the first ``n`` texts of the
    model-sampled corpus the SAE's card names."""
    from ...editing.covariance import MODEL_SAMPLES, corpus_ids, settings
    if files:
        ids = []
        for f in files:
            ids += corpus_ids(handle, settings({"mom2_dataset": str(Path(f).expanduser()), "mom2_n_samples": n,
                                                "mom2_sample_tokens": 10 ** 9}))
        return ids[:n]
    if n <= 0:
        return None
    corpus = (sae.source.get("card") or {}).get("corpus") or {}
    if corpus.get("source") != MODEL_SAMPLES:
        print("(no top contexts: the SAE's card names no model-sampled corpus; give --text files)")
        return None
    return corpus_ids(handle, settings({"mom2_dataset": MODEL_SAMPLES, "mom2_n_samples": corpus.get("n_texts", 1000)}))[:n]


def _describe_lines(handle, sae, names, table) -> list[str]:
    from ...sae.describe import context_strings, describe
    out = []
    for n in names:
        i = handle.component(n).index
        out.append(f"{n}: {describe(handle, sae, i, table)}")
        if table is not None:
            out += [f"    {v:7.3f}  {c!r}" for v, c in context_strings(handle, table, i, limit=3)]
    return out


def _circuit(args):
    from ...discovery.latent_circuit import discover_latents
    from ...sae import load_sae
    from ...sae.describe import top_contexts
    from ...tasks.registry import get_task

    if not 0 < args.target <= 1.5:
        raise KnoweditError(f"--target: {args.target}; give a faithfulness such as 0.7")
    if args.max_latents <= 0 or args.n <= 0:
        raise KnoweditError("--max-latents and --n must be positive")
    out = Path(args.out)
    if out.is_dir():
        raise KnoweditError(f"--out: {out} is a directory; give a JSON file path")
    handle = load_from_args(args)
    sae = load_sae(args.sae, handle, args.hookpoint)
    task = get_task(args.task, handle.tokenizer, n=args.n, seed=args.seed)
    t0 = time.perf_counter()
    c = discover_latents(handle, task, sae.site, target=args.target, max_latents=args.max_latents,
                         ablation=args.ablation, batch_size=args.batch_size)
    c.extra["seconds"] = round(time.perf_counter() - t0, 1)
    c.extra["command"] = "knowedit " + " ".join(sys.argv[1:])
    ids = _context_ids(handle, sae, args.contexts)
    table = top_contexts(handle, sae, ids) if ids else None
    lines = _describe_lines(handle, sae, sorted(c.nodes, key=lambda n: -c.nodes[n]), table)
    c.extra["descriptions"] = {ln.split(": ", 1)[0]: ln.split(": ", 1)[1] for ln in lines if not ln.startswith(" ")}
    c.save(out)
    writers = {}
    for ws in c.extra.get("writers", {}).values():
        for h, v in ws[:3]:
            writers[h] = writers.get(h, 0) + 1
    print(f"{task.name}: {len(c.nodes)} latents at {sae.site} ({sae.hookpoint}), faithfulness {c.faithfulness:.3f} "
          f"(m(N) {c.extra['metric_full']:.3f}, m(empty) {c.extra['metric_empty']:.3f}); {c.extra['seconds']:.0f} s")
    print("heads writing them (count among each latent's top 3): " +
          ", ".join(f"{h} x{n}" for h, n in sorted(writers.items(), key=lambda t: -t[1])[:10]))
    print("\n".join(lines))
    print(f"wrote {out}")


def _describe(args):
    from ...sae import load_sae
    from ...sae.describe import top_contexts
    from ...sae.registry import latent_components

    handle = load_from_args(args)
    sae = load_sae(args.sae, handle, args.hookpoint)
    names = [c.name for c in latent_components(handle, args.latents)]
    ids = _context_ids(handle, sae, args.contexts, args.text)
    table = top_contexts(handle, sae, ids) if ids else None
    print("\n".join(_describe_lines(handle, sae, names, table)))


def run(args):
    return {"train": _train, "eval": _eval, "circuit": _circuit, "describe": _describe}[args.sae_command](args)
