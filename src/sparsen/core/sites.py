"""Sites: the places sparsity applies, and how each kind is installed on a torch model and accounted.

A site has a name (``layers.3.q``), a kind and the module it hooks. Today's kind is the input of a block
linear; the attention issue adds a head's key selection and the MoE issue an MLP's experts, each as a new
``SiteKind`` with its own installer (``core/hooks.py``), leaving the linear-input methods untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch.nn as nn


class SiteKind(str, Enum):
    LINEAR_INPUT = "linear_input"
    """the input channels of a block linear: a skipped channel skips a row of W^T"""


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


def linear_input_sites(adapter) -> dict[str, Site]:
    """Every block linear's input, in model order."""
    return {name: Site(name, SiteKind.LINEAR_INPUT, layer, lin, mod, mod.weight.numel())
            for name, layer, lin, mod in adapter.linear_sites()}


def model_sites(adapter) -> dict[str, Site]:
    """Every site of a model, of every kind the core knows."""
    return linear_input_sites(adapter)
