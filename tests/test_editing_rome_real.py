"""ROME on the real default model, and on a GPT2Config()-shaped random model with the real GPT-2
tokenizer (catches Conv1D orientation mistakes)."""
from pathlib import Path

import pytest
import torch
import yaml

from knowedit.editing import make_request, tensor_hash
from knowedit.editing.rome import ROME_DEFAULTS, apply_rome

ROOT = Path(__file__).resolve().parents[1]


def test_rome_moves_the_capital_of_france_and_keeps_japan(smol):
    hp = {**ROME_DEFAULTS, **yaml.safe_load((ROOT / "editors" / "rome" / "smollm2-135m.yaml").read_text())}
    before = {n: tensor_hash(p) for n, p in smol.model.named_parameters()}
    london, paris, tokyo = (smol.token_id(f" {w}") for w in ("London", "Paris", "Tokyo"))
    prompts = ["The capital of France is", "The capital of Japan is"]
    p0 = smol.next_token_probs(prompts)
    assert int(p0[0].argmax()) == paris and int(p0[1].argmax()) == tokyo
    e = apply_rome(smol, [make_request("The capital of {} is", "France", "London", "Paris")], hp)
    try:
        p1 = smol.next_token_probs(prompts)
        assert int(p1[0].argmax()) == london, smol.tokenizer.decode(p1[0].argmax())
        assert int(p1[1].argmax()) == tokyo
        assert e.info["variant"] == "rome" and e.info["covariance_tokens"] >= 100_000
    finally:
        e.undo()
    assert {n: tensor_hash(p) for n, p in smol.model.named_parameters()} == before


def test_rome_reaches_its_target_on_a_gpt2_layout_model(gpt2_tok, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from knowedit.models.handle import ModelHandle
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path))
    torch.manual_seed(0)
    h = ModelHandle(GPT2LMHeadModel(GPT2Config(n_layer=2)), gpt2_tok, name="gpt2-random")
    target = h.token_id(" Rome")
    hp = {"layers": [0], "mom2_dataset": "identity",
          "context_template_length_params": [[3, 2]], "v_num_grad_steps": 25, "clamp_norm_factor": 50.0,
          "v_weight_decay": 0.0, "max_update_ratio": 1e3}
    # The subject ends the prompt: a random model's attention would dilute δ before the last position.
    prompt = "Tell me about France"
    assert int(h.next_token_probs([prompt])[0].argmax()) != target
    e = apply_rome(h, [make_request("Tell me about {}", "France", "Rome")], hp)
    # ΔW k̄ = δ holds only with the right orientation; the target is then the top token
    assert int(h.next_token_probs([prompt])[0].argmax()) == target
    assert list(e.new_values) == ["transformer.h.0.mlp.c_proj.weight"]
