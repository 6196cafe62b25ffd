"""Sites: the places sparsity applies, and how each kind is installed on a torch model and accounted.

A site has a name (``layers.3.q``), a kind and the module it hooks. The kinds: the input of a block linear, and
a full-attention layer's key selection (``layers.3.attn``, ``core/attention.py``); each kind has its own
installer (``core/hooks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch.nn as nn


class SiteKind(str, Enum):
    LINEAR_INPUT = "linear_input"
    """the input channels of a block linear: a skipped channel skips a row of W^T"""
    ATTENTION = "attention"
    """a full-attention layer's key selection: a skipped cached position skips its K and V rows"""


@dataclass(frozen=True)
class Site:
    name: str
    kind: SiteKind
    layer: int
    part: str
    """what the site is within its layer (a linear's name for LINEAR_INPUT)"""
    module: nn.Module
    params: int
    """weights the site governs (what accounting weighs its sparsity by)"""


SITE_ENUMERATORS: dict[SiteKind, Callable] = {}


def register_site_kind(kind: SiteKind):
    """Decorator: ``fn(adapter) -> {name: Site}`` lists a model's sites of this kind (a new kind registers one,
    and an installer in ``core/hooks.py``)."""
    def deco(fn):
        SITE_ENUMERATORS[kind] = fn
        return fn

    return deco


@register_site_kind(SiteKind.LINEAR_INPUT)
def linear_input_sites(adapter) -> dict[str, Site]:
    """Every block linear's input, in model order."""
    return {name: Site(name, SiteKind.LINEAR_INPUT, layer, lin, mod, mod.weight.numel())
            for name, layer, lin, mod in adapter.linear_sites()}


@register_site_kind(SiteKind.ATTENTION)
def attention_sites(adapter) -> dict[str, Site]:
    """Every full-attention layer (``layers.3.attn``); sliding-window layers are local already. No weights."""
    return {f"layers.{b.index}.attn": Site(f"layers.{b.index}.attn", SiteKind.ATTENTION, b.index, "attn", b.attn, 0)
            for b in adapter.blocks if b.sliding_window is None}


def model_sites(adapter) -> dict[str, Site]:
    """Every site of a model, of every registered kind."""
    out: dict[str, Site] = {}
    for enumerate_sites in SITE_ENUMERATORS.values():
        out.update(enumerate_sites(adapter))
    return out
