"""The circuit-preserving projection on the real default model: one ROME edit with ``preserve: [ioi]``
still makes the edit and moves IOI's logit difference less than the same edit without it, measured
on IOI prompts other than those the projection was computed from."""
from knowedit.editing import edit, make_request, tensor_hash
from knowedit.evaluation.collateral import build_task, task_scores

REQ = make_request("The capital of {} is", "France", "Rome", "Paris")


def test_rome_with_preserve_ioi_keeps_ioi_and_makes_the_edit(smol):
    before = {n: tensor_hash(p) for n, p in smol.model.named_parameters()}
    ioi = {"ioi": build_task("ioi", smol.tokenizer, n=60, seed=1)}
    base = task_scores(smol, ioi)["ioi"]
    rome = smol.token_id(" Rome")
    change, info = {}, {}
    for name, pres in (("plain", []), ("preserved", ["ioi"])):
        e = edit(smol, [REQ], "rome", {"preserve": pres})
        try:
            assert int(smol.next_token_probs(["The capital of France is"])[0].argmax()) == rome, name
            change[name] = abs(task_scores(smol, ioi)["ioi"] - base)
            info[name] = e.info
        finally:
            e.undo()
    assert change["preserved"] < change["plain"], change
    p = info["preserved"]["preserve"]
    assert p["tasks"] == ["ioi"] and 0 < p["free_dims"] < smol.adapter.d_mlp
    assert 0 < info["preserved"]["requests"][0]["preserve_removed"] < 1
    assert {n: tensor_hash(p) for n, p in smol.model.named_parameters()} == before
