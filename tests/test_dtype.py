"""Models run in bfloat16: hooks, discovery, editors, reuse and evaluation run in the model's dtype, and
what needs precision (statistics, solves, δ's and fine-tuning's master copies, attribution sums) in
float32/float64. Each check compares a bfloat16 model with a float32 model and states its tolerance.

On the tiny models the float32 reference holds the *same* (bfloat16-rounded) weights, so only the
arithmetic differs. bfloat16 keeps 8 significant bits: every activation carries ~0.4% rounding, and
the measured drift of recorded activations and logits is 0.2-1.2% relative. On the default model the
float32 reference is the model as shipped; the bfloat16 one also has rounded weights."""
import copy
from pathlib import Path

import pytest
import torch
import yaml

from knowedit.discovery import Evaluator, attribution_scores
from knowedit.discovery.edge_attribution import edge_attribution_scores
from knowedit.discovery.edge_evaluate import EdgeEvaluator
from knowedit.editing import make_request
from knowedit.editing.finetune import apply_ft_m
from knowedit.editing.memit import MEMIT_DEFAULTS, apply_memit
from knowedit.editing.rome import ROME_DEFAULTS, apply_rome
from knowedit.evaluation import evaluate_requests, perplexity
from knowedit.hooks import ablate, even_over, patch, record, record_attention, steer_attention, steer_neurons

from test_discovery_fidelity import _sharp
from test_discovery_tiny import _spearman, _task

BF16 = torch.bfloat16
REQ = make_request("The capital of {} is", "France", "Rome", "Paris")


def _pair(kind, tok):
    """(bfloat16 model, float32 model with the same bfloat16-rounded weights). Weights at std 0.1: at the
    usual 0.02 a tiny model's clean-corrupt gap (~1e-4 logits) is below bfloat16's resolution."""
    low = _sharp(kind, tok)
    low.model.to(BF16)
    ref = copy.deepcopy(low)
    ref.model.float()
    return low, ref


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def _rel_max(a: dict, b: dict) -> float:
    """Largest score error as a share of the largest score."""
    keys = sorted(b)
    x, y = torch.tensor([a[k] for k in keys]), torch.tensor([b[k] for k in keys])
    return float((x - y).abs().max() / y.abs().max())


def _top(s: dict, k: int) -> list[str]:
    return sorted(s, key=lambda e: -abs(s[e]))[:k]


def _corpus(tmp_path, n: int = 40):
    """A small text corpus for covariance statistics (the tiny models' keys need no particular text)."""
    words = ["river", "market", "engine", "garden", "letter", "window", "castle", "planet", "doctor", "summer"]
    texts = [f"In the {words[i % 10]} near the {words[(3 * i + 1) % 10]}, {i} people saw a {words[(7 * i + 2) % 10]} "
             f"and wrote about the {words[(i + 5) % 10]} of the {words[(2 * i + 3) % 10]}." for i in range(n)]
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(texts))
    return f


# ---- hooks ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hooks_record_patch_ablate_and_steer_in_bf16(gpt2_tok, kind):
    low, ref = _pair(kind, gpt2_tok)
    task = _task(gpt2_tok)
    clean, corrupt = ref.tokenize(task.clean), ref.tokenize(task.corrupt)
    comps = ["a1.h0", "a2.h3", "m1"]
    got = {}
    for name, h in (("bf16", low), ("fp32", ref)):
        with torch.no_grad():
            with record(h, comps + ["m0.n5"]) as rec:
                h.last_logits(clean)
            plain = h.last_logits(corrupt)
            with patch(h, rec, comps):
                patched = h.last_logits(corrupt)
            with ablate(h, comps, how="mean", reference=task.corrupt):
                mean_abl = h.last_logits(clean)
            with ablate(h, comps + ["m0.n5"], how="zero"):
                zero_abl = h.last_logits(clean)
            with steer_neurons(h, {"m1.n3": 2.0}):
                steered = h.last_logits(clean)
        got[name] = rec, plain, patched, mean_abl, zero_abl, steered
        assert rec["a1.h0"].dtype == rec["m1"].dtype == h.dtype   # hooks run in the model's dtype
    rec16, rec32 = got["bf16"][0], got["fp32"][0]
    # Recorded activations and every intervention's logits: within 3% relative (bf16's ~0.4% rounding per
    # operation, compounded over 3 layers; measured 0.5-1.2%).
    for c in comps + ["m0.n5"]:
        assert _rel(rec16[c], rec32[c]) < 0.03, c
    for i in range(1, 6):
        assert _rel(got["bf16"][i], got["fp32"][i]) < 0.03, i
    # The interventions do something in bf16 too (the comparison above is not between two no-ops).
    assert _rel(got["bf16"][2], got["bf16"][1]) > 0.01
    # Patching a run with its own activations changes no bit, in bf16 as in float32.
    with torch.no_grad():
        with record(low, comps) as own:
            base = low.last_logits(corrupt)
        with patch(low, own, comps):
            assert torch.equal(low.last_logits(corrupt), base)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_attention_steering_and_steered_scores_in_bf16(gpt2_tok, kind):
    from knowedit.reuse.steering import steered_scores, steering_intervention
    from knowedit.tasks import get_task

    low, ref = _pair(kind, gpt2_tok)
    b = ref.tokenize(_task(gpt2_tok).clean)
    target = even_over([[1, 2, 4]] * len(b), b.input_ids.shape[1])
    with torch.no_grad(), steer_attention(low, {"a1.h2": target}, b.last), record_attention(low, [1]) as att:
        low.last_logits(b)
    rows = torch.arange(len(b))
    # The steered pattern is the target rounded to bf16 (1/3 is not exact: 2^-9 relative, ~7e-4).
    assert att[1].dtype == BF16
    assert (att[1][rows, 2, b.last].float() - target).abs().max() < 2e-3
    # The reuse steering of Colored Objects (the heads attend evenly over the distractor colours).
    cob = get_task("colored-objects", gpt2_tok, n=6, seed=0)
    heads = ["a1.h0", "a2.h1"]
    assert steered_scores(low, cob, heads).dtype == torch.float32   # metrics come back in float32
    batch = ref.tokenize(cob.clean)
    out = {}
    for name, h in (("bf16", low), ("fp32", ref)):
        with torch.no_grad():
            plain = h.last_logits(batch)
            with steering_intervention(h, cob, heads)(batch, slice(0, len(cob))):
                out[name] = plain, h.last_logits(batch)
    # Steered logits within 3% relative of float32's (measured 0.8-1.2%), and steering changes them.
    assert _rel(out["bf16"][1], out["fp32"][1]) < 0.03
    assert _rel(out["bf16"][1], out["bf16"][0]) > 0.01


# ---- discovery --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_node_and_edge_eap_in_bf16_rank_like_float32(gpt2_tok, kind):
    low, ref = _pair(kind, gpt2_tok)
    task = _task(gpt2_tok)
    nodes = lambda h: attribution_scores(Evaluator(h, task, ablation="patch", candidates="nodes"), "eap")
    n16, n32 = nodes(low), nodes(ref)
    names = sorted(n32)
    # Node scores: rank correlation > 0.98 (measured 1.0) and the largest error under 6% of the largest
    # score (measured 2.6-2.7%): the sums accumulate in float32, only the forward/backward is bf16.
    assert _spearman([n16[k] for k in names], [n32[k] for k in names]) > 0.98
    assert _rel_max(n16, n32) < 0.06
    edges = lambda h: edge_attribution_scores(EdgeEvaluator(h, task, ablation="patch"), "eap")
    e16, e32 = edges(low), edges(ref)
    top = _top(e32, 30)
    # Edge scores: the 30 strongest by float32 keep their order (Spearman > 0.95, measured 0.999), 18 of
    # the top 20 are shared (measured 19-20), largest error under 6% of the largest score (measured 1.4-2.2%).
    assert _spearman([e16[e] for e in top], [e32[e] for e in top]) > 0.95
    assert len(set(_top(e16, 20)) & set(top[:20])) >= 18
    assert _rel_max(e16, e32) < 0.06


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_faithfulness_in_bf16_matches_float32_in_logits(gpt2_tok, kind):
    low, ref = _pair(kind, gpt2_tok)
    task = _task(gpt2_tok)
    heads = ["a0.h1", "a1.h2", "a2.h0", "a2.h3"]
    ev16, ev32 = (Evaluator(h, task, ablation="mean", candidates="nodes") for h in (low, ref))
    # Faithfulness divides by the clean-corrupt gap, so its error is the metric's error over the gap:
    # compared in logits, within 0.03 of float32 (measured 4e-4 - 1.3e-2; the logits here are ~1-5, so
    # bf16's rounding alone is ~0.005-0.02).
    for ev in (ev16, ev32):
        assert ev.faithfulness(heads) == pytest.approx((ev.metric([n for n in ev.nodes if n not in heads]) - ev.empty)
                                                       / ev.gap())
    assert ev16.metric(heads) == pytest.approx(ev32.metric(heads), abs=0.03)
    assert ev16.full == pytest.approx(ev32.full, abs=0.03) and ev16.empty == pytest.approx(ev32.empty, abs=0.03)
    assert abs(ev16.faithfulness(heads) - ev32.faithfulness(heads)) * abs(ev32.gap()) < 0.03


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_learned_mask_and_causal_trace_run_in_bf16(gpt2_tok, kind):
    from knowedit.discovery.causal_trace import trace
    from knowedit.discovery.learned_mask import MaskSettings, learn_mask

    low, ref = _pair(kind, gpt2_tok)
    task = _task(gpt2_tok)
    # The mask logits stay float32 and the soft mask enters the bf16 forward cast (this failed with a
    # dtype mismatch before). Each step's loss within 2% of float32's (measured under 0.8%); the final
    # masks share 95% of their units (measured 99-100%: Adam moves every logit by ±lr at first, so units
    # whose gradient is near zero can take the other sign from bf16 noise).
    s = MaskSettings(granularity="weight", ablation="mean", steps=3, checkpoint_every=100)
    r16, r32 = (learn_mask(h, task, s) for h in (low, ref))
    assert all(l.dtype == torch.float32 for l in r16.logits)
    for x, y in zip(r16.curve, r32.curve):
        assert x["loss"] == pytest.approx(y["loss"], rel=0.02)
    shared = sum(int((k16 & k32).sum()) for k16, k32 in zip(r16.keep, r32.keep))
    assert shared >= 0.95 * sum(int(k.sum()) for k in r32.keep) and r16.density == r32.density
    t16, t32 = (trace(h, "The capital of {} is", "France", "Paris", seeds=2, window=1) for h in (low, ref))
    # p(answer) of the clean run within 3% relative (bf16 logits, softmax in float32; measured 0.3-1.1%).
    assert t16.p_clean == pytest.approx(t32.p_clean, rel=0.03)


# ---- editors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rome_and_memit_in_bf16_with_their_own_statistics(gpt2_tok, kind, tmp_path, monkeypatch):
    from knowedit.editing.covariance import _path, key_stats, settings

    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))
    low, ref = _pair(kind, gpt2_tok)
    # No sampled prefixes: a bf16 model samples other prefix texts than float32 (on the default model 2 of
    # 8 differ), which would compare two different edits; the bare prompt isolates the arithmetic.
    common = {"mom2_dataset": str(_corpus(tmp_path)), "mom2_n_samples": 40, "context_template_length_params": [],
              "v_num_grad_steps": 8, "max_update_ratio": 1e3, "layers": [1]}
    rome_hp = {**ROME_DEFAULTS, **common}
    memit_hp = {**MEMIT_DEFAULTS, **common, "layers": [0, 1], "mom2_update_weight": 10.0}
    deltas = {}
    for name, h in (("bf16", low), ("fp32", ref)):
        for method, run, hp in (("rome", apply_rome, rome_hp), ("memit", apply_memit, memit_hp)):
            e = run(h, [REQ], hp)
            try:
                assert all(v.dtype == h.dtype for v in e.new_values.values())
                deltas[name, method] = {n: d.double() for n, d in e.deltas.items()}
                cov = e.info["covariance"]
                assert ("bf16 forward" in str(cov)) == (name == "bf16")
            finally:
                e.undo()
    # Same weights, so one fingerprint: the statistics are cached per dtype, never shared by accident.
    assert low.fingerprint == ref.fingerprint
    s = settings(rome_hp)
    assert _path(low, s, 1) != _path(ref, s, 1) and _path(low, s, 1).exists() and _path(ref, s, 1).exists()
    c16, c32 = (key_stats(h, [1], rome_hp)[1].mom2 for h in (low, ref))
    # Statistics from bf16 keys, summed in float64: within 2% of float32's (measured 0.3-0.9%).
    assert 0 < _rel(c16, c32) < 0.02
    for method in ("rome", "memit"):
        for n, d32 in deltas["fp32", method].items():
            d16 = deltas["bf16", method][n]
            # ROME: δ optimised on a float32 master, solved in float64; bf16 keys, values and the final
            # rounding of W + ΔW to bf16 (2^-9 of |W| per entry) leave the delta within 10% (measured
            # 2.4-4.1%). MEMIT's λC + KKᵀ solve amplifies key noise: within 15% (measured 2.2-7.4%).
            # Direction: cos > 0.99 (measured > 0.997).
            tol = 0.10 if method == "rome" else 0.15
            assert _rel(d16, d32) < tol, (method, n, _rel(d16, d32))
            assert torch.nn.functional.cosine_similarity(d16.flatten(), d32.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fine_tuning_keeps_a_float32_master_copy(gpt2_tok, kind):
    from conftest import _tiny

    low = _tiny(kind, gpt2_tok)
    low.model.to(BF16)
    ref = copy.deepcopy(low)
    ref.model.float()
    # lr 1e-4 is below half of bf16's spacing (2^-8 |w|) for most weights of |w| > 0.03: stepping the bf16
    # weights themselves rounds most steps away (measured 15% / 39% off float32 for GPT-2 / Llama).
    hp = {"layers": [1], "num_steps": 10, "lr": 1e-4, "early_stop_loss": 0.0}
    e16, e32 = apply_ft_m(low, [REQ], hp), apply_ft_m(ref, [REQ], hp)
    try:
        name = low.adapter.name_of(low.adapter.mlp_out(1).weight)
        assert e16.new_values[name].dtype == BF16
        d16 = e16.deltas[name].double()
        # What bf16 can hold of float32's training: its result rounded to bf16.
        ideal = (e32.new_values[name].to(BF16).double() - e32.originals[name].double())
        # With a float32 master copy the bf16 edit is float32's, rounded: within 10% (measured 2.5% / 6%).
        assert _rel(d16, ideal) < 0.10
    finally:
        e16.undo()
        e32.undo()


# ---- evaluation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_edit_metrics_and_perplexity_in_bf16(gpt2_tok, kind):
    low, ref = _pair(kind, gpt2_tok)
    req = make_request("The capital of {} is", "France", "Rome", "Paris",
                       paraphrase_prompts=["Paris is the capital of"], neighborhood_prompts=["The capital of Spain is"])
    m16, m32 = (evaluate_requests(h, [req])[0].metrics for h in (low, ref))
    assert m16.keys() == m32.keys()
    # Probabilities from float32 log-softmax of bf16 logits: within 3% relative (a logit's error of
    # ~0.01 moves p by ~1%; measured 0.2-1.3%).
    for k in ("cf_p_new", "cf_p_true"):
        assert m16[k] == pytest.approx(m32[k], rel=0.03), k
    # Perplexity within 1% (measured under 0.1%).
    assert perplexity(low) == pytest.approx(perplexity(ref), rel=0.01)
    p = low.next_token_probs(["The capital of France is"])
    assert p.dtype == torch.float32 and float(p.sum()) == pytest.approx(1.0, abs=1e-5)


# ---- the default model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol16():
    """The default model loaded in bfloat16 (the fixture ``smol`` is its float32 self)."""
    from knowedit import load_model
    h = load_model(dtype="bf16")
    assert h.dtype == BF16
    return h


@pytest.mark.slow
def test_default_model_edge_eap_on_ioi_in_bf16(smol, smol16):
    from knowedit.tasks import ioi_task

    task = ioi_task(smol.tokenizer, n=8, seed=0)
    ev16, ev32 = (EdgeEvaluator(h, task, ablation="mean", batch_size=8) for h in (smol16, smol))
    e16, e32 = edge_attribution_scores(ev16, "eap"), edge_attribution_scores(ev32, "eap")
    # The IOI gap: 4.14 logits in float32; bf16 within 0.1 logits (measured 0.02).
    assert ev16.gap() == pytest.approx(ev32.gap(), abs=0.1)
    # The strongest edges are the same: 18 of the top 20 (measured 20 of 20, and 49 of the top 50);
    # the top 50 keep their order (Spearman > 0.98, measured 0.9995); the largest error is under 3% of
    # the largest score (measured 1.1%; bf16 keeps 0.4% per activation, summed in float32).
    top = _top(e32, 50)
    assert len(set(_top(e16, 20)) & set(top[:20])) >= 18
    assert _spearman([e16[e] for e in top], [e32[e] for e in top]) > 0.98
    assert _rel_max(e16, e32) < 0.03


@pytest.mark.slow
def test_default_model_rome_edit_and_metrics_in_bf16(smol, smol16, tmp_path, monkeypatch):
    from knowedit.editing.covariance import read_ids, settings, shipped_corpus

    hp = {**ROME_DEFAULTS, **yaml.safe_load((Path(__file__).resolve().parents[1] / "editors" / "rome" /
                                             "smollm2-135m.yaml").read_text())}
    # Statistics on 60 texts of the shipped corpus, computed for each dtype in a private cache: a bf16 model
    # gets statistics of its own keys, and collecting them over all 1,000 texts would take ~90 s.
    shipped = shipped_corpus(smol, settings(hp))
    if shipped is None or not shipped.exists():
        pytest.skip("the shipped covariance corpus (data/covariance/) is absent")
    texts = [smol.tokenizer.decode(ids).replace("\n\n", "\n") for ids in read_ids(shipped)[:60]]
    (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "cache"))
    # The bare prompt only: prefixes are sampled from each model, and bf16 samples 2 of the 8 differently,
    # which alone moves δ by ~25%: that would compare two edits with different inputs.
    hp.update(mom2_dataset=str(tmp_path / "corpus.txt"), mom2_n_samples=60, context_template_length_params=[])
    req = make_request("The capital of {} is", "France", "London", "Paris",
                       paraphrase_prompts=["Paris is the capital city of"],
                       neighborhood_prompts=["The capital of Japan is"], neighborhood_answer="Tokyo")
    london, tokyo = smol.token_id(" London"), smol.token_id(" Tokyo")
    out = {}
    for name, h in (("bf16", smol16), ("fp32", smol)):
        before = evaluate_requests(h, [req])[0]
        ppl = perplexity(h)
        e = apply_rome(h, [req], hp)
        try:
            p = h.next_token_probs(["The capital of France is", "The capital of Japan is"])
            after = evaluate_requests(h, [req], reference=[before])[0].metrics
            layer = h.adapter.name_of(h.adapter.mlp_out(4).weight)
            out[name] = before.metrics, ppl, after, e.deltas[layer].double()
            # The edit succeeds in either dtype: London is top-1 for France, Tokyo stays for Japan.
            assert int(p[0].argmax()) == london and int(p[1].argmax()) == tokyo
            assert after["cf_p_new"] > after["cf_p_true"] and after["ee_rewrite_acc"] == 1.0
        finally:
            e.undo()
    (b16, ppl16, a16, d16), (b32, ppl32, a32, d32) = out["bf16"], out["fp32"]
    # Unedited metrics: probabilities within 0.03 absolute (measured P(Paris) 0.763 vs 0.773); perplexity
    # within 2% (measured 0.4%). bf16 also rounds the weights here, not only the arithmetic. Edited:
    # P(London) within 0.05 (measured 0.987 vs 0.986).
    for k in ("cf_p_new", "cf_p_true"):
        assert b16[k] == pytest.approx(b32[k], abs=0.03), k
    assert ppl16 == pytest.approx(ppl32, rel=0.02)
    assert a16["cf_p_new"] == pytest.approx(a32["cf_p_new"], abs=0.05)
    # The update ΔW: within 20% of float32's and direction cos > 0.99 (measured 8.5% and 0.996). Its
    # float64 solve sees bf16 keys, a δ optimised through a bf16 forward and bf16 statistics, and the
    # written W + ΔW is rounded to bf16 (2^-9 of |W| per entry).
    assert _rel(d16, d32) < 0.20
    assert torch.nn.functional.cosine_similarity(d16.flatten(), d32.flatten(), dim=0) > 0.99
