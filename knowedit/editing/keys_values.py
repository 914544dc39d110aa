"""What ROME and MEMIT share: prefix contexts, keys at the subject's last token, and the
optimisation of the residual change δ that makes the model say the new target (its loop, for one
request or a batch of them, is in :mod:`.batched_values`).

Prefix contexts follow the reference generator: texts sampled from the model itself with top-5
sampling (seeded, so the same seed gives the same prefixes), each followed by ". " and the prompt,
plus the bare prompt. ``context_template_length_params`` lists ``[length, count]`` pairs; as in ROME's
``max_out_len``, ``length`` counts the start word's tokens too, and the ``count`` prefixes of one
length cycle through the start words. ROME uses [[5, 10], [10, 10]]; MEMIT [[10, 5]].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KnoweditError
from ..models.handle import Batch
from ..hooks.hookset import HookSet
from .fields import field
from .request import EditRequest

_PREFIX_STARTS = ["The", "Therefore", "Because", "I", "You"]
_PREFIX_TOP_K = 5   # the reference generator's sampling
_prefix_cache: dict[tuple, list[list[str]]] = {}


def prefix_groups(handle, hp: dict) -> list[list[str]]:
    """``[[""], prefixes of the first length, ...]``: one group per context type, cached per model and
    settings. ``""`` is the bare prompt."""
    spec = field(hp, "context_template_length_params", list)
    seed = int(hp.get("seed", 0) or 0)
    pairs = []
    for x in spec:
        if not (isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) and v >= 0 for v in x)):
            raise KnoweditError(f"hparams: field 'context_template_length_params' holds {x!r}; "
                                "give [length, count] pairs, e.g. [[5, 10], [10, 10]]")
        pairs.append(tuple(x))
    # the dtype too: a bfloat16 copy samples other prefixes than a float32 model of the same weights
    key = (handle.fingerprint, handle.dtype, tuple(pairs), seed)
    if key not in _prefix_cache:
        from .sampling import sample_ids
        groups = [[""]]
        for j, (length, count) in enumerate(pairs):
            if length == 0 or count == 0:
                continue
            starts = [_PREFIX_STARTS[i % len(_PREFIX_STARTS)] for i in range(count)]
            group = []
            for ids in sample_ids(handle, starts, length, seed=seed + j, top_k=_PREFIX_TOP_K, total=True):
                text = handle.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(text.replace("{", " ").replace("}", " ").strip() + ". ")
            groups.append(group)
        _prefix_cache[key] = groups
    return _prefix_cache[key]


def prefixes(handle, hp: dict) -> list[str]:
    """``""`` (the bare prompt) followed by the sampled prefixes."""
    return [c for g in prefix_groups(handle, hp) for c in g]


def context_weights(groups: list[list[str]], per_type: bool) -> torch.Tensor:
    """Weights of the context rows in a key average, float64. ROME averages all rows alike; MEMIT
    averages within each context type and then across types, so the bare prompt weighs 1/(types)."""
    if not per_type:
        n = sum(len(g) for g in groups)
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    return torch.cat([torch.full((len(g),), 1.0 / (len(g) * len(groups)), dtype=torch.float64) for g in groups])


@dataclass
class Rows:
    """Right-padded token rows for one request: prefix + prompt (+ target), plus KL rows."""

    input_ids: torch.Tensor     # [B, T]
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor   # [B] index of the subject's last token
    n_context: int              # the first n_context rows are the prefixed prompts
    target_pos: list[list[int]]  # per context row, positions predicting each target token
    target_ids: list[int]


def _subject_last(tok, text: str, end: int, where: str) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding character ``end - 1``."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    head = tok(text[:end], add_special_tokens=False)["input_ids"]
    if head and ids[:len(head)] == head:
        return ids, len(head) - 1
    for i in range(1, len(ids) + 1):  # the subject's end merged into a longer token
        if len(tok.decode(ids[:i])) >= end:
            return ids, i - 1
    raise KnoweditError(f"{where}: cannot locate the subject in {text!r}")


def build_rows(handle, req: EditRequest, contexts: list[str], with_target: bool = True,
               kl_prompts: list[str] = ()) -> Rows:
    tok = handle.tokenizer
    target = tok(" " + req.target_new, add_special_tokens=False)["input_ids"] if with_target else []
    if with_target and not target:
        raise KnoweditError(f"{req.label}: field 'target_new' tokenises to nothing")
    seqs, subj, tpos = [], [], []
    at = req.prompt.index("{}")
    for c in contexts:
        text = c + req.text
        ids, s = _subject_last(tok, text, len(c) + at + len(req.subject), req.label)
        tpos.append([len(ids) - 1 + j for j in range(len(target))])
        seqs.append(ids + target[:-1])
        subj.append(s)
    for kp in kl_prompts:
        text = kp.format(req.subject)
        ids, s = _subject_last(tok, text, kp.index("{}") + len(req.subject), req.label)
        seqs.append(ids)
        subj.append(s)
    dev = handle.device
    padded = Batch.from_ids(seqs, tok.pad_token_id, dev)
    return Rows(padded.input_ids, padded.attention_mask, torch.tensor(subj, device=dev), len(contexts), tpos, target)


def stack_rows(rows: list[Rows], pad_id: int, count=None) -> Rows:
    """The first ``count(r)`` rows (all by default) of each of several requests' rows as one
    right-padded batch, request by request, for reading activations: it has no targets, and
    ``n_context`` counts all its rows."""
    seqs, subj = [], []
    for r in rows:
        n = r.input_ids.shape[0] if count is None else count(r)
        seqs += [r.input_ids[i, :int(r.attention_mask[i].sum())].tolist() for i in range(n)]
        subj.append(r.subject_pos[:n])
    b = Batch.from_ids(seqs, pad_id, rows[0].input_ids.device)
    return Rows(b.input_ids, b.attention_mask, torch.cat(subj), len(seqs), [], [])


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _with(o, new):
    return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new


class _Read(Exception):
    """Raised once every requested activation is read: the layers above are not needed."""


@torch.no_grad()
def read_at_subject(handle, rows: Rows, key_layers: list[int] = (), site=None) -> tuple[dict, torch.Tensor | None]:
    """Down-projection inputs at the subject's last token for ``key_layers`` (``{layer: [B, d_mlp]}``)
    and the output of module ``site`` there (``[B, d_model]``), in one forward that stops as soon as
    they are read."""
    a = handle.adapter
    idx = torch.arange(len(rows.subject_pos), device=rows.subject_pos.device)
    keys, got = {}, {}

    def done():
        if len(keys) == len(set(key_layers)) and (site is None or "v" in got):
            raise _Read

    def key_hook(layer):
        def fn(mod, args):
            keys[layer] = args[0][idx, rows.subject_pos].double()
            done()
        return fn

    def site_hook(m, args, o):
        got["v"] = _out(o)[idx, rows.subject_pos].double()
        done()

    with HookSet() as hs:
        for l in key_layers:
            hs.pre(a.mlp_out(l), key_hook(l))
        if site is not None:
            hs.post(site, site_hook)
        try:
            handle.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False,
                         logits_to_keep=1)
        except _Read:
            pass
    return keys, got.get("v")


def optimise_delta(handle, req: EditRequest, rows: Rows, site, hp: dict,
                   v0: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """δ added to ``site``'s output at the subject's last token of every row of one request, and its
    info: :func:`~knowedit.editing.batched_values.optimise_deltas` for a batch of one (the loss is
    described there). ``v0``: the site output on the bare prompt, when already read."""
    from .batched_values import optimise_deltas   # it builds on this module

    deltas, infos = optimise_deltas(handle, [rows], site, hp, None if v0 is None else v0[None])
    return deltas[0], infos[0]
