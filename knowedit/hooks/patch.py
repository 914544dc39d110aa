"""Activation patching: copy chosen components' activations from another run into this one."""
from __future__ import annotations

import contextlib
from typing import Iterable

from ..models.components import Component
from .record import Recording
from .replace import replace_activations


@contextlib.contextmanager
def patch(handle, source: Recording, components: Iterable[str | Component], positions=None):
    """Run with ``components`` taken from ``source`` (e.g. clean activations into a corrupt run).

    ``source`` must come from a batch of the same shape; ``positions`` restricts the patch
    (see :func:`knowedit.hooks.replace.replace_activations`)."""
    comps = handle.components(list(components))
    with replace_activations(handle, {c: source[c] for c in comps}, positions=positions):
        yield
