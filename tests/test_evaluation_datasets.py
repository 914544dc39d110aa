import json
import urllib.request

import pytest

from knowedit.errors import KnoweditError
from knowedit.evaluation.datasets import SOURCES, load_counterfact, load_dataset, load_zsre

ROME_ROW = {"case_id": 3, "requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                                "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}},
            "paraphrase_prompts": ["Toko Yasuda is known for playing the"],
            "neighborhood_prompts": ["Jimi Hendrix plays the", "Slash plays the"],
            "generation_prompts": ["Toko Yasuda is incredible at"]}
ZSRE_ROW = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
            "rephrase": "Which university did Watts Humphrey go to?", "alt": "University of Michigan",
            "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge",
            "loc_ans": "Hugo Weaving",
            "portability": {"Reasoning": [{"prompt": "The mascot of Watts Humphrey's university is", "ground_truth": ["Wolverine"]}]}}


def test_shared_counterfact_flattened(shared_datasets):
    reqs = load_counterfact(shared_datasets / "counterfact" / "counterfact-edit.json", n=50)
    assert len(reqs) == 50
    r = reqs[0]
    assert r.case_id == 0 and r.subject == "Danielle Darrieux" and r.text.endswith("is")
    assert r.target_new == "English" and r.target_true == "French"
    assert r.paraphrase_prompts and r.neighborhood_prompts and r.locality_answer == "French"
    assert all(not q.target_new.startswith(" ") for q in reqs)


def test_rome_format_and_zsre(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps([ROME_ROW]))
    r = load_dataset("counterfact", p)[0]
    assert (r.text, r.target_new, r.target_true) == ("Toko Yasuda plays the", "piano", "guitar")
    assert len(r.neighborhood_prompts) == 2 and r.generation_prompts and r.locality_answer == "guitar"
    z = tmp_path / "zsre.json"
    z.write_text(json.dumps([ZSRE_ROW]))
    r = load_zsre(z)[0]
    assert r.target_new == "University of Michigan" and r.target_true == "Illinois Institute of Technology"
    assert r.neighborhood_prompts == ["who played desmond doss father in hacksaw ridge"]
    assert r.locality_answer == "Hugo Weaving"
    assert r.portability == [{"prompt": "The mascot of Watts Humphrey's university is", "answer": "Wolverine"}]


@pytest.mark.parametrize("loader,row,field", [
    ("counterfact", {"case_id": 11, "prompt": "The capital of X is", "subject": "Y", "target_new": "Z"}, "subject"),
    ("counterfact", {"case_id": 12, "prompt": "{} is in", "subject": "A", "target_new": "B"}, "true answer"),
    ("zsre", {"src": "Who?", "subject": "A"}, "alt"),
    ("zsre", dict(ZSRE_ROW, portability=[{"prompt": "p"}]), "portability"),
])
def test_malformed_row_is_named(tmp_path, loader, row, field):
    good = ROME_ROW if loader == "counterfact" else ZSRE_ROW
    p = tmp_path / "d.json"
    p.write_text(json.dumps([good, row]))
    with pytest.raises(KnoweditError, match=f"record 1.*{field}|{field}.*record 1"):
        load_dataset(loader, p)


def test_offline_download_names_url_and_alternative(monkeypatch, tmp_path):
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path))

    def refuse(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(KnoweditError, match="rome.baulab.info.*--data"):
        load_counterfact(None, n=1)
    with pytest.raises(KnoweditError, match="--data"):
        load_counterfact(tmp_path / "missing.json")


def test_download_checks_sha256(monkeypatch, tmp_path):
    import io
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path))
    body = json.dumps([ROME_ROW]).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(body))
    monkeypatch.setitem(SOURCES, "counterfact", {"url": "https://example.invalid/cf.json", "sha256": "0" * 64})
    with pytest.raises(KnoweditError, match="sha256"):
        load_counterfact(None)
    assert not (tmp_path / "datasets" / "cf.json").exists()  # nothing saved
    import hashlib
    monkeypatch.setitem(SOURCES, "counterfact", {"url": "https://example.invalid/cf.json",
                                                 "sha256": hashlib.sha256(body).hexdigest()})
    assert load_counterfact(None)[0].subject == "Toko Yasuda"
