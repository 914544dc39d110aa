"""Idle interventions must add at most 5% to a forward pass on the default model.

Prints the median plain forward, the median forward with pass-through hooks on every attention
output projection and MLP (what patch/ablate install), and their ratio."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import interleaved_medians, report_ratio  # noqa: E402

from knowedit import load_model  # noqa: E402
from knowedit.hooks import idle_hooks  # noqa: E402
from knowedit.tasks import ioi_task  # noqa: E402


def main():
    torch.manual_seed(0)
    h = load_model()
    batch = h.tokenize(ioi_task(h.tokenizer, n=16, seed=0).clean)

    @torch.no_grad()
    def plain():
        h.forward(batch)

    @torch.no_grad()
    def hooked():
        with idle_hooks(h):
            h.forward(batch)

    reps = int(os.environ.get("REPEATS", 11))
    med = interleaved_medians({"plain": plain, "idle hooks": hooked}, repeats=reps)
    report_ratio(f"forward, 16 IOI prompts x {batch.input_ids.shape[1]} tokens, median of {reps}",
                 med, "plain", "idle hooks", "<= 1.05")


if __name__ == "__main__":
    main()
