"""The persistent repair trains only the chosen heads' q/k slices, bit-exactly nothing else; the
GPT-2 medium preset runs on a random GPT-2-medium-shaped model (plumbing only)."""
import pytest
import torch

from knowedit.circuit import ParameterMask
from knowedit.errors import KnoweditError
from knowedit.reuse import GPT2_MEDIUM, distil_steering
from knowedit.tasks.colored_objects import colored_objects_task


def test_distillation_touches_only_masked_qk_slices(tiny, gpt2_tok):
    task = colored_objects_task(gpt2_tok, n=4, seed=0)
    heads = ["a1.h0", "a2.h3"]
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    # The attention term is on so the loss has something to fall from on a random model.
    edit = distil_steering(tiny, task, heads, steps=3, lr=1e-2, batch_size=2, attention_weight=1.0)
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())  # nothing written yet
    assert edit.info["loss_per_pass"][-1] < edit.info["loss_per_pass"][0]
    mask = ParameterMask.from_components(tiny, heads, ports="qk").tensors
    with edit:
        changed = 0
        for n, p in tiny.model.named_parameters():
            m = mask.get(n, torch.zeros_like(p, dtype=torch.bool))
            assert torch.equal(p[~m], before[n][~m]), n
            changed += int((p[m] != before[n][m]).sum())
        assert changed > 0
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())  # undo is bit-exact


def test_distillation_refuses_a_task_without_distractor_positions(tiny, gpt2_tok):
    task = colored_objects_task(gpt2_tok, n=2, seed=0)
    task.distractor_positions = None
    with pytest.raises(KnoweditError, match="distractor_positions"):
        distil_steering(tiny, task, ["a1.h0"], steps=1)


def test_gpt2_medium_preset_runs_on_a_random_model(gpt2_tok, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from knowedit.hooks import even_over, record_attention
    from knowedit.models.handle import ModelHandle
    from knowedit.reuse import head_names
    from knowedit.reuse.steering import steering_intervention

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=24, n_head=16, n_embd=1024, vocab_size=len(gpt2_tok)))
    h = ModelHandle(model, gpt2_tok, name="random-gpt2-medium")
    heads = head_names(h, GPT2_MEDIUM.heads)
    task = colored_objects_task(gpt2_tok, n=2, seed=0)
    batch = h.tokenize(task.clean)
    target = even_over(task.distractor_positions, batch.input_ids.shape[1])
    with torch.no_grad(), steering_intervention(h, task, heads)(batch, slice(0, 2)), \
            record_attention(h, [12, 13, 19]) as att:
        h.last_logits(batch)
    rows = torch.arange(2)
    for name in heads:
        c = h.component(name)
        assert (att[c.layer][rows, c.head, batch.last] - target).abs().max().item() < 1e-4
    edit = distil_steering(h, task, heads, steps=1, batch_size=2)
    assert set(edit.info["trained_params"]) == {f"transformer.h.{l}.attn.c_attn.{w}" for l in (12, 13, 19)
                                                for w in ("weight", "bias")}
    assert sum(edit.norms().values()) > 0
    with edit:
        h.save_pretrained(tmp_path / "repaired")
    assert (tmp_path / "repaired" / "config.json").exists()


def test_repair_end_to_end_on_a_tiny_model(tiny_gpt2):
    from knowedit.reuse import repair

    res = repair(tiny_gpt2, n=4, seed=0, method="greedy")
    text = str(res)
    assert "no steering" in text and res.overlap["target"] == 12  # all 3x4 heads (fewer than the top 20)
    assert set(res.roles["role"]) <= {"mover", "negative mover", "inhibition", "induction", "duplicate-token",
                                      "previous-token", "other"}
    before = {n: p.detach().clone() for n, p in tiny_gpt2.model.named_parameters()}
    fixed = repair(tiny_gpt2, heads="a2.h1,a1.h0", n=4, seed=0, persistent=True, facts_n=8,
                   persistent_kwargs={"steps": 1, "batch_size": 2})
    assert fixed.chosen == ["a2.h1", "a1.h0"]
    assert fixed.table["condition"].str.startswith("control").sum() == 4
    assert fixed.persistent["weight_change_norm"] > 0 and "persistent repair" in str(fixed)
    # Not asked to apply: the model is left as it was.
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.model.named_parameters())


def test_repair_takes_the_tasks_circuits_edge_circuits_included(tiny_gpt2):
    from knowedit.circuit import Circuit
    from knowedit.reuse import repair

    src = Circuit.from_components(tiny_gpt2, ["a2.h1->logits", "a0.h3->a2.h1.q", "a1.h0->m1"])
    tgt = Circuit.from_components(tiny_gpt2, ["a2.h1", "a1.h0", "a0.h2"])
    res = repair(tiny_gpt2, n=4, seed=0, source_heads=src, target_heads=tgt, method="topk", k=1)
    assert res.meta["source_heads"] == ["a0.h3", "a1.h0", "a2.h1"]
    assert res.meta["candidates"] == ["a1.h0", "a2.h1"] and res.overlap["shared"] == 2


def test_repair_cli_names_a_missing_circuit_file(tmp_path, capsys):
    from knowedit.cli.main import main

    missing = tmp_path / "nope.json"
    code = main(["repair", "--source-circuit", str(missing), "--n", "4"])
    assert code != 0 and "nope.json" in capsys.readouterr().err
