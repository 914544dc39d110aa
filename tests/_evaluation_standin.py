"""A stand-in editor for the evaluation tests (the real editors live in knowedit.editing): one
normalised gradient step on the NLL of the new target, on one down-projection, inside the mask."""
import torch

from knowedit.editing import Edit
from knowedit.errors import KnoweditError


def nudge(handle, requests, hparams=None, mask=None, mode="restrict", seed=0):
    hp = hparams or {}
    ad = handle.adapter
    layer = hp.get("layer", ad.n_layers // 2)
    name = ad.name_of(ad.mlp_out(layer).weight)
    allowed = None
    if mask is not None:
        if name not in mask:
            cands = [n for n in mask.tensors if n.endswith("weight") and mask[n].dim() == 2]
            if not cands:
                raise KnoweditError("nudge: the mask holds no weight matrix to edit")
            name = cands[len(cands) // 2]
        allowed = mask[name]
    p = dict(handle.model.named_parameters())[name]
    r = requests[0]
    tok = handle.tokenizer
    ids = tok(r.text, add_special_tokens=False)["input_ids"]
    tgt = tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids + tgt])
    p.requires_grad_(True)
    try:
        logits = handle.model(input_ids=x, use_cache=False).logits[0, len(ids) - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt))
        (g,) = torch.autograd.grad(loss, p)
    finally:
        p.requires_grad_(False)
    if allowed is not None:
        g = g * allowed
    step = -hp.get("step", 5.0) * g / (g.norm() + 1e-12)
    return Edit(handle, {name: p.detach() + step}, method="nudge").apply()
