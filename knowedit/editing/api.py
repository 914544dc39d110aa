"""``edit()``: one entry point for every editor, with requests and hyperparameters validated first."""
from __future__ import annotations

import inspect

import torch

from ..errors import KnoweditError
from .hparams import editor_kwargs, editor_module, load_hparams, normalise_method
from .masking import check_mask_handle, check_mode
from .request import read_requests
from .sequence import EditSequence


def editor(method: str):
    """The ``apply_*`` function of a method: ``(handle, requests, hparams, mask=None, mode=...) -> Edit``."""
    method = normalise_method(method)
    if method == "ft-l":
        from .finetune import apply_ft_l
        return apply_ft_l
    if method == "ft-m":
        from .finetune import apply_ft_m
        return apply_ft_m
    return getattr(editor_module(method), f"apply_{method}")


def edit(handle, requests, method: str = "rome", hparams=None, mask=None, mode: str = "restrict", seed: int = 0,
         sequential: bool = False, state: dict | None = None):
    """Edit ``handle``'s model in place and return the applied edit.

    ``requests``: dicts in the CounterFact/EasyEdit or ROME format, or :class:`EditRequest` s.
    ``hparams``: None, a dict or a YAML/JSON path (EasyEdit's files included), merged over
    ``editors/<method>/<model>.yaml`` and the method defaults. ``mask``/``mode``: see
    :mod:`knowedit.editing.masking`. Batched by default (one :class:`Edit` for all requests);
    ``sequential=True`` edits one request at a time and returns an :class:`EditSequence`.

    ``state``: a dict the caller keeps across calls in a lifelong run (the model carrying every earlier
    edit). Editors that remember earlier edits (AlphaEdit: the keys of the edits made so far) read and
    update it; it holds tensors and plain values only, so ``torch.save`` checkpoints it. It is
    updated only when the edit succeeds.

    Atomic: on any error nothing stays changed (earlier edits of a sequence are undone).
    """
    method = normalise_method(method)
    reqs = read_requests(requests)
    hp = load_hparams(method, handle, hparams)
    check_mode(mode, mask)
    check_mask_handle(mask, handle)
    fn = editor(method)
    kw = editor_kwargs(hp)
    note = {"hparams": kw, "hparams_notes": hp["_notes"], "hparams_sources": hp["_sources"], "seed": seed,
            "mask": None if mask is None else {**mask.meta, **mask.density()}}

    # only editors that remember earlier edits take the lifelong state
    extra = {"state": state} if state is not None and "state" in inspect.signature(fn).parameters else {}

    def one(batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            e = fn(handle, batch, dict(kw), mask=mask, mode=mode, **extra)
        e.info.update(note, cases=[r.case_id if r.case_id is not None else r.subject for r in batch])
        return e

    if not sequential:
        return one(reqs)
    done = []
    try:
        for r in reqs:
            done.append(one([r]))
    except BaseException:
        for e in reversed(done):
            e.undo()
        raise
    return EditSequence(done)


def warm_caches(handle, method: str, hparams=None) -> None:
    """Compute now, from the weights as they are, what an editor otherwise computes from the model on
    first use: the sampled context prefixes, the key statistics of its layers and the preserved tasks'
    keys. A resumed lifelong run calls this on the original weights before loading its checkpoint, so
    the continued run uses exactly what an uninterrupted one did."""
    from .covariance import key_stats
    from .keys_values import prefix_groups
    from .preserve import preserve_settings, task_key_moments

    method = normalise_method(method)
    hp = editor_kwargs(load_hparams(method, handle, hparams))
    if method in ("ft-l", "ft-m"):
        from .finetune import layer_params
        params = dict(handle.model.named_parameters())
        names = [n for n in layer_params(handle, hp) if params[n].dim() == 2]
    else:
        prefix_groups(handle, hp)
        layers = hp.get("layers")
        if not isinstance(layers, list):   # 'auto': chosen per batch from a trace
            return
        key_stats(handle, layers, hp)
        names = [handle.adapter.name_of(handle.adapter.mlp_out(l).weight) for l in layers]
    pres = preserve_settings(hp)
    if pres:
        task_key_moments(handle, {n: handle.model.get_submodule(n.rsplit(".", 1)[0]) for n in names}, pres)


__all__ = ["edit", "editor", "warm_caches"]
