"""Select the records a model already knows: P(true) > P(new) on the rewrite prompt before editing."""
from __future__ import annotations

from ..scoring import score_pairs


def known_records(handle, requests, n: int | None = None, batch_size: int = 32) -> list:
    """The first ``n`` requests (in order) whose true target beats the new one on the unedited model.
    Scores in chunks and stops once ``n`` are found, so a 10k-row file costs only what it must."""
    reqs = [r for r in requests if r.target_true]
    out = []
    for s0 in range(0, len(reqs), 2 * batch_size):
        chunk = reqs[s0:s0 + 2 * batch_size]
        pairs = [(r.text, " " + t) for r in chunk for t in (r.target_true, r.target_new)]
        s = score_pairs(handle, pairs, batch_size=batch_size)
        for i, r in enumerate(chunk):
            if s.nll[2 * i] < s.nll[2 * i + 1]:  # same order as the probabilities
                out.append(r)
                if n is not None and len(out) >= n:
                    return out
    return out
