import pytest

from knowedit import KnoweditError
from knowedit.models import components as C


def test_round_trip_names():
    for name in ["a5.h3", "m7", "emb", "logits", "a5.h3->m7", "a5.h3->a9.h6.q", "emb->a0.h1.k", "m3->logits"]:
        assert C.parse(name).name == name


def test_parse_fields():
    c = C.parse("a12.h4")
    assert (c.kind, c.layer, c.head) == ("head", 12, 4)
    e = C.parse("a5.h3->a9.h6.v")
    assert e.src == C.head(5, 3) and e.dst.port == "v"


@pytest.mark.parametrize("bad", ["a5", "h3", "a5.h3.x", "mlp7", "", "a-1.h0"])
def test_bad_names(bad):
    with pytest.raises(KnoweditError, match="not a valid name"):
        C.parse(bad)


def test_validate_ranges():
    with pytest.raises(KnoweditError, match="layer 99 is out of range.*0..29"):
        C.validate("a99.h0", n_layers=30, n_heads=9)
    with pytest.raises(KnoweditError, match="head 9 is out of range"):
        C.validate("a3.h9", n_layers=30, n_heads=9)
    with pytest.raises(KnoweditError, match="before the destination"):
        C.validate("m7->a5.h3", n_layers=30, n_heads=9)
    assert C.validate("a5.h3->m7", 30, 9).name == "a5.h3->m7"
    # An MLP feeds the heads of the next layer, not those of its own layer.
    with pytest.raises(KnoweditError):
        C.validate("m5->a5.h0.q", 30, 9)
