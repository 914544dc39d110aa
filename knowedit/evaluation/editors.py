"""Editors by name. Built-in names go to ``knowedit.editing.api.edit`` (imported only when used);
:func:`register_editor` adds others (a stand-in for tests, a new method under study).

An editor is ``fn(handle, requests, hparams=None, mask=None, mode="restrict", seed=0) -> Edit``
and returns the Edit already applied."""
from __future__ import annotations

from typing import Callable

from ..errors import KnoweditError

BUILTIN = ("rome", "memit", "ft-l", "ft-m")
_REGISTRY: dict[str, Callable] = {}


def register_editor(name: str, fn: Callable) -> None:
    _REGISTRY[name] = fn


def unregister_editor(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_editor(name: str) -> Callable:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN:
        try:
            from ..editing.api import edit
        except ImportError as e:
            raise KnoweditError(f"editor {name!r}: knowedit.editing.api is not available in this install ({e})") from None

        def run(handle, requests, hparams=None, mask=None, mode="restrict", seed=0):
            return edit(handle, requests, method=name, hparams=hparams, mask=mask, mode=mode, seed=seed)
        return run
    raise KnoweditError(f"editor {name!r} is unknown; use one of {sorted(set(BUILTIN) | set(_REGISTRY))}")
