"""ModelHandle: a Hugging Face causal LM, its tokenizer and its architecture adapter."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from ..errors import KnoweditError
from . import components as C
from .adapters import Adapter, adapter_for
from .bos import bos_prefix, uses_bos
from .fingerprint import weight_fingerprint


@dataclass
class Batch:
    """Right-padded token ids. ``last`` is the index of each prompt's final real token, so a
    causal model's activations at real positions are unaffected by the padding."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        return self.lengths - 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_ids(cls, seqs, pad_id: int, device=None) -> "Batch":
        """Right-pad token id lists into one batch."""
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        lengths = torch.tensor([len(s) for s in seqs])
        return cls(input_ids.to(device), mask.to(device), lengths.to(device))


class ModelHandle:
    def __init__(self, model, tokenizer, name: str, source: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or name
        self.adapter: Adapter = adapter_for(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def __repr__(self) -> str:
        a = self.adapter
        return (f"ModelHandle({self.name!r}, {a.family}, layers={a.n_layers}, heads={a.n_heads}, "
                f"kv_heads={a.n_kv_heads}, d_model={a.d_model})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    @cached_property
    def fingerprint(self) -> str:
        """Fingerprint of the weights as loaded; circuits found on this model record it."""
        return weight_fingerprint(self.model)

    def current_fingerprint(self) -> str:
        return weight_fingerprint(self.model)

    # ---- components -------------------------------------------------------------------------
    def component(self, name: str | C.Component | C.Edge) -> C.Component | C.Edge:
        return C.validate(name, self.adapter.n_layers, self.adapter.n_heads, self.adapter.d_mlp)

    def components(self, names: Sequence[str | C.Component]) -> list[C.Component]:
        out = []
        for n in names:
            c = self.component(n)
            if isinstance(c, C.Edge):
                raise KnoweditError(f"{c.name!r} is an edge; a node name (head or MLP) is needed here")
            out.append(c)
        return out

    def all_heads(self) -> list[C.Component]:
        return C.all_heads(self.adapter.n_layers, self.adapter.n_heads)

    def all_mlps(self) -> list[C.Component]:
        return C.all_mlps(self.adapter.n_layers)

    # ---- tokens -----------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], bos: bool | None = None) -> Batch:
        """Prompts as token ids, after the model's BOS token when ``bos`` (None: the model's
        convention, see :mod:`knowedit.models.bos`); task positions count in this tokenization."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise KnoweditError("prompts: the list is empty; pass at least one prompt")
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for i, (p, t) in enumerate(zip(prompts, ids)):
            if not t:
                raise KnoweditError(f"prompts[{i}]: {p!r} tokenises to nothing; pass non-empty text")
        head = bos_prefix(self.tokenizer, bos)
        return Batch.from_ids([head + t for t in ids], self.tokenizer.pad_token_id, self.device)

    def uses_bos(self, bos: bool | None = None) -> bool:
        """Whether prompts tokenized with ``bos`` start with a BOS token (recorded in results)."""
        return uses_bos(self.tokenizer, bos)

    def token_id(self, text: str, field: str = "token") -> int:
        """The id of ``text`` if it is exactly one token, else an error naming the field."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise KnoweditError(
                f"{field}: {text!r} is {len(ids)} tokens for this tokenizer {ids}; a single token is needed"
            )
        return ids[0]

    def to_str_tokens(self, text: str, bos: bool | None = None) -> list[str]:
        """Token strings at the positions :meth:`tokenize` gives them (the BOS included)."""
        ids = bos_prefix(self.tokenizer, bos) + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode([i]) for i in ids]

    # ---- running ----------------------------------------------------------------------------
    def forward(self, batch: Batch, **kwargs) -> torch.Tensor:
        """Logits ``[B, T, vocab]``."""
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False, **kwargs).logits

    def last_logits(self, batch: Batch, **kwargs) -> torch.Tensor:
        """Logits at each prompt's last real token, ``[B, vocab]``.

        Only the distinct last positions go through the unembedding: for a 49k vocabulary the
        full ``[B, T, vocab]`` projection would cost as much as the rest of a small model."""
        keep = torch.unique(batch.last)
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                            logits_to_keep=keep, **kwargs).logits
        col = torch.searchsorted(keep, batch.last)
        return logits[torch.arange(len(batch), device=logits.device), col]

    @torch.no_grad()
    def next_token_probs(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.last_logits(self.tokenize(prompts)).softmax(-1)

    def save_pretrained(self, path) -> None:
        """Write the (possibly edited) model and tokenizer so plain transformers can load them."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
