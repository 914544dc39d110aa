import json

import pytest
import torch

from knowedit import KnoweditError
from knowedit.circuit import Circuit, ParameterMask


def test_mask_shapes_and_slices(tiny):
    a = tiny.adapter
    c = Circuit.from_components(tiny, ["a1.h2", "m0"])
    m = c.parameter_mask(tiny)
    params = dict(tiny.model.named_parameters())
    for name, t in m.tensors.items():
        assert t.shape == params[name].shape
    # One head: d_head rows/cols in each of q, o; k/v slices of its KV head.
    o = m[a.name_of(a.o_proj(1).weight)]
    assert int(o.sum()) == a.d_head * a.d_model
    down = m[a.name_of(a.mlp_out(0).weight)]
    assert bool(down.all())
    assert m.mlp_layers() == [0] and m.heads() == [(1, 2)]
    assert a.name_of(a.mlp_out(1).weight) not in m


def test_mask_algebra_and_controls(tiny):
    m = Circuit.from_components(tiny, ["a1.h2", "a0.h0", "m1"]).parameter_mask(tiny)
    comp = m.complement()
    assert not set(comp.heads()) & set(m.heads())
    assert (m | comp).n_params() == m.universe().n_params()
    assert (m & comp).heads() == []
    r1, r2 = m.random_like(seed=1), m.random_like(seed=1)
    assert r1.units == r2.units
    assert len(r1.heads()) == 2 and len(r1.mlp_layers()) == 1
    assert r1.n_params() == pytest.approx(m.n_params(), rel=0.1)
    d = m.density()
    assert 0 < d["param_density"] < 1 and d["heads"] == 2 and d["norm_share_of_mask"] == 0.0
    with_norms = ParameterMask.from_components(tiny, ["m1"], include_norms=True).density()
    assert with_norms["norm_params"] > 0


def test_circuit_json_round_trip_and_model_check(tiny, tmp_path):
    c = Circuit.from_components(tiny, ["a1.h2", "m0", "a0.h1->m2"], scores={"a1.h2": 0.123456789},
                                faithfulness=0.9)
    p = c.save(tmp_path / "c.json")
    text = p.read_text()
    c.save(tmp_path / "d.json")
    assert (tmp_path / "d.json").read_text() == text
    d = json.loads(text)
    assert d["schema_version"] == 2 and d["model"]["fingerprint"] == tiny.fingerprint
    assert d["nodes"]["a1.h2"] == 0.123457
    back = Circuit.load(p, handle=tiny)
    assert back.heads() == ["a0.h1", "a1.h2"] and back.mlps() == ["m0", "m2"]
    d["model"]["fingerprint"] = "0000"
    d["model"]["name"] = "other-model"
    (tmp_path / "e.json").write_text(json.dumps(d))
    with pytest.raises(KnoweditError, match="other-model.*tiny-"):
        Circuit.load(tmp_path / "e.json", handle=tiny)


def test_circuit_set_algebra(tiny):
    a = Circuit.from_components(tiny, ["a1.h2", "a0.h0", "m1"])
    b = Circuit.from_components(tiny, ["a1.h2", "a2.h3"])
    assert set((a & b).heads()) == {"a1.h2"}
    assert set((a | b).heads()) == {"a0.h0", "a1.h2", "a2.h3"}
    ov = a.overlap(b)
    assert ov["jaccard"] == pytest.approx(1 / 3) and ov["shared"] == ["a1.h2"]
    comp = a.complement()
    assert "a1.h2" not in comp.heads() and len(comp.heads()) == 3 * 4 - 2
    with pytest.raises(KnoweditError, match="out of range"):
        Circuit.from_components(tiny, ["a7.h0"])


def test_top_heads_ranks_by_absolute_score_and_needs_scores(tiny_gpt2):
    from knowedit.circuit import Circuit
    c = Circuit.from_components(tiny_gpt2, ["a0.h1"])
    with pytest.raises(KnoweditError, match="all_scores"):
        c.top_heads(0.1)
    c.extra["all_scores"] = {"a0.h1": 0.1, "a1.h2": -0.5, "a2.h0": 0.3, "a0.h0": 0.0}
    assert c.top_heads(0.5) == ["a1.h2", "a2.h0"]
    with pytest.raises(KnoweditError, match="share"):
        c.top_heads(0)
