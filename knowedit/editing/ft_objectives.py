"""Training batches and losses of the fine-tuning editors.

FT-L (``objective_optimization: prompt_last``, ROME's constrained fine-tuning baseline): the model
reads the prompt only; the loss is the mean NLL of the target's tokens at the *last prompt
position* (for a single-token target, plainly -log P(target | prompt)).

FT-M (``target_new``): the model reads prompt + target, teacher-forced; the loss is the mean
cross-entropy over the target tokens, prompt positions masked out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KnoweditError
from ..models.handle import Batch

OBJECTIVES = ("prompt_last", "target_new")


@dataclass
class FTBatch:
    input_ids: torch.Tensor       # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor            # [N] batch row of the logit that predicts each label
    cols: torch.Tensor            # [N] its position
    labels: torch.Tensor          # [N]
    owner: torch.Tensor           # [N] request index within the batch, to average per request


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def make_batch(handle, requests, objective: str, max_length: int) -> FTBatch:
    if objective not in OBJECTIVES:
        raise KnoweditError(f"objective_optimization: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    tok = handle.tokenizer
    seqs, pos, labels, owner = [], [], [], []
    for i, r in enumerate(requests):
        # Tokenised separately so the prompt/target boundary is exact (no merges across it).
        p, t = _ids(tok, r.text), _ids(tok, " " + r.target_new)
        if not t:
            raise KnoweditError(f"{r.label}: target_new {r.target_new!r} tokenises to nothing")
        seq = p + t if objective == "target_new" else p
        if len(seq) > max_length:  # keep the end: the target and the tokens next to it
            cut = len(seq) - max_length
            if cut >= len(p):
                raise KnoweditError(f"{r.label}: target_new is {len(t)} tokens, more than max_length={max_length}")
            seq, p = seq[cut:], p[cut:]
        seqs.append(seq)
        if objective == "target_new":
            pos += [(i, len(p) - 1 + j) for j in range(len(t))]
        else:
            pos += [(i, len(p) - 1)] * len(t)
        labels += t
        owner += [i] * len(t)
    dev = handle.device
    padded = Batch.from_ids(seqs, tok.pad_token_id, dev)
    rows, cols = torch.tensor([r for r, _ in pos]), torch.tensor([c for _, c in pos])
    return FTBatch(padded.input_ids, padded.attention_mask, rows.to(dev), cols.to(dev), torch.tensor(labels).to(dev),
                   torch.tensor(owner).to(dev))


def forward_kwargs(b: FTBatch) -> dict:
    """Model kwargs that unembed only the positions the loss reads (the 49k-vocabulary projection of
    every position would cost about as much as the rest of a small model)."""
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "use_cache": False,
            "logits_to_keep": torch.unique(b.cols)}


def batch_loss(logits: torch.Tensor, b: FTBatch) -> torch.Tensor:
    """``logits`` from :func:`forward_kwargs`. Mean over requests of the mean NLL of each request's target tokens."""
    keep = torch.unique(b.cols)
    lp = logits[b.rows, torch.searchsorted(keep, b.cols)].float().log_softmax(-1)
    nll = -lp.gather(1, b.labels[:, None])[:, 0]
    n = int(b.owner.max()) + 1
    per = torch.zeros(n, device=nll.device).index_add(0, b.owner, nll)
    cnt = torch.zeros(n, device=nll.device).index_add(0, b.owner, torch.ones_like(nll))
    return (per / cnt).mean()
