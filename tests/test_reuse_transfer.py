"""The generalisation protocol of the persistent repair: training prompts in other wordings over
colour/object pools disjoint from every held-out prompt; the distillation objective; the table."""
import re

import pytest
import torch

from knowedit.errors import KnoweditError
from knowedit.tasks.colored_objects import colored_objects_task
from knowedit.tasks.colored_objects_varied import (EVAL_COLORS, EVAL_OBJECTS, TEMPLATES, TRAIN_COLORS, TRAIN_OBJECTS,
                                                   TRAIN_PLACES, leaked_words, varied_colored_objects_task,
                                                   vocabulary_overlap)

EVAL_WORDING = re.compile(r"On the [^,]+, (I see|there is|you see) ")


def test_train_and_eval_pools_are_disjoint():
    assert vocabulary_overlap(TRAIN_COLORS + TRAIN_OBJECTS + TRAIN_PLACES, EVAL_COLORS + EVAL_OBJECTS) == set()
    assert vocabulary_overlap(["navy hat"], ["hat"]) == {"hat"}  # the check itself can fail


def test_training_prompts_use_only_training_words_and_other_wordings(gpt2_tok):
    task = varied_colored_objects_task(gpt2_tok, n=60, seed=0)
    assert len(task) == 60
    for text in task.clean:
        assert leaked_words(text, EVAL_COLORS + EVAL_OBJECTS) == [], text
        assert not EVAL_WORDING.search(text), text
    used = {t for t in TEMPLATES if any(t.split("{L}")[0].split("{P}")[0] in c for c in task.clean)}
    assert len(used) >= 4


def test_training_positions_point_at_the_colours(tiny_gpt2):
    task = varied_colored_objects_task(tiny_gpt2.tokenizer, n=20, seed=1)
    for i, text in enumerate(task.clean):
        toks = tiny_gpt2.to_str_tokens(text)
        answer = tiny_gpt2.tokenizer.decode([task.answers[i]]).strip().lower()
        upto = lambda p: "".join(toks[:p + 1])  # noqa: E731  (a colour's last token closes the word)
        assert upto(task.positions["answer"][i][0]).endswith(" " + answer)
        for p in task.distractor_positions[i]:
            ends = [c for c in TRAIN_COLORS if upto(p).endswith(" " + c)]
            assert ends and ends != [answer], upto(p)[-30:]
        assert tiny_gpt2.tokenizer.decode([task.distractors[i]]).strip().lower() in TRAIN_COLORS


def test_generators_refuse_bad_pools(gpt2_tok):
    with pytest.raises(KnoweditError, match="n:"):
        varied_colored_objects_task(gpt2_tok, n=0)
    with pytest.raises(KnoweditError, match="colors/objects"):
        varied_colored_objects_task(gpt2_tok, n=4, colors=["navy", "tan"])
    with pytest.raises(KnoweditError, match="colors/objects"):
        colored_objects_task(gpt2_tok, n=4, colors=["red"])


def test_held_out_sets_share_no_word_with_training(gpt2_tok, shared_datasets):
    from knowedit.reuse.transfer import held_out_sets

    held = held_out_sets(gpt2_tok, n=40, seed=0, data_dir=shared_datasets)
    assert set(held) == {"generated", "cobjs", "bigbench"}
    for name, t in held.items():
        assert len(t) == 40, name
        assert all(leaked_words(text) == [] for text in t.clean), name
    assert leaked_words("Q: I see a navy mug") == ["navy"]


def test_output_objective_moves_the_model_towards_the_steered_one(tiny_llama, gpt2_tok):
    from knowedit.reuse import distil_steering
    from knowedit.reuse.steering import steering_intervention

    task = varied_colored_objects_task(gpt2_tok, n=4, seed=0)
    heads = ["a1.h0", "a2.h3"]
    b = tiny_llama.tokenize(task.clean)
    with torch.no_grad():
        plain = tiny_llama.last_logits(b).log_softmax(-1)
        with steering_intervention(tiny_llama, task, heads)(b, slice(0, 4)):
            steered = tiny_llama.last_logits(b).log_softmax(-1)
    edit = distil_steering(tiny_llama, task, heads, steps=5, lr=3e-2, keep_weight=0, batch_size=4)
    with edit, torch.no_grad():
        repaired = tiny_llama.last_logits(b).log_softmax(-1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean().item()  # noqa: E731
    assert kl(steered, repaired) < 0.8 * kl(steered, plain)


def test_distillation_refuses_bad_weights(tiny_gpt2, gpt2_tok):
    from knowedit.reuse import distil_steering

    task = varied_colored_objects_task(gpt2_tok, n=2, seed=0)
    before = {n: p.detach().clone() for n, p in tiny_gpt2.model.named_parameters()}
    with pytest.raises(KnoweditError, match="keep_weight alone"):
        distil_steering(tiny_gpt2, task, ["a1.h0"], output_weight=0, attention_weight=0, keep_weight=1)
    with pytest.raises(KnoweditError, match=">= 0"):
        distil_steering(tiny_gpt2, task, ["a1.h0"], ce_weight=-1)
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.model.named_parameters())


def test_transfer_table_per_source_and_pooled(tiny_gpt2):
    from knowedit.reuse.transfer import gain_kept, transfer_repair

    before = {n: p.detach().clone() for n, p in tiny_gpt2.model.named_parameters()}
    r = transfer_repair(tiny_gpt2, ["a2.h1"], train_n=4, eval_n=3, persistent_kwargs={"steps": 1, "batch_size": 2})
    t = r["table"]
    assert list(t["source"]) == ["generated", "all"] and list(t["n"]) == [3, 3]
    assert list(t.columns) == ["source", "n", "unsteered", "steered", "repaired", "gain_kept"]
    assert r["edit"].info["n_train"] == 4
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.model.named_parameters())
    assert gain_kept(0.2, 0.6, 0.5) == pytest.approx(0.75)
    assert gain_kept(0.2, 0.2, 0.5) != gain_kept(0.2, 0.2, 0.5)  # NaN: no gain to keep


def test_repair_cli_refuses_unknown_distil_keys(capsys):
    from knowedit.cli.main import main

    code = main(["repair", "--persistent", "--distil", "steps=2,temperature=3"])
    assert code != 0 and "temperature" in capsys.readouterr().err


def test_persistent_only_needs_heads_and_skips_the_ranking(tiny_gpt2):
    from knowedit.reuse import repair

    with pytest.raises(KnoweditError, match="persistent_only"):
        repair(tiny_gpt2, n=4, persistent=True, persistent_only=True)
    res = repair(tiny_gpt2, heads="a2.h1", n=4, persistent=True, persistent_only=True, facts_n=8, train_n=4,
                 eval_n=3, persistent_kwargs={"steps": 1, "batch_size": 2})
    assert res.ranking.empty and list(res.persistent["table"]["source"]) == ["generated", "all"]
    assert "ranking and controls skipped" in str(res) and "gain_kept" in str(res)
