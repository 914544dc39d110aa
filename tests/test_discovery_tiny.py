"""Discovery plumbing on tiny random models (GPT-2 and Llama layouts)."""
import pytest
import torch

from knowedit.discovery import Evaluator, attribution_scores, patching_scores
from knowedit.discovery.reference import Reference
from knowedit.errors import KnoweditError
from knowedit.tasks import Task


def _task(tok):
    clean = ["When Mary and John went to the store, John gave a book to",
             "After Anna and Paul arrived at the park, Paul handed a pen to",
             "Then Kate and Mark were at the house. Mark passed a key to"]
    corrupt = ["When Mary and John went to the store, Lisa gave a book to",
               "After Anna and Paul arrived at the park, Eric handed a pen to",
               "Then Kate and Mark were at the house. Adam passed a key to"]
    t = lambda w: tok(" " + w)["input_ids"][0]
    return Task("tiny-ioi", clean, corrupt, [t("Mary"), t("Anna"), t("Kate")], [t("John"), t("Paul"), t("Mark")])


class SmallStep(Reference):
    """Reference a small step from the clean activations towards the corrupted ones, where the
    first-order estimate of EAP should agree with exact patching."""

    def __init__(self, handle, task, eps=0.05):
        super().__init__(handle, task, "patch")
        self.eps = eps

    def for_batch(self, start, batch):
        from knowedit.hooks import record
        corr = super().for_batch(start, batch)
        with torch.no_grad(), record(self.handle, resid=True) as rec:
            self.handle.forward(batch)
        clean = {"z": rec.z, "mlp": rec.mlp, "emb": {0: rec.resid[0]}}
        return {k: {l: clean[k][l] + self.eps * (corr[k][l] - clean[k][l]) for l in corr[k]} for k in corr}


def _spearman(x, y):
    rx = torch.tensor(x).argsort().argsort().float()
    ry = torch.tensor(y).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def test_eap_matches_exact_patching_for_small_steps(tiny):
    task = _task(tiny.tokenizer)
    ev = Evaluator(tiny, task, reference=SmallStep(tiny, task), candidates="nodes")
    eap = attribution_scores(ev, "eap")
    exact = patching_scores(ev)
    names = sorted(exact)
    x, y = [eap[n] for n in names], [exact[n] for n in names]
    assert _spearman(x, y) > 0.95
    big = [n for n in names if abs(exact[n]) > 0.1 * max(map(abs, y))]
    assert big and all((eap[n] > 0) == (exact[n] > 0) for n in big)
    top = max(names, key=lambda n: abs(exact[n]))
    assert max(names, key=lambda n: abs(eap[n])) == top


def test_full_and_empty_circuits_have_faithfulness_one_and_zero(tiny):
    task = _task(tiny.tokenizer)
    ev = Evaluator(tiny, task, ablation="patch", candidates="nodes")
    assert ev.faithfulness(ev.nodes) == pytest.approx(1.0, abs=1e-6)
    assert ev.faithfulness([]) == pytest.approx(0.0, abs=1e-6)


def test_eap_ig_runs_and_differs_from_eap(tiny_llama):
    task = _task(tiny_llama.tokenizer)
    ev = Evaluator(tiny_llama, task, ablation="patch")
    a = attribution_scores(ev, "eap")
    b = attribution_scores(ev, "eap-ig", steps=3)
    assert set(a) == set(b) == set(ev.nodes)
    assert any(abs(a[n] - b[n]) > 1e-6 for n in a)


def test_no_behaviour_to_attribute_is_an_error(tiny_gpt2):
    task = _task(tiny_gpt2.tokenizer)
    same = Task("same", task.clean, task.clean, task.answers, task.distractors)
    ev = Evaluator(tiny_gpt2, same, ablation="patch")
    with pytest.raises(KnoweditError, match="does not change"):
        attribution_scores(ev, "eap")


def test_task_with_no_items_is_an_error():
    with pytest.raises(KnoweditError, match="no valid items"):
        Task("empty", [], [], [], [])


def test_patch_ablation_needs_equal_lengths(tiny_gpt2):
    task = _task(tiny_gpt2.tokenizer)
    bad = Task("bad", task.clean, [c + " and then" for c in task.corrupt], task.answers, task.distractors)
    with pytest.raises(KnoweditError, match="item 0"):
        Evaluator(tiny_gpt2, bad, ablation="patch")
