"""Generation and ROME's fluency measure.

ROME's fluency (Meng et al. 2022) is the n-gram entropy of generated text: for n = 2 and 3, the
Shannon entropy (bits) of the n-gram frequency distribution of the text's words, weighted by 2/3
and 4/3 and averaged. ROME splits words with NLTK's tokenizer; NLTK is not a dependency here, so a
regular expression splits words and punctuation, which agrees with it on plain prose."""
from __future__ import annotations

import math
import re
from collections import Counter

import torch

from ..models.kv_cache import cache_kwargs, cache_of

_WORD = re.compile(r"\w+|[^\w\s]")
NS, WEIGHTS = (2, 3), (2 / 3, 4 / 3)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(text: str, ns=NS, weights=WEIGHTS) -> float:
    toks = words(text)
    vals = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        vals.append(w * h)
    return sum(vals) / len(vals)


def mean_ngram_entropy(texts) -> float | None:
    texts = list(texts)
    return sum(ngram_entropy(t) for t in texts) / len(texts) if texts else None


@torch.no_grad()
def generate(handle, prompts: list[str], max_new_tokens: int = 100, top_k: int = 5, seed: int = 0) -> list[str]:
    """Top-k sampled continuations (ROME samples with top-k 5), seeded, batched with left padding."""
    tok = handle.tokenizer
    ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
    T = max(len(i) for i in ids)
    pad = tok.pad_token_id
    x = torch.tensor([[pad] * (T - len(i)) + i for i in ids], device=handle.device)
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids], device=handle.device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    out, past = [], None
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cur_ids, cur_pos = x, pos
    for _ in range(max_new_tokens):
        res = handle.model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos, use_cache=True,
                           **cache_kwargs(handle.model, past))
        past = cache_of(res)
        logits = res.logits[:, -1].float()
        top = logits.topk(top_k, dim=-1)
        probs = top.values.softmax(-1).cpu()
        choice = torch.multinomial(probs, 1, generator=g).to(logits.device)
        nxt = top.indices.gather(1, choice)
        out.append(nxt)
        cur_ids = nxt
        cur_pos = cur_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    gen = torch.cat(out, dim=1).tolist()
    return [tok.decode(g_) for g_ in gen]
