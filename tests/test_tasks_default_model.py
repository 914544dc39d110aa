"""The task library on the real default model: each task is solvable, and the corruption removes the signal."""
import dataclasses

import pytest

from knowedit.tasks import get_task, score


def _mean(handle, task, prompts="clean"):
    return score(handle, task, prompts).mean().item()


@pytest.mark.parametrize("name", ["seq-months", "seq-numwords", "seq-numerals"])
def test_sequences_continue(smol, name):
    task = get_task(name, smol.tokenizer, n=16, seed=0)
    clean, corrupt = _mean(smol, task), _mean(smol, task, "corrupt")
    assert clean > 1.0 and clean > corrupt + 1.0, (clean, corrupt)


def test_facts_recall(smol):
    task = get_task("facts", smol.tokenizer, n=24, seed=0)
    clean, corrupt = _mean(smol, task), _mean(smol, task, "corrupt")
    assert clean > 1.0 and corrupt < 0, (clean, corrupt)


def test_colored_objects_accuracy_leaves_room(smol):
    task = get_task("colored-objects", smol.tokenizer, n=40, seed=0)
    acc = _mean(smol, task)
    assert 0.1 < acc < 0.8, acc
    diff = dataclasses.replace(task, metric="logit_diff")
    # Asking about the other object should move the logits toward that object's colour.
    assert _mean(smol, diff) > _mean(smol, diff, "corrupt")
