"""ROME's variants and covariance sizes on known CounterFact records, one edit at a time.

δ (the value optimisation) depends on neither the variant nor the covariance, so it is computed once
per record and every (variant, covariance size) update is built from it, applied, scored and undone.
One JSON line per record goes to --out as it finishes; a rerun resumes after the records already there.

    python benchmarks/bench_rome_fidelity.py --n 100                          # the three variants
    python benchmarks/bench_rome_fidelity.py --n 50 --tokens 4000,20000,100000,all --variants r-rome

Protocol: CounterFact probability comparison (as in bench_rome.py): efficacy = P(new) > P(true) on
the prompt, paraphrase = the same on rephrase_prompt, neighbourhood = P(true) > P(new) on
locality_prompt after the edit; a refused edit counts as a failure on all three."""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rome import hparams, known_records, scores  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.editing import read_requests  # noqa: E402
from knowedit.editing.covariance import KeyStats, collect, corpus_ids, key_stats, settings  # noqa: E402
from knowedit.editing.edit import Edit  # noqa: E402
from knowedit.editing.errors import EditRefused  # noqa: E402
from knowedit.editing.rome import check_hparams, key_and_delta, rome_update  # noqa: E402


def covariances(h, hp, layer, budgets):
    """{label: (C regularised, tokens)}; a budget takes the corpus's first texts until it is reached."""
    s = settings(hp)
    out = {}
    full = key_stats(h, [layer], hp)[layer]
    ids = corpus_ids(h, s)
    ridge = check_hparams(hp, h.adapter.n_layers)["ridge"]
    for b in budgets:
        if b == "all":
            C, n = full.mom2, full.n_tokens
        else:
            want, m, got = int(b), 0, 0
            while m < len(ids) and got < want:
                got += len(ids[m])
                m += 1
            (total, n), = collect(h, [layer], ids[:m]).values()
            C = (total / n).float().double()   # stored in float32, as the cache does
        out[str(b)] = (KeyStats(C, n, full.source, layer).regularised(ridge), n)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--variants", default="rome,r-rome,hybrid")
    ap.add_argument("--tokens", default="all", help="covariance sizes in tokens, comma-separated; 'all' = the cache")
    ap.add_argument("--contexts", default="", help="context_template_length_params as JSON, e.g. [[5,10],[10,10]]")
    ap.add_argument("--out", default="results/bench_rome_fidelity.jsonl")
    args = ap.parse_args()
    h = load_model()
    hp = hparams("rome")
    if args.contexts:
        hp["context_template_length_params"] = json.loads(args.contexts)
    opts = check_hparams(hp, h.adapter.n_layers)
    layer = opts["layers"][0]
    variants = args.variants.split(",")
    covs = covariances(h, hp, layer, args.tokens.split(","))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(x)["case"] for x in out.read_text().splitlines()} if out.exists() else set()
    recs = known_records(h, args.n)
    print(f"{len(recs)} known records; layer {layer}; contexts {hp['context_template_length_params']}; "
          f"covariances {[(k, n) for k, (_, n) in covs.items()]}; {len(done)} already in {out}", flush=True)
    original = h.adapter.mlp_out(layer).weight.detach().clone()
    for i, r in enumerate(recs):
        case = str(r.get("case_id", i))
        if case in done:
            continue
        req = read_requests([r])[0]
        t = time.perf_counter()
        k_mean, k_plain, delta, info = key_and_delta(h, req, hp, layer, opts)
        t_delta = time.perf_counter() - t
        line = {"case": case, "delta_s": t_delta, "delta_steps": info["steps"], "loss": info["loss"], "results": []}
        for v in variants:
            for label, (C, n) in covs.items():
                res = {"variant": v, "tokens": label, "n_tokens": n}
                try:
                    name, new = rome_update(h, req, layer, None, C, {**opts, "variant": v}, k_mean, k_plain, delta, dict(info))
                    with Edit(h, {name: new}, "rome"):
                        s = scores(h, [r])
                    res.update({k: float(x[0]) for k, x in s.items()}, dw_norm=float((new.double() - original.double()).norm()))
                except EditRefused as e:
                    res.update(efficacy=0.0, paraphrase=0.0, neighbourhood=0.0, refused=str(e)[:200])
                line["results"].append(res)
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
        print(f"[{i + 1}/{len(recs)}] {case}: δ in {t_delta:.1f} s", flush=True)
    summarise(out)


def summarise(path: Path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    agg = {}
    for ln in lines:
        for r in ln["results"]:
            agg.setdefault((r["variant"], r["tokens"], r["n_tokens"]), []).append(r)
    print(f"\n{len(lines)} records; median δ time {sorted(x['delta_s'] for x in lines)[len(lines) // 2]:.1f} s")
    print("| variant | covariance tokens | n | efficacy | paraphrase | neighbourhood | mean ‖ΔW‖ | refused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (v, _, n), rs in agg.items():
        m = lambda k: sum(x[k] for x in rs) / len(rs)  # noqa: E731
        norms = [x["dw_norm"] for x in rs if "dw_norm" in x]
        print(f"| {v} | {n} | {len(rs)} | {m('efficacy'):.2f} | {m('paraphrase'):.2f} | {m('neighbourhood'):.2f} | "
              f"{sum(norms) / max(len(norms), 1):.3g} | {sum('refused' in x for x in rs)} |")


if __name__ == "__main__":
    main()
