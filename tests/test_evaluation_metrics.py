import math

import pytest
import torch

from knowedit.editing import EditRequest
from knowedit.evaluation import evaluate_requests, harmonic_mean, ngram_entropy, perplexity, score_pairs
from knowedit.evaluation.datasets import known_records


def _by_hand(handle, prompt, target):
    """Mean NLL, token accuracy and argmax of ``target`` after ``prompt``, one unpadded forward."""
    tok = handle.tokenizer
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = handle.model(input_ids=torch.tensor([p + t])).logits[0].float()
    logp = logits.log_softmax(-1)
    nll = [-float(logp[len(p) - 1 + j, tj]) for j, tj in enumerate(t)]
    arg = [int(logits[len(p) - 1 + j].argmax()) for j in range(len(t))]
    return sum(nll) / len(nll), sum(a == b for a, b in zip(arg, t)) / len(t), arg


PAIRS = [("The mother tongue of Danielle Darrieux is", " French"),
         ("Paris is the capital of", " the French Republic"),
         ("A", " very long target made of many tokens indeed"),
         ("When Mary and John went to the store, John gave a drink to", " Mary")]


def test_nll_and_accuracy_match_hand_computation(tiny):
    s = score_pairs(tiny, PAIRS, batch_size=3)  # padding and reordering must not matter
    for i, (p, t) in enumerate(PAIRS):
        nll, acc, arg = _by_hand(tiny, p, t)
        assert s.nll[i] == pytest.approx(nll, rel=1e-4, abs=1e-4)
        assert s.token_acc[i] == pytest.approx(acc)
        assert s.argmax[i] == arg


def test_token_accuracy_counts_argmax_hits(tiny_gpt2):
    # A target made of the model's own greedy tokens has accuracy 1; change one token and it drops.
    p = "The capital of France is"
    _, _, arg = _by_hand(tiny_gpt2, p, " a b c")
    greedy = tiny_gpt2.tokenizer.decode(arg)
    s = score_pairs(tiny_gpt2, [(p, greedy)])
    assert s.targets[0] == arg  # the decoded tokens re-tokenise to themselves
    assert s.token_acc[0] == 1.0
    s2 = score_pairs(tiny_gpt2, [(p, greedy)], compare_to=[[arg[0] + 1] + arg[1:]])
    assert s2.token_acc[0] == pytest.approx((len(arg) - 1) / len(arg))


def _req():
    return EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English",
                       target_true="French", paraphrase_prompts=["Danielle Darrieux spoke the language"],
                       neighborhood_prompts=["Michel Rocard is a native speaker of", "Jean Gabin spoke"],
                       portability=[{"prompt": "The language of Danielle Darrieux's films is", "answer": "English"}],
                       case_id=7)


def test_counterfact_and_easyedit_metrics_by_hand(tiny_llama):
    r = _req()
    m = evaluate_requests(tiny_llama, [r])[0].metrics
    pn = math.exp(-_by_hand(tiny_llama, r.text, " English")[0])
    pt = math.exp(-_by_hand(tiny_llama, r.text, " French")[0])
    assert m["cf_p_new"] == pytest.approx(pn, rel=1e-4)
    assert m["cf_es"] == float(pn > pt) and m["cf_em"] == pytest.approx(pn - pt, rel=1e-3, abs=1e-9)
    nb = [math.exp(-_by_hand(tiny_llama, q, " French")[0]) - math.exp(-_by_hand(tiny_llama, q, " English")[0])
          for q in r.neighborhood_prompts]
    assert m["cf_nm"] == pytest.approx(sum(nb) / 2, rel=1e-3, abs=1e-9)
    assert m["cf_ns"] == sum(d > 0 for d in nb) / 2
    assert m["ee_rewrite_acc"] == _by_hand(tiny_llama, r.text, " English")[1]
    assert m["ee_portability_acc"] == _by_hand(tiny_llama, r.portability[0]["prompt"], " English")[1]
    assert m["ee_locality_acc"] == 1.0  # against itself
    assert set(m) >= {"cf_es", "cf_ps", "cf_ns", "cf_em", "cf_pm", "cf_nm", "ee_rewrite_acc", "ee_rephrase_acc"}
    assert all(k.startswith(("cf_", "ee_")) for k in m)  # every column names its protocol


def test_locality_compares_with_pre_edit_argmax(tiny_gpt2):
    r = _req()
    before = evaluate_requests(tiny_gpt2, [r])
    with torch.no_grad():  # a change that moves every prediction: scale the unembedding's rows randomly
        w = tiny_gpt2.adapter.unembed.weight
        saved = w.clone()
        w.mul_(torch.rand(w.shape[0], 1, generator=torch.Generator().manual_seed(0)) * 4)
    try:
        after = evaluate_requests(tiny_gpt2, [r], reference=before)[0].metrics
        args = [_by_hand(tiny_gpt2, q, " French")[2] for q in r.neighborhood_prompts]
    finally:
        with torch.no_grad():
            w.copy_(saved)
    ref = before[0].locality_argmax
    want = sum(sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(args, ref)) / len(args)
    assert after["ee_locality_acc"] == pytest.approx(want)
    assert after["ee_locality_acc"] < 1.0


def test_ngram_entropy_and_harmonic_mean():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("the cat sat on the mat.") > ngram_entropy("the the the the the the")
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0]) == 0.0


@pytest.mark.slow
def test_default_model_knows_paris(smol):
    r = EditRequest(prompt="The capital of {} is", subject="France", target_new="London", target_true="Paris",
                    neighborhood_prompts=["The capital of Italy is"], neighborhood_answer="Rome")
    m = evaluate_requests(smol, [r])[0].metrics
    assert m["cf_p_true"] > 0.5 and m["cf_es"] == 0.0 and m["cf_ns"] == 1.0
    assert m["ee_rewrite_acc"] == 0.0
    assert score_pairs(smol, [(r.text, " Paris")]).token_acc[0] == 1.0
    assert known_records(smol, [r]) == [r]
    ppl = perplexity(smol)
    assert 3 < ppl < 60, ppl  # plain English prose for a trained model
