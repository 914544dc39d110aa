"""What the persistent repair distils: the steered model's behaviour, not the labels.

Three teacher signals, each computed once with the unedited weights:

* ``output``: the steered model's next-token distribution at the final position. This is the effect
  of steering, whatever attention pattern the new q/k weights reach it with. The steered pattern
  itself (even over the distractor colours, nothing on the answer) is often out of reach for q/k
  weights: a colour token precedes its object, so its key cannot say which object it belongs to.
* ``keep``: the chosen heads' own attention at every other query position. Steering changes the final
  position only; q/k weights change all of them, which is what the source task and facts pay for.
* ``attention``: the steered pattern at the final position (the earlier objective, kept to compare).

The answer label is not a teacher: cross-entropy on it fits the training colours' tokens, which the
held-out prompts (other colours) never use."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..hooks import even_over
from ..hooks.attention import pattern_hooks
from .steering import steering_intervention


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last axis, for probability tensors (zeros in ``p`` contribute nothing)."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)


def output_kl(teacher_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(steered || current) of the final-position next-token distributions."""
    return F.kl_div(logits.float().log_softmax(-1), teacher_logp, log_target=True, reduction="batchmean")


def keep_kl(orig: torch.Tensor, now: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean KL(original || current) over the real query positions before the last; ``[B, h, T, T]``."""
    T = orig.shape[-2]
    q = torch.arange(T, device=orig.device)
    rows = (q[None, :] < (lengths[:, None] - 1)).to(orig.dtype)  # [B, T]
    kl = kl_rows(orig, now).mean(1)  # [B, T], averaged over the heads
    return (kl * rows).sum() / rows.sum().clamp_min(1)


@torch.no_grad()
def teachers(handle, task, heads, by_layer, batch, sl, want_output: bool, want_keep: bool):
    """The steered final-position log-probabilities ``[B, V]`` and the heads' original patterns
    ``{layer: [B, h, T, T]}`` for one batch (None for what is not wanted)."""
    patterns = {}

    def keep(layer):
        def fn(w):
            patterns[layer] = w[:, by_layer[layer]].detach().float().clone()
        return fn
    # One forward serves both: steering rewrites the final position only, and a causal model's other
    # positions never see it, so their patterns are the unsteered ones.
    steer = steering_intervention(handle, task, heads)(batch, sl) if want_output else contextlib.nullcontext()
    hooks = pattern_hooks(handle, {l: [keep(l)] for l in by_layer}) if want_keep else contextlib.nullcontext()
    with steer, hooks:
        logits = handle.last_logits(batch)
    return (logits.float().log_softmax(-1) if want_output else None), (patterns if want_keep else None)


def even_target(positions, batch, device):
    """The steering target at the final position: even over the distractor positions, ``[B, T]``."""
    return even_over(positions, batch.input_ids.shape[1]).to(device)
