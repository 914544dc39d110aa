"""Edge-level discovery: per-head q/k/v ports, EAP on edges against exact edge ablation, edge
circuits, on tiny GPT-2 and Llama (GQA) models and on the default model."""
import pytest
import torch

from knowedit.discovery import discover
from knowedit.discovery.edge_attribution import edge_attribution_scores
from knowedit.discovery.edge_evaluate import EdgeEvaluator
from knowedit.discovery.evaluate import circuit_faithfulness
from knowedit.errors import KnoweditError
from knowedit.hooks import HookSet, hook_count
from knowedit.hooks.ports import head_ports, port_weight
from knowedit.tasks import ioi_task

from test_discovery_tiny import SmallStep, _spearman, _task


def test_ungrouped_ports_change_nothing_and_match_their_weights(tiny):
    b = tiny.tokenize(_task(tiny.tokenizer).clean)
    seen, normed = {}, {}
    with torch.no_grad():
        before = tiny.last_logits(b)
        with head_ports(tiny, lambda l, p, x: seen.__setitem__((l, p), x)), HookSet() as hs:
            for l in range(tiny.adapter.n_layers):
                hs.post(tiny.adapter.ln_attn(l), lambda m, a, o, l=l: normed.__setitem__(l, o))
            after = tiny.last_logits(b)
    assert torch.equal(before, after) and hook_count(tiny.model) == 0
    for p in "qkv":
        W, bias = port_weight(tiny.adapter, 1, p)
        x = seen[(1, p)]
        assert x.shape[-2] == tiny.adapter.n_heads  # k/v too: one slice per query head under GQA
        est = torch.einsum("btd,hde->bthe", normed[1], W) + (0 if bias is None else bias)
        torch.testing.assert_close(est, x, rtol=1e-5, atol=1e-5)


def test_every_edge_present_is_the_model_and_no_edge_is_the_empty_circuit(tiny):
    task = _task(tiny.tokenizer)
    ev = EdgeEvaluator(tiny, task, ablation="patch")
    assert ev.faithfulness(ev.nodes) == pytest.approx(1.0, abs=1e-5)
    assert ev.faithfulness([]) == pytest.approx(0.0, abs=1e-9)
    assert len(ev.nodes) == 222  # 3 layers x 4 heads: q/k/v ports, MLPs and logits


def test_edge_eap_matches_exact_edge_ablation_for_small_steps(tiny):
    task = _task(tiny.tokenizer)
    ev = EdgeEvaluator(tiny, task, reference=SmallStep(tiny, task))
    eap = edge_attribution_scores(ev, "eap")
    # exact: the circuit of every edge but one; the 12 strongest edges plus 12 into head ports
    ports = sorted((e for e in eap if e.endswith((".q", ".k", ".v"))), key=lambda e: -abs(eap[e]))[:12]
    names = sorted(eap, key=lambda e: -abs(eap[e]))[:12] + ports
    exact = {e: 1 - ev.faithfulness([x for x in ev.nodes if x != e]) for e in names}
    assert _spearman([eap[e] for e in names], [exact[e] for e in names]) > 0.9
    big = [e for e in names if abs(exact[e]) > 0.1 * max(abs(v) for v in exact.values())]
    assert big and all((eap[e] > 0) == (exact[e] > 0) for e in big)
    assert any(abs(exact[e]) > 1e-4 for e in ports)  # the port edges are not all trivially zero


def test_edge_discovery_writes_an_edge_circuit_that_reevaluates(tiny, tmp_path):
    task = _task(tiny.tokenizer)
    c = discover(tiny, task, method="eap", level="edge", ablation="patch", top_k=40)
    assert len(c.edges) == 40 and not c.nodes and c.method["level"] == "edge"
    assert all("->" in e for e in c.edges) and c.heads()
    c.save(tmp_path / "c.json")
    again = type(c).load(tmp_path / "c.json")
    assert circuit_faithfulness(tiny, again, task) == pytest.approx(c.faithfulness, abs=1e-6)
    ig = discover(tiny, task, method="eap-ig", level="edge", ablation="patch", top_k=40, steps=2)
    assert ig.method["ig_steps"] == 2


def test_edge_level_patching_is_refused(tiny_gpt2):
    with pytest.raises(KnoweditError, match="eap"):
        discover(tiny_gpt2, _task(tiny_gpt2.tokenizer), method="patching", level="edge")


def test_edge_eap_on_the_default_model_agrees_with_exact_edge_ablation(smol):
    task = ioi_task(smol.tokenizer, n=8, seed=0)
    ev = EdgeEvaluator(smol, task, ablation="mean", batch_size=8)
    eap = edge_attribution_scores(ev, "eap")
    top = sorted(eap, key=lambda e: -abs(eap[e]))[:4]
    exact = {e: 1 - ev.faithfulness([x for x in ev.nodes if x != e]) for e in top}
    # the strongest edges really matter, and in the direction EAP says
    assert all(abs(exact[e]) > 0.02 and (exact[e] > 0) == (eap[e] > 0) for e in top), (eap, exact)
