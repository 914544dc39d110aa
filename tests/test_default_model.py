"""Behaviour of the interventions on the real default model (SmolLM2-135M-Instruct)."""
import torch

from knowedit.hooks import ablate, mean_activations, patch, record
from knowedit.tasks import ioi_task, score


def test_loads_offline_and_knows_paris(smol):
    assert os_offline()
    assert smol.adapter.describe()["n_kv_heads"] == 3
    p = smol.next_token_probs(["The capital of France is"])[0]
    assert p.argmax().item() == smol.token_id(" Paris") and p.max() > 0.5


def os_offline():
    import os
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def test_ioi_logit_difference(smol):
    task = ioi_task(smol.tokenizer, n=50, seed=0)
    ld = score(smol, task)
    assert ld.mean() > 2
    assert (ld > 0).float().mean() > 0.9


def _ioi_same_length(smol, n=16):
    task = ioi_task(smol.tokenizer, n=n, seed=1)
    keep = [i for i in range(n) if len(smol.tokenize([task.clean[i]]).input_ids[0]) ==
            len(smol.tokenize([task.corrupt[i]]).input_ids[0])]
    return task.subset(keep)


def test_patching_important_heads_recovers_logit_difference(smol):
    task = _ioi_same_length(smol)
    clean, corrupt = smol.tokenize(task.clean), smol.tokenize(task.corrupt)
    assert torch.equal(clean.lengths, corrupt.lengths)
    a = torch.tensor(task.answers)
    d = torch.tensor(task.distractors)
    rows = torch.arange(len(task))

    def ld(logits):
        last = logits[rows, clean.last]
        return (last[rows, a] - last[rows, d]).mean().item()

    with torch.no_grad():
        with record(smol, smol.all_heads()) as rec:
            clean_ld = ld(smol.forward(clean))
        corrupt_ld = ld(smol.forward(corrupt))

        def gain(heads):
            with patch(smol, rec, heads, positions=corrupt.last):
                return ld(smol.forward(corrupt)) - corrupt_ld

        # Hierarchical search keeps this to ~75 forwards: whole layers first, then single heads
        # inside the five layers that matter most.
        n_l, n_h = smol.adapter.n_layers, smol.adapter.n_heads
        layer_gain = {l: gain([f"a{l}.h{h}" for h in range(n_h)]) for l in range(n_l)}
        layers = sorted(layer_gain, key=layer_gain.get, reverse=True)[:5]
        head_gain = {f"a{l}.h{h}": gain([f"a{l}.h{h}"]) for l in layers for h in range(n_h)}
        top = sorted(head_gain, key=head_gain.get, reverse=True)[:27]  # 10% of the 270 heads
        patched = gain(top) + corrupt_ld
    recovered = (patched - corrupt_ld) / (clean_ld - corrupt_ld)
    assert clean_ld - corrupt_ld > 2
    assert recovered > 0.6, recovered


def test_mean_ablating_a_late_layer_changes_logit_difference(smol):
    task = ioi_task(smol.tokenizer, n=30, seed=2)
    base = score(smol, task).mean().item()
    heads = [f"a23.h{h}" for h in range(9)]
    means = mean_activations(smol, task.corrupt, heads)
    ablated = score(smol, task, intervention=lambda b, s: ablate(smol, heads, how="mean", reference=means))
    assert abs(ablated.mean().item() - base) > 0.1 * abs(base), (base, ablated.mean().item())
