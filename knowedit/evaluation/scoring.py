"""Batched teacher-forced scoring of (prompt, target) pairs: one forward pass per batch of pairs.

Prompt and target are tokenised separately and concatenated (the CounterFact convention), so the
target's tokens are the same whatever prompt precedes them. Only the positions that predict target
tokens go through the unembedding: for a 49k vocabulary the full ``[B, T, V]`` projection would cost
more than the rest of a small model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KnoweditError


@dataclass
class PairScores:
    """Per pair: mean per-token NLL of the target, the fraction of target tokens that are the
    argmax prediction, and the argmax tokens themselves (for locality comparisons)."""

    nll: list[float]
    token_acc: list[float]
    argmax: list[list[int]]
    targets: list[list[int]]


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []


@torch.no_grad()
def score_pairs(handle, pairs: list[tuple[str, str]], batch_size: int = 32,
                compare_to: list[list[int]] | None = None) -> PairScores:
    """Score ``pairs`` of (prompt, target text). The target text is used as given: callers add the
    leading space. With ``compare_to`` (argmax tokens from an earlier call on the same pairs), the
    token accuracy is agreement with those tokens instead of with the target."""
    if not pairs:
        return PairScores([], [], [], [])
    tok = handle.tokenizer
    p_ids = _ids(tok, [p for p, _ in pairs])
    t_ids = _ids(tok, [t for _, t in pairs])
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        if not p or not t:
            which = "prompt" if not p else "target"
            raise KnoweditError(f"pair {i} {pairs[i]!r}: the {which} tokenises to nothing; give non-empty text")
    if compare_to is not None and len(compare_to) != len(pairs):
        raise KnoweditError(f"compare_to has {len(compare_to)} entries for {len(pairs)} pairs")
    n = len(pairs)
    # Similar lengths in a batch waste less on padding.
    order = sorted(range(n), key=lambda i: len(p_ids[i]) + len(t_ids[i]))
    nll, acc, arg = [0.0] * n, [0.0] * n, [[] for _ in range(n)]
    model, ad, dev = handle.model, handle.adapter, handle.device
    pad = tok.pad_token_id
    captured = {}
    hook = ad.ln_final.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    try:
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            seqs = [p_ids[i] + t_ids[i] for i in idx]
            T = max(len(q) for q in seqs)
            x = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            rows, cols, gold = [], [], []
            for b, (i, q) in enumerate(zip(idx, seqs)):
                x[b, :len(q)] = torch.tensor(q)
                mask[b, :len(q)] = 1
                lp = len(p_ids[i])
                for j, t in enumerate(t_ids[i]):  # position lp-1+j predicts target token j
                    rows.append(b)
                    cols.append(lp - 1 + j)
                    gold.append(t)
            model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=False, logits_to_keep=1)
            h = captured.pop("h")
            logits = ad.unembed(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).float()
            logp = logits.log_softmax(-1)
            g = torch.tensor(gold, device=dev)
            tok_nll = -logp[torch.arange(len(gold), device=dev), g]
            am = logits.argmax(-1)
            k = 0
            for i in idx:
                m = len(t_ids[i])
                nll[i] = float(tok_nll[k:k + m].mean())
                a = am[k:k + m].tolist()
                arg[i] = a
                ref = compare_to[i] if compare_to is not None else t_ids[i]
                acc[i] = sum(int(u == v) for u, v in zip(a, ref)) / m
                k += m
    finally:
        hook.remove()
    return PairScores(nll, acc, arg, t_ids)
