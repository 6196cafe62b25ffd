"""Weight transforms a plan may carry (a rotation folded into the weights), by name.

A transform changes a model's weights in place so that it computes the same function in another basis; a plan
names it and stores its tensors. The core knows only this interface; the methods that make a transform register
it (``methods/rotation.py`` registers ``residual_rotation``), so this module names no method.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sparsen.errors import SparsenError


class Transform(Protocol):
    name: str

    def validate(self, tensors: dict) -> None:
        """Raise ValueError if the tensors are not this transform's (a corrupt plan)."""

    def check_model(self, lm, tensors: dict) -> None:
        """Raise SparsenError if the tensors do not fit this model's shapes or architecture."""

    def apply_(self, lm, tensors: dict) -> None:
        """Transform ``lm``'s weights in place."""

    def added_params(self, lm, tensors: dict) -> int:
        """Weights a token reads beyond the model's own under this transform (charged against sparsity)."""

    def residual_changes(self, tensors: dict) -> dict[int, torch.Tensor]:
        """Changes of basis of the residual stream at layer inputs: layer -> R [d, d] with h <- h R."""


TRANSFORMS: dict[str, Transform] = {}


def register_transform(transform: Transform) -> Transform:
    TRANSFORMS[transform.name] = transform
    return transform


def get_transform(name: str) -> Transform:
    if name not in TRANSFORMS:
        raise SparsenError(f"plan transform '{name}' is unknown: import sparsen (which registers the methods' "
                           "transforms) before loading the plan, or recalibrate it with this sparsen")
    return TRANSFORMS[name]


def applied_key(tensors: dict) -> int:
    """Identifies a transform's tensors: a model remembers which it carries, so a plan is applied once."""
    return hash(b"".join(t.detach().contiguous().numpy().tobytes() for _, t in sorted(tensors.items())))
