"""``edit()``: one entry point for every editor, with requests and hyperparameters validated first."""
from __future__ import annotations

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
         sequential: bool = False):
    """Edit ``handle``'s model in place and return the applied edit.

    ``requests``: dicts in the CounterFact/EasyEdit or ROME format, or :class:`EditRequest` s.
    ``hparams``: None, a dict or a YAML/JSON path (EasyEdit's files included), merged over
    ``editors/<method>/<model>.yaml`` and the method defaults. ``mask``/``mode``: see
    :mod:`knowedit.editing.masking`. Batched by default (one :class:`Edit` for all requests);
    ``sequential=True`` edits one request at a time and returns an :class:`EditSequence`.

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

    def one(batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            e = fn(handle, batch, dict(kw), mask=mask, mode=mode)
        e.info.update(note, requests=[r.case_id if r.case_id is not None else r.subject for r in batch])
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


__all__ = ["edit", "editor"]
