"""Probabilities of edit targets, for before/after tables."""
from __future__ import annotations

import torch

from ..models.handle import Batch


@torch.no_grad()
def sequence_probs(handle, prompts: list[str], targets: list[str], batch_size: int = 16) -> list[float]:
    """P(target | prompt) of the whole target (teacher-forced product over its tokens), with the target
    tokenised as ``" " + target`` separately from the prompt, as the editors train it."""
    tok, out = handle.tokenizer, []
    for s in range(0, len(prompts), batch_size):
        ps, ts = prompts[s:s + batch_size], targets[s:s + batch_size]
        pids = [tok(p, add_special_tokens=False)["input_ids"] for p in ps]
        tids = [tok(" " + t, add_special_tokens=False)["input_ids"] for t in ts]
        b = Batch.from_ids([p + t for p, t in zip(pids, tids)], tok.pad_token_id, handle.device)
        logp = handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                            use_cache=False).logits.float().log_softmax(-1)
        for i, (p, t) in enumerate(zip(pids, tids)):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=logp.device)
            out.append(float(logp[i, pos, torch.tensor(t, device=logp.device)].sum().exp()))
    return out
