"""FT on the real default model: the edit takes, undo restores, the saved model reloads with plain transformers."""
import json

import pytest
import torch

from knowedit.editing import edit, tensor_hash

FRANCE = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"}


def top1(handle, prompt):
    return handle.tokenizer.decode([int(handle.next_token_probs([prompt])[0].argmax())])


def test_ft_m_edit_takes_saves_and_undoes(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    h0 = {n: tensor_hash(p) for n, p in smol.model.named_parameters()}
    assert top1(smol, FRANCE["prompt"]) == " Paris"
    e = edit(smol, [FRANCE], method="ft-m")
    try:
        assert top1(smol, FRANCE["prompt"]) == " Rome"
        # FT-M bleeds into other "capital of X" prompts on this model (measured, see the report), so only
        # a prompt of another relation is checked here.
        assert top1(smol, "The Eiffel Tower is in the city of") == " Paris"
        smol.save_pretrained(tmp_path / "edited")
    finally:
        e.undo()
    assert {n: tensor_hash(p) for n, p in smol.model.named_parameters()} == h0
    assert top1(smol, FRANCE["prompt"]) == " Paris"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    ids = smol.tokenizer(FRANCE["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert smol.tokenizer.decode([int(reloaded(ids).logits[0, -1].argmax())]) == " Rome"


def test_cli_edit_end_to_end(tmp_path, capsys, smol):
    from knowedit.cli.main import main

    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([
        FRANCE,
        {"requested_rewrite": {"prompt": "{} is located in the continent of", "subject": "Brazil",
                               "target_new": {"str": "Asia"}, "target_true": {"str": "South America"}},
         "case_id": 7},
    ]))
    out = tmp_path / "out"
    assert main(["edit", "--editor", "ft-m", "--requests", str(reqs), "--save", str(out)]) == 0
    text = capsys.readouterr().out
    assert "P(new) before" in text and "teacher-forced" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith(("0 ", "7 "))}
    p_new_before, p_new_after = (float(x) for x in rows["0"].split()[-4:-2])
    assert p_new_after > 0.5 > p_new_before
    assert (out / "config.json").exists() and (out / "knowedit_edit.json").exists()
    assert main(["edit", "--editor", "ft-m", "--requests", str(reqs), "--save", str(out)]) == 2  # not empty


def test_cli_unavailable_editor_or_bad_file(tmp_path, capsys):
    import importlib.util

    from knowedit.cli.main import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "The capital of France is", "subject": "Spain", "target_new": "Rome"}]))
    assert main(["edit", "--editor", "ft-m", "--requests", str(bad)]) == 2
    assert "subject 'Spain'" in capsys.readouterr().err
    if importlib.util.find_spec("knowedit.editing.rome") is None:
        ok = tmp_path / "ok.json"
        ok.write_text(json.dumps([FRANCE]))
        assert main(["edit", "--editor", "rome", "--requests", str(ok)]) == 2
        assert "not available" in capsys.readouterr().err
