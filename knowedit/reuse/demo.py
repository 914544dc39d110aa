"""The repair step of ``knowedit demo``: steer the heads that the full search chose (see README,
"Circuit reuse") on fresh generated Colored Objects prompts, and record their attention before and
after for the report. A full search (ranking every shared head) takes minutes; the demo does not."""
from __future__ import annotations

import torch

from ..hooks import record_attention
from .repair import repair
from .steering import steering_intervention

# Chosen by `knowedit repair --source ioi --target colored-objects` on the default model (README table).
DEMO_HEADS = ["a24.h4", "a21.h5"]


def demo_repair(handle, n: int = 40, seed: int = 0, heads=DEMO_HEADS):
    res = repair(handle, "ioi", "colored-objects", heads=list(heads), candidates=list(heads), n=n, seed=seed)
    text = ("Colored Objects, generated one-shot prompts (n=%d, exact top-1 accuracy); IOI metric = logit diff\n" % n
            + res.table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
            + "\nIOI / Colored Objects important heads (top 20 each): {shared} shared, {share_of_target:.0%} of "
              "the Colored Objects set".format(**res.overlap))
    return text, _attention_items(handle, res, heads)


@torch.no_grad()
def _attention_items(handle, res, heads) -> list[dict]:
    from ..tasks import get_task

    task = get_task("colored-objects", handle.tokenizer, n=1, seed=res.meta.get("seed", 0))
    batch = handle.tokenize(task.clean)
    layers = sorted({handle.component(h).layer for h in heads})
    with record_attention(handle, layers) as before:
        handle.forward(batch)
    with steering_intervention(handle, task, list(heads))(batch, slice(0, 1)), record_attention(handle, layers) as after:
        handle.forward(batch)
    toks = handle.to_str_tokens(task.clean[0])
    items = []
    for h in heads:
        c = handle.component(h)
        q = int(batch.last[0])
        items.append({"head": h, "tokens": toks, "before": before[c.layer][0, c.head, q, :len(toks)].tolist(),
                      "after": after[c.layer][0, c.head, q, :len(toks)].tolist()})
    return items
