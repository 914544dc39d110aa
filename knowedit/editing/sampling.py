"""Seeded text sampling from the model itself (ROME's prefix contexts, offline covariance corpus)."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..models.kv_cache import cache_kwargs, cache_of


@torch.no_grad()
def sample_ids(handle, starts: list[str], n_tokens: int, seed: int, batch_size: int = 50,
               desc: str | None = None, top_k: int | None = None, total: bool = False) -> list[list[int]]:
    """Continue each start text by ``n_tokens`` sampled tokens (temperature 1, seeded), from the
    ``top_k`` most likely tokens when given. ``total=True`` counts the start's own tokens in
    ``n_tokens``, the length convention of ROME's prefix generator (``max_out_len``).

    Starts are grouped by token length so no batch needs padding; the sequence after the first
    end-of-text token is dropped. Returns token ids including the start."""
    from tqdm.auto import tqdm

    tok = handle.tokenizer
    eos = tok.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in starts]
    groups = defaultdict(list)
    for i, t in enumerate(ids):
        groups[len(t)].append(i)
    out: list[list[int] | None] = [None] * len(starts)
    chunks = [(idx[j:j + batch_size]) for _, idx in sorted(groups.items()) for j in range(0, len(idx), batch_size)]
    steps = [max(n_tokens - len(ids[c[0]]), 0) if total else n_tokens for c in chunks]
    bar = tqdm(total=sum(steps), desc=desc, disable=desc is None, leave=False)
    dev = handle.device
    for chunk, n_new in zip(chunks, steps):
        x = torch.tensor([ids[i] for i in chunk], device=dev)
        seq, past = x, None
        for _ in range(n_new):
            o = handle.model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(handle.model, past))
            past = cache_of(o)
            logits = o.logits[:, -1].float()
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            p = logits.softmax(-1).cpu()
            x = torch.multinomial(p, 1, generator=gen).to(dev)
            seq = torch.cat([seq, x], 1)
            bar.update(1)
        for i, row in zip(chunk, seq.tolist()):
            n0 = len(ids[i])
            cut = row[n0:].index(eos) + n0 if eos is not None and eos in row[n0:] else len(row)
            out[i] = row[:cut]
    bar.close()
    return out  # type: ignore[return-value]
