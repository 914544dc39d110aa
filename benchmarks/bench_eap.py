"""Attribution patching (EAP, nodes) must cost at most 1.3x the plain two forwards and one backward
it needs, on the default model.

Plain: a no-grad forward on the corrupted prompts, a forward on the clean prompts and one backward
of the logit difference to the activations. EAP: the same passes with every head and MLP recorded,
the gradients with respect to all of them, and the node scores ``(a_corrupt - a_clean) · grad``."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians, report_ratio  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.discovery.attribution import gradient_pass, node_deltas  # noqa: E402
from knowedit.discovery.reference import Reference  # noqa: E402
from knowedit.hooks import HookSet  # noqa: E402
from knowedit.tasks import ioi_task  # noqa: E402
from knowedit.tasks.base import per_prompt_scores  # noqa: E402


def main():
    torch.manual_seed(0)
    h = load_model()
    n = int(os.environ.get("N", 16))
    task = ioi_task(h.tokenizer, n=n, seed=0)
    batch, cbatch = h.tokenize(task.clean), h.tokenize(task.corrupt)
    ans, dis = torch.tensor(task.answers), torch.tensor(task.distractors)
    ref = Reference(h, task, "patch", batch_size=n)

    def plain():
        with torch.no_grad():
            h.forward(cbatch)
        with torch.enable_grad(), HookSet() as hs:
            hs.post(h.adapter.embed, lambda m, a, out: out.detach().requires_grad_())
            emb = {}
            hs.post(h.adapter.embed, lambda m, a, out: emb.setdefault("e", out))
            m = per_prompt_scores(h.last_logits(batch).float(), ans, dis, "logit_diff").sum()
            torch.autograd.grad(m, [emb["e"]])

    def eap():
        r = ref.for_batch(0, batch)
        acts, grads, _ = gradient_pass(h, batch, ans, dis, "logit_diff")
        node_deltas(h, r, acts, grads)

    reps = int(os.environ.get("REPEATS", 5))
    med = interleaved_medians({"plain": plain, "eap": eap}, repeats=reps)
    med = {"plain 2 fwd + 1 bwd": med["plain"], "EAP (nodes)": med["eap"]}
    report_ratio(f"EAP on nodes, {n} IOI prompts x {batch.input_ids.shape[1]} tokens, median of {reps}",
                 med, "plain 2 fwd + 1 bwd", "EAP (nodes)", "<= 1.3")


if __name__ == "__main__":
    main()
