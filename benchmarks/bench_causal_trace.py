"""Causal tracing of one fact must take at most 30 s on a 2-core CPU (every token × layer × state
kind, 5 noise seeds, batched).

Traces "The Eiffel Tower is located in the city of" -> " Paris" (10 tokens) on the default model:
first the three single-layer kinds of the budget (hidden state, MLP output, attention output at every
token × layer), then the full default trace that also restores windows of 10 MLP / attention layers
(ROME's figure). Prints the seconds, the ratio to the budget and the number of forward passes."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from knowedit import load_model  # noqa: E402
from knowedit.discovery.causal_trace import GRID_KINDS, KINDS, trace  # noqa: E402

PROMPT, SUBJECT, ANSWER = "The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris"
BUDGET = 30.0


@torch.no_grad()
def plain_tokens_per_second(h) -> float:
    """Throughput of a plain forward (160 copies of the prompt), to tell a loaded machine from slow code."""
    ids = h.tokenize([PROMPT]).input_ids.expand(160, -1)
    h.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    t = time.perf_counter()
    h.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return ids.numel() / (time.perf_counter() - t)


def main():
    h = load_model()
    trace(h, PROMPT, SUBJECT, ANSWER, kinds=("hidden",), positions="last_subject")   # warm-up
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; {PROMPT!r} -> {ANSWER!r}")
    for name, kinds in (("hidden + MLP + attention, single layers (the budget)", KINDS),
                        ("all five kinds (+ MLP and attention windows of 10)", GRID_KINDS)):
        tps = plain_tokens_per_second(h)
        t = time.perf_counter()
        r = trace(h, PROMPT, SUBJECT, ANSWER, kinds=kinds, seeds=5)
        dt = time.perf_counter() - t
        cells = len(r.tokens) * h.adapter.n_layers * len(kinds)
        print(f"{name}: {dt:.1f} s, ratio {dt / BUDGET:.2f} (budget <= 1.0, {BUDGET:.0f} s); {cells} cells x 5 seeds "
              f"in {r.settings['forwards']} forwards; p {r.p_clean:.3f} -> corrupted {r.p_corrupt:.3f}")
        print(f"  plain forward before it: {tps:.0f} tokens/s, so the trace cost as much as {dt * tps:,.0f} tokens of "
              f"plain forwards (a naive trace, every cell x seed a full {len(r.tokens)}-token forward: "
              f"{cells * 5 * len(r.tokens):,}); load average now {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
