"""Circuit reuse on the real default model: steering sets exactly the intended pattern and
nothing else; bad input is refused."""
import pytest
import torch

from knowedit.errors import KnoweditError
from knowedit.hooks import even_over, record_attention, steer_attention
from knowedit.reuse import head_names, repair, steered_scores
from knowedit.reuse.steering import steering_intervention
from knowedit.tasks import Task, get_task

CHOSEN = ["a22.h4", "a23.h0"]


@pytest.fixture(scope="module")
def cobj(smol):
    return get_task("colored-objects", smol.tokenizer, n=6, seed=0)


def test_steered_heads_match_target_and_others_keep_their_pattern(smol, cobj):
    batch = smol.tokenize(cobj.clean)
    target = even_over(cobj.distractor_positions, batch.input_ids.shape[1])
    with torch.no_grad():
        with record_attention(smol, [22, 23]) as plain:
            smol.last_logits(batch)
        with steer_attention(smol, {h: target for h in CHOSEN}, batch.last), record_attention(smol, [22, 23]) as att:
            smol.last_logits(batch)
    rows = torch.arange(len(batch))
    for name in CHOSEN:
        c = smol.component(name)
        got = att[c.layer][rows, c.head, batch.last].float()
        assert (got - target).abs().max().item() < 1e-4
        # The unsteered pattern was spread differently: the check above can fail.
        assert (plain[c.layer][rows, c.head, batch.last].float() - target).abs().max().item() > 0.05
        # Other query positions of the steered head are untouched.
        assert torch.equal(att[c.layer][rows, c.head, 0], plain[c.layer][rows, c.head, 0])
    # Heads of the first steered layer that are not steered see the same inputs: same pattern, exactly.
    others = [h for h in range(9) if h != 4]
    assert torch.equal(att[22][:, others], plain[22][:, others])


def test_steering_changes_the_answer_and_the_intervention_uses_distractors(smol, cobj):
    batch = smol.tokenize(cobj.clean)
    with torch.no_grad():
        plain = smol.last_logits(batch)
        with steering_intervention(smol, cobj, CHOSEN)(batch, slice(0, len(cobj))):
            steered = smol.last_logits(batch)
    assert (steered - plain).abs().max().item() > 1e-3


def test_bad_input_is_refused(smol, cobj):
    no_pos = Task("plain", cobj.clean[:2], cobj.corrupt[:2], cobj.answers[:2], cobj.distractors[:2], "accuracy")
    with pytest.raises(KnoweditError, match="distractor_positions"):
        steered_scores(smol, no_pos, CHOSEN)
    with pytest.raises(KnoweditError, match="distractor_positions"):
        repair(smol, source="ioi", target="facts", n=4)
    with pytest.raises(KnoweditError, match="heads"):
        head_names(smol, ["a22.h4", "a40.h1"])
    with pytest.raises(KnoweditError, match="heads"):
        repair(smol, heads="a22.h99", n=4)
    with pytest.raises(KnoweditError, match="not an attention head"):
        head_names(smol, ["m3"])
