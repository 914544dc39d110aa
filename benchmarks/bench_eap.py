"""Attribution patching (EAP) on nodes, and on every MLP neuron (46,080 on the default model), must
each cost at most 1.3x the plain two forwards and one backward they need, on the default model.

Plain: a no-grad forward on the corrupted prompts, a forward on the clean prompts and one backward
of the logit difference to the activations. EAP: the same passes with every head and MLP recorded,
the gradients with respect to all of them, and the node scores ``(a_corrupt - a_clean) · grad``.
EAP (neurons): the same with every MLP's neurons (the down projections' inputs) recorded and scored."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians, report_ratio  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.discovery.attribution import gradient_pass, node_deltas  # noqa: E402
from knowedit.discovery.neuron_attribution import _neuron_inputs, neuron_deltas  # noqa: E402
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
    nref = Reference(h, task, "patch", batch_size=n, neurons=True)
    register = _neuron_inputs(h.adapter)

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

    def eap_neurons():
        r = nref.for_batch(0, batch)
        acts, grads, _ = gradient_pass(h, batch, ans, dis, "logit_diff", extra_inputs=register)
        neuron_deltas(r, acts, grads, h.adapter.n_layers)

    reps = int(os.environ.get("REPEATS", 5))
    med = interleaved_medians({"plain": plain, "eap": eap, "neurons": eap_neurons}, repeats=reps)
    med = {"plain 2 fwd + 1 bwd": med["plain"], "EAP (nodes)": med["eap"], "EAP (every neuron)": med["neurons"]}
    T = batch.input_ids.shape[1]
    report_ratio(f"EAP on nodes, {n} IOI prompts x {T} tokens, median of {reps}",
                 med, "plain 2 fwd + 1 bwd", "EAP (nodes)", "<= 1.3")
    report_ratio("EAP on every MLP neuron, same prompts, same run", med, "plain 2 fwd + 1 bwd",
                 "EAP (every neuron)", "<= 1.3")


if __name__ == "__main__":
    main()
