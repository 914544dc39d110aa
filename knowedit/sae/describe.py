"""What a latent means, without asking a language model: the contexts where it fires most over a
corpus (cached), the tokens its decoder direction promotes and suppresses through the unembedding,
and a one-line description made from both.

* ``top_contexts``: one pass over the corpus, stopped at the SAE's site; every latent keeps its
  ``top`` largest activations (value, sequence, position). The table is cached under
  ``cache_root()/sae_contexts/`` keyed by the SAE's weights, the model's fingerprint and the corpus's
  token ids, so the pass runs once per SAE and corpus.
* ``logit_effects``: the decoder row through the final norm's weight (centred first when the final
  norm is a LayerNorm) and the unembedding: a direct effect, blind to the layers above the site.
* ``describe``: "fires on ' Mary', ' John' (after ' and'); promotes ' Mary'; suppresses ' the'"."""
from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import KnoweditError
from ..hooks.hookset import HookSet
from ..models.cache import atomic_write_bytes, cache_root
from ..models.handle import Batch
from .sae import SAE


def _value(adapter, module, what: str = "weight"):
    # adapters that know about offloaded weights read them through ``value``
    return adapter.value(module, what) if hasattr(adapter, "value") else getattr(module, what, None)


def sae_digest(sae: SAE) -> str:
    h = hashlib.sha256()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "pre_scale", "W_skip"):
        t = getattr(sae, name)
        if t is not None:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(f"{sae.activation}{sae.k}{sae.b_dec_to_input}{sae.normalize}{sae.kind}{sae.skip_first}".encode())
    return h.hexdigest()[:16]


def _ids_digest(ids: list[list[int]]) -> str:
    h = hashlib.sha256()
    for row in ids:
        h.update(torch.tensor(row, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


@dataclass
class ContextTable:
    """Each latent's largest activations: ``values [top, width]`` (descending), and where they are."""
    values: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    ids: list[list[int]]
    n_tokens: int

    def of(self, i: int) -> list[tuple[float, int, int]]:
        return [(float(v), int(s), int(p)) for v, s, p in zip(self.values[:, i], self.seq[:, i], self.pos[:, i])
                if v > 0]


class _Done(Exception):
    pass


@torch.no_grad()
def _scan(handle, sae: SAE, ids: list[list[int]], top: int, batch_size: int) -> ContextTable:
    a = handle.adapter
    module = a.block(sae.site.layer) if sae.site.kind == "r" else a.mlp(sae.site.layer)
    width = sae.width
    vals = torch.zeros(top, width)
    seq = torch.zeros(top, width, dtype=torch.long)
    pos = torch.zeros(top, width, dtype=torch.long)
    cur = {}

    def grab(mod, args, kwargs, out):
        x = out[0] if isinstance(out, tuple) else out
        x_in = (args[0] if args else next(iter(kwargs.values()))) if sae.kind == "transcoder" else x
        cur["acts"] = sae.encode(x_in).cpu()
        raise _Done   # nothing above the site is needed

    pad = handle.tokenizer.pad_token_id
    n_tok = 0
    with HookSet() as hs:
        hs._handles.append(module.register_forward_hook(grab, with_kwargs=True))
        for start in range(0, len(ids), batch_size):
            rows = ids[start:start + batch_size]
            b = Batch.from_ids(rows, pad, handle.device)
            try:
                handle.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            except _Done:
                pass
            acts = cur.pop("acts").masked_fill(~b.attention_mask.bool().cpu().unsqueeze(-1), 0)
            if sae.skip_first:
                acts[:, 0] = 0   # the attention sink, as in a splice
            B, T, _ = acts.shape
            n_tok += int(b.attention_mask.sum())
            flat = acts.reshape(B * T, width)
            k = min(top, B * T)
            v, where = flat.topk(k, dim=0)                          # [k, width]
            s = where // T + start
            p = where % T
            allv, alls, allp = torch.cat([vals, v]), torch.cat([seq, s]), torch.cat([pos, p])
            keep = allv.topk(top, dim=0).indices
            vals, seq, pos = allv.gather(0, keep), alls.gather(0, keep), allp.gather(0, keep)
    return ContextTable(vals, seq, pos, ids, n_tok)


def top_contexts(handle, sae: SAE, ids: list[list[int]], top: int = 10, batch_size: int = 16,
                 cache: bool = True) -> ContextTable:
    """Every latent's ``top`` largest activations over the token sequences ``ids`` (cached)."""
    if not ids or not any(ids):
        raise KnoweditError("top_contexts: the corpus is empty; give token-id sequences to scan")
    from .load import check_against
    check_against(sae, handle)
    path = (cache_root() / "sae_contexts" / handle.fingerprint /
            f"{sae_digest(sae)}-{_ids_digest(ids)}-top{top}.pt")
    if cache and path.exists():
        blob = torch.load(path, weights_only=True)
        return ContextTable(blob["values"], blob["seq"], blob["pos"], ids, int(blob["n_tokens"]))
    table = _scan(handle, sae, ids, top, batch_size)
    if cache:
        buf = io.BytesIO()
        torch.save({"values": table.values, "seq": table.seq, "pos": table.pos, "n_tokens": table.n_tokens}, buf)
        atomic_write_bytes(path, buf.getvalue())
    return table


def logit_effects(handle, sae: SAE, i: int, top: int = 5) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The tokens latent ``i``'s decoder direction promotes and suppresses most (direct path)."""
    sae.check_index(i)
    a = handle.adapter
    d = sae.W_dec[i].float()
    ln = a.ln_final
    if isinstance(ln, torch.nn.LayerNorm):
        d = d - d.mean()
    w = _value(a, ln)
    if w is not None:
        d = d * w.detach().float().cpu()
    u = _value(a, a.unembed).detach().float().cpu()
    logit = u @ d
    tok = handle.tokenizer
    up, down = logit.topk(top), (-logit).topk(top)
    return ([(tok.decode([int(t)]), float(v)) for v, t in zip(up.values, up.indices)],
            [(tok.decode([int(t)]), float(-v)) for v, t in zip(down.values, down.indices)])


def context_strings(handle, table: ContextTable, i: int, window: int = 8, limit: int = 5) -> list[tuple[float, str]]:
    """Latent ``i``'s top contexts as text: ``window`` tokens before the firing token, which is marked
    with ⟦ ⟧."""
    tok = handle.tokenizer
    out = []
    for v, s, p in table.of(i)[:limit]:
        row = table.ids[s]
        left = tok.decode(row[max(0, p - window):p])
        out.append((v, f"{left}⟦{tok.decode([row[p]])}⟧"))
    return out


def _quoted(items: list[str], n: int = 3) -> str:
    return ", ".join(repr(t) for t in items[:n])


def describe(handle, sae: SAE, i: int, table: ContextTable | None = None) -> str:
    """A one-line description of latent ``i`` from its top contexts (when a table is given) and its
    logit effects."""
    up, down = logit_effects(handle, sae, i)
    parts = []
    if table is not None:
        hits = table.of(i)
        if hits:
            tok = handle.tokenizer
            firing = Counter(tok.decode([table.ids[s][p]]) for _, s, p in hits)
            before = Counter(tok.decode([table.ids[s][p - 1]]) for _, s, p in hits if p > 0)
            part = f"fires on {_quoted([t for t, _ in firing.most_common()])}"
            common = [t for t, c in before.most_common() if c >= max(2, len(hits) // 3)]
            if common:
                part += f" (after {_quoted(common, 2)})"
            parts.append(part)
        else:
            parts.append(f"silent on the {table.n_tokens} corpus tokens")
    parts.append(f"promotes {_quoted([t for t, _ in up])}")
    parts.append(f"suppresses {_quoted([t for t, _ in down])}")
    return "; ".join(parts)
