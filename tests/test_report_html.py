import json
from html.parser import HTMLParser

import pytest

from knowedit.report import build_report, summary_table, to_latex, to_markdown
from knowedit.errors import KnoweditError


def _records():
    out = []
    for case in range(3):
        for ed in ("rome", "ft-m"):
            for cond in ("none", "circuit", "complement", "random"):
                es = float(cond != "circuit" or case == 0)
                out.append({"key": f"{case}|{ed}|{cond}", "case_id": case, "editor": ed, "condition": cond,
                            "subject": "S<&>", "prompt": "p", "target_new": "n", "target_true": "t", "error": None,
                            "before": {"cf_es": 0.0, "cf_ps": 0.0, "cf_ns": 1.0, "cf_p_new": 0.01, "task_ioi": 3.0},
                            "metrics": {"cf_es": es, "cf_ps": 0.5, "cf_ns": 0.8, "cf_p_new": 0.2 * es + 0.01,
                                        "ee_rewrite_acc": es, "task_ioi": 2.5, "task_ioi_delta": -0.5},
                            "generation": {"prompt": "<script>x</script>", "before": "a", "after": "b"}})
    out.append(dict(out[0], key="9|rome|none", case_id=9, error="mask leaves nothing to edit", metrics={}))
    return out


def _write(tmp_path):
    d = tmp_path / "res"
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (d / "run.json").write_text(json.dumps({"suite_name": "demo", "model": "m", "tasks": {"ioi": {"metric": "logit_diff", "n": 8}}}))
    (d / "circuits").mkdir()
    (d / "circuits" / "circuit.json").write_text(json.dumps(
        {"model": {"n_layers": 4, "n_heads": 3}, "task": {"name": "facts"}, "nodes": {"a1.h2": 0.7, "m3": 0.2}}))
    (d / "attention.json").write_text(json.dumps([{"head": "a1.h2", "tokens": ["a", "b"], "before": [0.3, 0.7],
                                                  "after": [0.9, 0.1]}]))
    return d


class _Check(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.refs, self.tags = [], 0, [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.refs.append(a[k])
        if tag == "img":
            self.imgs += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_report_valid_and_self_contained(tmp_path):
    d = _write(tmp_path)
    paths = build_report(d)
    text = paths["report.html"].read_text()
    p = _Check()
    p.feed(text)
    p.close()
    assert p.stack == [] and {"html", "head", "body", "table", "img"} <= p.tags
    assert p.imgs >= 5  # bars, shifts, collateral, heatmap, attention
    assert all(r.startswith("data:image/png;base64,") for r in p.refs)
    assert "://" not in text and not any(r.startswith("//") for r in p.refs)  # no URLs, no protocol-relative refs
    assert "@import" not in text and "url(" not in text
    assert "<script>" not in text and "&lt;script&gt;" in text  # user text is escaped
    assert "mask leaves nothing to edit" in text
    for k in ("summary.csv", "summary.md", "summary.tex", "collateral.md", "long.csv"):
        assert paths[k].exists()


def test_summary_aggregates_and_formats(tmp_path):
    s = summary_table(_records())
    row = s.loc[("rome", "circuit")]
    assert row["n"] == 3 and row["cf_es"] == pytest.approx(1 / 3)
    # S is the harmonic mean of the mean ES, PS, NS
    assert row["cf_s"] == pytest.approx(3 / (3 + 2 + 1 / 0.8))
    assert s.loc[("(unedited)", "-")]["n"] == 3 and s.loc[("rome", "none")]["errors"] == 1
    md = to_markdown(s)
    assert md.splitlines()[0].startswith("| editor | condition | n | cf_es")
    assert len({line.count("|") for line in md.splitlines()}) == 1
    tex = to_latex(s, "cap")
    assert r"\begin{tabular}" in tex and r"cf\_es" in tex and tex.count(r"\\") == len(s) + 1


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(KnoweditError, match="knowedit eval"):
        build_report(tmp_path)


def test_summary_keeps_a_row_for_a_fully_refused_condition():
    from knowedit.report.tables import summary_table
    ok = {"case_id": 0, "editor": "rome", "condition": "none", "error": None,
          "before": {"cf_es": 0.0}, "metrics": {"cf_es": 1.0}}
    refused = {"case_id": 0, "editor": "rome", "condition": "complement", "error": "mask: no MLP", "metrics": {}}
    df = summary_table([ok, refused])
    assert ("rome", "complement") in df.index
    assert df.loc[("rome", "complement"), "n"] == 0 and df.loc[("rome", "complement"), "errors"] == 1
    assert df.loc[("rome", "none"), "cf_es"] == 1.0
