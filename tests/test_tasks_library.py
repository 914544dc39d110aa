"""Task generators and loaders at the tokenizer level (GPT-2 and SmolLM2 tokenizers)."""
import json

import pytest

from knowedit.errors import KnoweditError
from knowedit.models.bos import bos_prefix
from knowedit.tasks import (TASKS, colored_objects_task, custom_task, facts_task, get_task, load_bigbench,
                            load_cobjs, load_facts, load_seqcont, seqcont_task)
from knowedit.tasks.colored_objects import parse_last_question
from knowedit.tasks.vocab import answer_tokens, encode


@pytest.fixture(params=["gpt2", "smol"])
def tok(request, gpt2_tok):
    return gpt2_tok if request.param == "gpt2" else request.getfixturevalue("smol").tokenizer


def _at(tok, text, pos):
    # Positions count in the model's tokenization: after <|endoftext|> on GPT-2, from the first word on SmolLM2.
    return tok.decode([(bos_prefix(tok) + encode(tok, text))[pos]]).strip()


def _next_is(tok, prompt, tid):
    # The answer id really is the next token: prompt tokens + [id] decode back to prompt + answer.
    ids = encode(tok, prompt)
    assert encode(tok, tok.decode(ids + [tid])) == ids + [tid]


def test_colored_objects_positions_from_tokenization(tok):
    task = colored_objects_task(tok, n=20, seed=3)
    assert len(task) == 20 and task.metric == "accuracy"
    for i, text in enumerate(task.clean):
        scene = parse_last_question(text)
        items, q = scene["items"], scene["query"]
        wrong = [it["color"] for j, it in enumerate(items) if j != q]
        # Positions point at the last token of each word (" teal" may be " te" + "al" for GPT-2).
        got = [_at(tok, text, p) for p in task.distractor_positions[i]]
        assert len(got) == 2 and all(g and w.endswith(g) for g, w in zip(got, wrong)), (got, wrong)
        assert _at(tok, text, task.positions["answer"][i][0]) == items[q]["color"]
        assert _at(tok, text, task.positions["query"][i][0]) == items[q]["object"]
        assert tok.decode([task.answers[i]]) == " " + items[q]["color"].capitalize()
        # The distractor is the colour of the object the corrupt prompt asks about.
        asked = parse_last_question(task.corrupt[i])
        assert tok.decode([task.distractors[i]]).strip().lower() == asked["items"][asked["query"]]["color"]
        assert len(encode(tok, text)) == len(encode(tok, task.corrupt[i]))
    assert task.subset([2, 0]).positions["answer"] == [task.positions["answer"][2], task.positions["answer"][0]]


def test_colored_objects_format_and_determinism(gpt2_tok):
    a, b = colored_objects_task(gpt2_tok, n=5, seed=1), colored_objects_task(gpt2_tok, n=5, seed=1)
    assert a.clean == b.clean and a.corrupt == b.corrupt
    shot, query = a.clean[0].split("\nQ: ")
    assert shot.startswith("Q: On the ") and "\nA: " in shot and query.endswith("?\nA:")
    assert colored_objects_task(gpt2_tok, n=5, seed=2).clean != a.clean


def test_single_token_filter_drops_and_counts(monkeypatch, gpt2_tok):
    from knowedit.tasks import colored_objects as co
    # "fuchsia"/"turquoise" are several GPT-2 tokens: items that use them must be dropped and counted.
    monkeypatch.setattr(co, "COLORS", ["red", "blue", "green", "fuchsia", "turquoise", "mauve"])
    task = co.colored_objects_task(gpt2_tok, n=10, seed=0)
    assert task.meta["dropped"] > 0 and len(task) == 10
    for i in range(len(task)):
        assert tok_word(gpt2_tok, task.answers[i]) in {"Red", "Blue", "Green"}
    monkeypatch.setattr(co, "COLORS", ["fuchsia", "turquoise", "mauve"])
    with pytest.raises(KnoweditError, match="dropped"):
        co.colored_objects_task(gpt2_tok, n=5, seed=0)


def tok_word(tok, tid):
    return tok.decode([tid]).strip()


def test_numerals_split_space_moves_into_prompt(tok):
    task = seqcont_task(tok, "numerals", n=10, seed=0)
    for i in range(len(task)):
        _next_is(tok, task.clean[i], task.answers[i])
        first, nxt = int(tok_word(tok, task.distractors[i])), int(tok_word(tok, task.answers[i]))
        assert nxt == first + 1
        assert _at(tok, task.clean[i], task.distractor_positions[i][0]) == str(first)
    if len(encode(tok, " 12")) > 2:  # SmolLM2 spells numbers digit by digit: two-digit answers are dropped
        assert task.meta["dropped"] > 0


@pytest.mark.parametrize("kind", ["numwords", "months"])
def test_sequences_step_and_corruption(gpt2_tok, kind):
    task = seqcont_task(gpt2_tok, kind, n=12, seed=0, step=2)
    from knowedit.tasks.seqcont import SEQUENCES
    seq = SEQUENCES[kind, "en"]
    for i in range(len(task)):
        members = [_at(gpt2_tok, task.clean[i], p) for p in task.positions["members"][i]]
        idx = [seq.index(m) for m in members]
        assert [b - a for a, b in zip(idx, idx[1:])] == [2, 2, 2]
        assert tok_word(gpt2_tok, task.answers[i]) == seq[idx[-1] + 2]
        assert tok_word(gpt2_tok, task.distractors[i]) == members[-1]
        assert task.corrupt[i] != task.clean[i] and task.corrupt[i].endswith(task.clean[i][-12:])


def test_spanish_sequences_use_first_tokens(tok):
    for name in ("seq-months-es", "seq-numwords-es"):
        task = get_task(name, tok, n=10, seed=0)
        assert task.meta["language"] == "es" and task.meta["first_token"]
        assert all(a != d for a, d in zip(task.answers, task.distractors))
    with pytest.raises(KnoweditError, match="no item"):
        seqcont_task(tok, "months", n=5, language="es")  # strict single tokens: none survive


def test_builtin_facts_swap_subject(tok):
    task = facts_task(tok, n=1000, seed=0)  # every built-in fact
    assert len(task) > 60 and task.meta["source"] == "builtin"
    for i in range(len(task)):
        assert task.answers[i] != task.distractors[i]
        _next_is(tok, task.clean[i], task.answers[i])
    i = task.clean.index("The capital of France is")
    assert tok.decode([task.answers[i]]) == " Paris"
    assert task.corrupt[i].startswith("The capital of ") and "France" not in task.corrupt[i]
    assert _at(tok, task.clean[i], task.positions["subject_last"][i][0]) in {"France", "ance"}


def _jsonl(tmp_path, lines):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"clean": "The capital of France is", "corrupt": "The capital of Italy is",
                   "answer": " Paris", "distractor": " Rome"})


def test_custom_jsonl(tmp_path, tok):
    multi = json.dumps({"clean": "The capital of France is", "corrupt": "The capital of Italy is",
                        "answer": " Parisxyzzy", "distractor": " Rome"})
    task = custom_task(tok, _jsonl(tmp_path, [GOOD, "", multi]))
    assert len(task) == 1 and task.meta["dropped_lines"] == [3]
    assert tok.decode([task.answers[0]]) == " Paris"
    assert get_task("custom", tok, task_file=_jsonl(tmp_path, [GOOD])).clean == task.clean


@pytest.mark.parametrize("bad,match", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"clean": "a", "corrupt": "b", "answer": " x"}), "line 2: field 'distractor' is missing"),
    (json.dumps({"clean": "a", "corrupt": 3, "answer": " x", "distractor": " y"}), "line 2: field 'corrupt'"),
    ("[1, 2]", "line 2: expected a JSON object"),
])
def test_custom_jsonl_errors_name_the_line(tmp_path, gpt2_tok, bad, match):
    with pytest.raises(KnoweditError, match=match):
        custom_task(gpt2_tok, _jsonl(tmp_path, [GOOD, bad]))


def test_custom_without_valid_items_is_an_error(tmp_path, gpt2_tok):
    same = json.dumps({"clean": "a b", "corrupt": "a c", "answer": " Paris", "distractor": " Paris"})
    with pytest.raises(KnoweditError, match="no valid items"):
        custom_task(gpt2_tok, _jsonl(tmp_path, [same]))
    with pytest.raises(KnoweditError, match="no valid items"):
        custom_task(gpt2_tok, _jsonl(tmp_path, [""]))


def test_registry(gpt2_tok, tmp_path):
    for name in TASKS:
        if name != "custom":
            assert len(get_task(name, gpt2_tok, n=4, seed=0)) == 4
    assert get_task("ioi", gpt2_tok, n=4, corruption="swap").meta["corruption"] == "swap"
    with pytest.raises(KnoweditError, match="unknown"):
        get_task("nope", gpt2_tok)
    with pytest.raises(KnoweditError, match="--task-file"):
        get_task("custom", gpt2_tok)


def test_answer_tokens_rejects_non_prefix(gpt2_tok):
    assert answer_tokens(gpt2_tok, "The capital of France is", [" Paris", " Rome"]) is not None
    assert answer_tokens(gpt2_tok, "The capital of France is", [" Paris", " Paris"]) is None
    assert answer_tokens(gpt2_tok, "x", [" Pneumonoultramicroscopic", " Rome"]) is None


# --- loaders on the shared datasets ---

def test_cobjs_loader_positions(shared_datasets, tok):
    d = shared_datasets / "colored_objects"
    task = load_cobjs(tok, d / "cobjs_data_42.json", n=40)
    assert len(task) == 40 and task.meta["dropped"] == 0
    raw = json.loads((d / "cobjs_data_42.json").read_text())
    mind = json.loads((d / "cobjs_mindiff_data_42.json").read_text())
    for i in range(len(task)):
        assert task.clean[i] == raw[i][0] and task.corrupt[i] == mind[i][0]
        assert tok.decode([task.answers[i]]) == raw[i][1] and tok.decode([task.distractors[i]]) == mind[i][1]
        assert _at(tok, task.clean[i], task.positions["answer"][i][0]).capitalize() == raw[i][1].strip()
    if tok.name_or_path.startswith("gpt2") or len(tok) == 50257:
        # Merullo's script hard-coded these GPT-2 positions (counted without the BOS token); ours are found
        # from the tokenization, after the <|endoftext|> that GPT-2 prompts start with.
        assert {p[0] for p in task.positions["answer"]} <= {42, 46, 51}
        assert {p for ps in task.distractor_positions for p in ps} <= {42, 46, 51}


def test_bigbench_loader(shared_datasets, gpt2_tok):
    task = load_bigbench(gpt2_tok, shared_datasets / "colored_objects" / "bigbench_reasoning_about_colored_objects.json")
    assert 0 < len(task) < 200 and task.meta["dropped"] > 0  # mauve, fuchsia... are several tokens
    assert len(task) + task.meta["dropped"] == 200


@pytest.mark.parametrize("kind", ["numerals", "numwords", "months"])
def test_seqcont_loader(shared_datasets, tok, kind):
    task = load_seqcont(tok, shared_datasets / "seqcont", kind, n=30)
    assert len(task) == 30 and task.meta["unpaired"] == 0
    raw = json.loads((shared_datasets / "seqcont" / kind / f"{kind}_prompts_done.json").read_text())
    texts = {r["text"]: r for r in raw}
    for i in range(len(task)):
        r = texts[task.clean[i].rstrip(" ")]
        _next_is(tok, task.clean[i], task.answers[i])
        assert tok_word(tok, task.answers[i]) == r["corr"].strip()
        assert task.corrupt[i] != task.clean[i]


def test_facts_loaders(shared_datasets, tok):
    known = load_facts(tok, shared_datasets / "facts" / "known_1000.json", n=30)
    cf = load_facts(tok, shared_datasets / "counterfact" / "counterfact-edit.json", n=30)
    for task in (known, cf):
        assert len(task) == 30 and len(task.meta["relations"]) > 3
        assert all(a != d for a, d in zip(task.answers, task.distractors))
    assert get_task("facts", tok, n=5, data_dir=shared_datasets).meta["source"].endswith("known_1000.json")
