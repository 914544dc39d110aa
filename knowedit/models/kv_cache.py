"""The key/value-cache argument of a Hugging Face forward, under either of its names.

transformers 5 renamed ``past_key_values`` to ``cache``; the old name still works but warns, and goes
in 5.40. knowedit supports transformers >= 5.0, where only the old name exists.
"""
from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_name(model_class) -> str:
    # once per class: generation loops call cache_kwargs every token
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name ``model.forward`` takes."""
    return {_cache_name(type(model)): cache}


def cache_of(output):
    """The cache a forward returned."""
    c = getattr(output, "cache", None)
    return c if c is not None else output.past_key_values
