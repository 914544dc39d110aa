"""Fidelity of discovery to the published protocols: BOS, per-template means, EAP-IG's reference,
dtypes, the MIB protocol and the direct-attribution sum (tiny GPT-2 and Llama layouts)."""
import copy
import json

import pytest
import torch

from knowedit.circuit import Circuit
from knowedit.discovery import Evaluator, attribution_scores, circuit_faithfulness, discover, explain
from knowedit.discovery.edge_attribution import edge_attribution_scores
from knowedit.discovery.edge_evaluate import EdgeEvaluator
from knowedit.discovery.edge_graph import EdgeGraph
from knowedit.discovery.reference import Reference
from knowedit.errors import KnoweditError
from knowedit.hooks import record
from knowedit.models.bos import convention_bos_id
from knowedit.tasks import Task, get_task, score

from test_discovery_tiny import _task


# ---- BOS ------------------------------------------------------------------------------------
def test_gpt2_ioi_prompts_start_with_endoftext_and_positions_follow(tiny_gpt2):
    h = tiny_gpt2
    on, off = get_task("ioi", h.tokenizer, n=6), get_task("ioi", h.tokenizer, n=6, bos=False)
    for task, first in ((on, 50256), (off, None)):
        ids = h.tokenize(task.clean, bos=task.bos).input_ids
        assert (ids[:, 0] == 50256).all() == (first is not None)
        for i in range(len(task)):
            assert int(ids[i, task.positions["answer"][i][0]]) == task.answers[i]
            assert int(ids[i, task.positions["S1"][i][0]]) == task.distractors[i]
            assert int(ids[i, task.positions["S2"][i][0]]) == task.distractors[i]
    assert on.positions["answer"][0][0] == off.positions["answer"][0][0] + 1


def test_bos_is_recorded_and_switchable(tiny_gpt2, tmp_path):
    task = _task(tiny_gpt2.tokenizer)
    on = discover(tiny_gpt2, task, top_k=3, prune=False)
    off = discover(tiny_gpt2, task, top_k=3, prune=False, bos=False)
    assert on.task["bos"] is True and off.task["bos"] is False
    assert on.extra["m_full"] != off.extra["m_full"]  # the BOS really went in
    # Old files (no 'bos', no 'means') still load and re-evaluate as they were found: no BOS, means by length.
    d = json.loads(off.to_json())
    del d["task"]["bos"]
    del d["method"]["means"]
    old = Circuit.from_dict(d)
    want = Evaluator(tiny_gpt2, task.with_bos(False, tiny_gpt2.tokenizer), means="length",
                     candidates="heads").faithfulness(old.nodes)
    assert circuit_faithfulness(tiny_gpt2, old, task) == pytest.approx(want, abs=1e-9)


def test_bos_convention_follows_the_tokenizer(gpt2_tok):
    class LlamaLike:  # a tokenizer that adds its own BOS, and one that does not
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens and self.adds else []) + [5]}

    assert convention_bos_id(gpt2_tok) == 50256
    assert convention_bos_id(LlamaLike(True)) == 1 and convention_bos_id(LlamaLike(False)) is None


def test_default_model_adds_no_bos(smol):
    task = get_task("ioi", smol.tokenizer, n=2)
    assert not smol.uses_bos(task.bos)
    assert smol.tokenize(task.clean[:1]).input_ids[0].tolist() == smol.tokenizer(task.clean[0])["input_ids"]


# ---- means per template -------------------------------------------------------------------
def test_mean_ablation_averages_the_prompts_own_template(tiny_llama):
    h = tiny_llama
    task = get_task("ioi", h.tokenizer, n=16, seed=1)
    lengths = {len(h.tokenizer(c)["input_ids"]) for c in task.corrupt}
    tpl = task.templates[0]
    mine = [i for i, t in enumerate(task.templates) if t == tpl]
    ref = Reference(h, task, "mean")
    b = h.tokenize(task.clean[:1], bos=task.bos)
    got = ref.for_batch(0, b)["mlp"][1][0]
    with torch.no_grad(), record(h) as rec:
        h.forward(h.tokenize([task.corrupt[i] for i in mine], bos=task.bos))
    want = rec.mlp[1].float().mean(0)
    assert torch.allclose(got[:want.shape[0]], want, atol=1e-5)
    # Templates of one token length (IOI has them) were mixed by the old length grouping.
    old = Reference(h, task, "mean", means="length").for_batch(0, b)["mlp"][1][0]
    assert len(lengths) < len(set(task.templates)) and not torch.allclose(old[:want.shape[0]], want, atol=1e-4)


def test_means_of_prompts_of_different_lengths_are_defined_position_by_position(tiny_gpt2):
    h = tiny_gpt2
    short, long = "The cat sat", "The cat sat on the big mat today"
    task = Task("ragged", [long, short], [short, long], [11, 11], [12, 12])
    ref = Reference(h, task, "mean")
    with torch.no_grad(), record(h) as rec:
        both = h.tokenize([short, long], bos=task.bos)
        h.forward(both)
    n_short = int(both.lengths[0])
    m = rec.mlp[0].float()
    got = ref.for_batch(0, h.tokenize([long], bos=task.bos))["mlp"][0][0]
    assert torch.allclose(got[:n_short], m[:, :n_short].mean(0), atol=1e-5)       # both prompts reach t
    assert torch.allclose(got[n_short:], m[1, n_short:int(both.lengths[1])], atol=1e-5)  # only the long one


# ---- EAP-IG -------------------------------------------------------------------------------
def test_eap_ig_refuses_mean_ablation_and_defaults_to_patching(tiny_gpt2):
    task = _task(tiny_gpt2.tokenizer)
    with pytest.raises(KnoweditError, match="EAP-IG"):
        attribution_scores(Evaluator(tiny_gpt2, task, ablation="mean"), "eap-ig", steps=2)
    with pytest.raises(KnoweditError, match="EAP-IG"):
        discover(tiny_gpt2, task, method="eap-ig", ablation="mean", top_k=2)
    with pytest.raises(KnoweditError, match="EAP-IG"):
        edge_attribution_scores(EdgeEvaluator(tiny_gpt2, task, ablation="mean"), "eap-ig", steps=2)
    c = discover(tiny_gpt2, task, method="eap-ig", top_k=2, prune=False, steps=2)
    assert c.method["ablation"] == "patch"
    assert discover(tiny_gpt2, task, method="eap", top_k=2, prune=False).method["ablation"] == "mean"


# ---- dtype --------------------------------------------------------------------------------
def _rel(a: dict, b: dict) -> float:
    keys = sorted(a)
    x, y = torch.tensor([a[k] for k in keys]), torch.tensor([b[k] for k in keys])
    return float((x - y).abs().max() / y.abs().max())


def _sharp(kind, tok):
    """A tiny random model initialised at std 0.1: at the usual 0.02 its clean-corrupt gap is ~1e-3
    logits, below bfloat16's rounding, and a comparison would measure noise."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from knowedit.models.handle import ModelHandle

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=128, vocab_size=len(tok),
                                           initializer_range=0.1))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                             num_hidden_layers=3, intermediate_size=96, vocab_size=len(tok),
                                             max_position_embeddings=128, tie_word_embeddings=False,
                                             initializer_range=0.1))
    return ModelHandle(model, tok, name=f"sharp-{kind}")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_discovery_runs_in_the_models_dtype_and_agrees_with_float32(gpt2_tok, kind, dtype):
    # The float32 reference holds the same (rounded) weights, so only the arithmetic differs. Stated
    # tolerance: bfloat16 scores within 6% of the largest score and circuit metrics within 0.02 logits;
    # float64 within 1e-4 of float32.
    tiny = _sharp(kind, gpt2_tok)
    tol = (0.06, 0.02) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    task = _task(tiny.tokenizer)
    low = copy.deepcopy(tiny)
    low.model.to(dtype)
    ref = copy.deepcopy(low)
    ref.model.float()
    nodes = lambda h: attribution_scores(Evaluator(h, task, ablation="patch", candidates="nodes"), "eap")
    assert _rel(nodes(low), nodes(ref)) < tol[0]
    edges = lambda h: edge_attribution_scores(EdgeEvaluator(h, task, ablation="patch"), "eap")
    e32 = edges(ref)
    assert _rel(edges(low), e32) < tol[0]
    # A circuit's metric, in logits (faithfulness divides by a clean-corrupt gap of ~0.1 logits here,
    # which would blow bfloat16's rounding up tenfold).
    top = sorted(e32, key=lambda e: -abs(e32[e]))[:20]
    f = lambda h: (lambda ev: ev.metric_with(ev.graph.present(top)))(EdgeEvaluator(h, task, ablation="patch"))
    assert f(low) == pytest.approx(f(ref), abs=tol[1])
    heads = [n for n in nodes(ref)][:6]
    fn = lambda h: Evaluator(h, task, ablation="mean", candidates="nodes").metric(heads)
    assert fn(low) == pytest.approx(fn(ref), abs=tol[1])


# ---- MIB protocol -------------------------------------------------------------------------
def test_mib_pruning_keeps_only_edges_on_a_path_from_the_input_to_the_logits():
    g = EdgeGraph(3, 2, emb=True)
    kept = lambda edges: {f"{g.source_names[u]}->{g.dest_names[v]}" for v, u in g.prune(g.present(edges)).nonzero().tolist()}
    path = ["emb->a0.h1.k", "a0.h1->m1", "m1->logits"]
    assert kept(path + ["a1.h0->m2", "emb->a2.h0.q"]) == set(path)  # a1.h0 reads nothing; a2.h0 feeds nothing
    assert kept(["a0.h1->m1", "m1->logits"]) == set()  # a0.h1 reads nothing


def test_mib_protocol_patches_the_embedding_and_curves_use_other_prompts(tiny):
    task = get_task("ioi", tiny.tokenizer, n=8, seed=2)
    a, b = task.subset(range(4)), task.subset(range(4, 8))
    ev = EdgeEvaluator(tiny, a, ablation="patch", emb=True, prune=True)
    assert any(e.startswith("emb->") for e in ev.nodes)
    corrupted = score(tiny, a, prompts="corrupt").double().mean().item()
    assert ev.empty == pytest.approx(corrupted, abs=1e-4)  # no edge at all: the corrupted run itself
    assert ev.faithfulness(ev.nodes) == pytest.approx(1.0, abs=1e-3)
    c = discover(tiny, task, protocol="mib", top_k=40)
    assert c.method["protocol"] == "mib" and c.method["level"] == "edge" and c.method["ablation"] == "patch"
    assert c.method["split"] == {"scoring": 4, "curves": 4}
    assert c.extra["mib"]["protocol"].startswith("mib:") and len(c.extra["mib"]["cpr_curve"]) == 10
    assert set(c.edges) == set(ev.kept(c.edges)) and len(c.edges) <= 40
    held = EdgeEvaluator(tiny, b, ablation="patch", emb=True, prune=True)
    assert c.extra["faithfulness_heldout"] == pytest.approx(held.faithfulness(c.edges), abs=1e-5)
    assert circuit_faithfulness(tiny, c, a) == pytest.approx(c.faithfulness, abs=1e-6)
    with pytest.raises(KnoweditError, match="counterfactual"):
        discover(tiny, task, protocol="mib", ablation="mean")
    from knowedit.cli.commands.discover import summary
    assert "protocol: mib" in summary(c) and "held-out prompts" in summary(c)


def test_cli_offers_the_bos_switch_and_the_protocol():
    import argparse

    from knowedit.cli.commands.discover import add_parser
    p = add_parser(argparse.ArgumentParser().add_subparsers())
    a = p.parse_args(["--task", "ioi", "--no-bos", "--protocol", "mib", "--out", "x.json"])
    assert a.bos is False and a.protocol == "mib" and a.ablation is None and a.level is None
    assert p.parse_args(["--task", "ioi", "--out", "x.json"]).bos is None


def test_in_sample_curves_say_so(tiny_gpt2):
    c = discover(tiny_gpt2, _task(tiny_gpt2.tokenizer), top_k=3, prune=False, mib=True)
    assert "in-sample" in c.extra["mib"]["protocol"] and "heads only" in c.extra["mib"]["protocol"]


# ---- explain ------------------------------------------------------------------------------
def test_explain_rows_add_up_to_the_logit_difference(tiny):
    df = explain(tiny, "When Mary and John went to the store, John gave a drink to", " Mary", " John")
    assert df.attrs["dla_total"] == pytest.approx(df.attrs["logit_diff"], abs=1e-4)
