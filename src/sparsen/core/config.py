"""Strict config dataclasses: frozen, documented fields, unknown fields and bad values refused in one line.

Shared by every layer that has configs (methods, sae, nn): one dataclass per technique, as torchao does it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from sparsen.errors import SparsenError


class ConfigFieldError(SparsenError, TypeError):
    """A config was given a field it does not have."""


class ConfigValueError(SparsenError, ValueError):
    """A config field has a value outside its range."""


def strict_config(cls, needs_sparsity: bool = False):
    """Class decorator: a frozen dataclass whose constructor refuses unknown fields (and, with ``needs_sparsity``,
    a missing target sparsity) with a one-line SparsenError."""
    cls = dataclass(frozen=True)(cls)
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise ConfigFieldError(f"{cls.__name__} has no field '{unknown[0]}': its fields are {', '.join(names)}")
        if needs_sparsity and "sparsity" not in kwargs and not args:
            raise ConfigFieldError(f"{cls.__name__} needs a target sparsity, e.g. {cls.__name__}(sparsity=0.5)")
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


def check(ok: bool, message: str) -> None:
    """Raise ConfigValueError(message) unless ``ok``."""
    if not ok:
        raise ConfigValueError(message)


def config_json(cfg) -> dict:
    """A config's fields as JSON values (tuples as lists)."""
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in dataclasses.fields(cfg)}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
