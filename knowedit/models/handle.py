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
from .placement import input_device
from .weights import state_dict_with_values


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
    def __init__(self, model, tokenizer, name: str, source: str | None = None, checkpoint=None):
        """``checkpoint``: the local directory the weights were read from, which lets a model loaded in a
        lower precision than its files keep the files' fingerprint (see :attr:`fingerprint`)."""
        self.model = model.eval()
        self.checkpoint = checkpoint
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
        """Where token ids go in (the input embedding's device when the model is spread by a device map)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored and run in."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device_map(self) -> dict | None:
        """accelerate's placement of the modules, when the model was loaded with a device map."""
        return getattr(self.model, "hf_device_map", None)

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    @cached_property
    def fingerprint(self) -> str:
        """The model's identity: the fingerprint of its weights as its checkpoint stores them. Circuits,
        sampled corpora and run records carry it, so a float32 checkpoint loaded in bfloat16 is still the
        same model (statistics, which do depend on the dtype, are kept apart by dtype)."""
        from .fingerprint import checkpoint_fingerprint, stored_in_other_dtype
        if self.checkpoint is not None and stored_in_other_dtype(self.model, self.checkpoint):
            fp = checkpoint_fingerprint(self.model, self.checkpoint)
            if fp is not None:
                return fp
        return self.loaded_fingerprint

    @cached_property
    def loaded_fingerprint(self) -> str:
        """Fingerprint of the weights as loaded, in the dtype they run in."""
        return weight_fingerprint(self.model)

    def current_fingerprint(self) -> str:
        """Fingerprint of the weights now (differs from :attr:`loaded_fingerprint` once edited)."""
        return weight_fingerprint(self.model)

    def is_unedited(self) -> bool:
        """Whether the weights are still exactly those loaded."""
        return self.current_fingerprint() == self.loaded_fingerprint

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
        # float32 whatever the model's dtype: bfloat16 probabilities keep three significant digits
        return self.last_logits(self.tokenize(prompts)).float().softmax(-1)

    def save_pretrained(self, path) -> None:
        """Write the (possibly edited) model and tokenizer so plain transformers can load them; weights
        that accelerate keeps offloaded are read from its CPU or disk offload map."""
        state = state_dict_with_values(self.model)
        self.model.save_pretrained(path, **({} if state is None else {"state_dict": state}))
        self.tokenizer.save_pretrained(path)
