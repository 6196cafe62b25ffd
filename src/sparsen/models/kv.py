"""A Hugging Face model's KV cache under either name: transformers 5 calls the forward's argument and its output's field
``cache`` and deprecates ``past_key_values`` (to be dropped in 5.40); 4.57 knows only ``past_key_values``."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_keyword(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``model``'s forward."""
    return {_cache_keyword(type(model)): cache}


def cache_of(out):
    """The KV cache a forward with ``use_cache=True`` returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
