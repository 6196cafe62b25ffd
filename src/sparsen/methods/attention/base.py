"""What every attention method shares: its config's common fields and how a config becomes a plan entry.

A method is one file with a config dataclass (``@attention_config``), a ``KVSelector`` subclass (decode-time key
selection) or a ``BlockSelector`` subclass (block-sparse prefill, config ``PrefillConfig``) and a ``METHOD`` line
that ``__init__.py`` registers. Decode budgets are a fraction of the causal keys (``density``) or an absolute
number of keys (``tokens``); prefill budgets are a fraction of the causal blocks, or a mass threshold;
``dense_layers`` leaves the first layers dense (reported beside every result).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

from sparsen.methods.config import _check as check
from sparsen.methods.config import _number
from sparsen.methods.config import strict_config as attention_config


def _whole(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@attention_config
class AttentionConfig:
    """The fields every key-selection method takes."""

    method: ClassVar[str] = ""
    budgeted: ClassVar[bool] = True  # the method keeps a budget of keys (oracle-topp keeps a mass instead)
    kind: ClassVar[str] = "decode"  # 'decode': key selection per new query; 'prefill': block-sparse prompt attention

    density: float | None = 0.125
    """share of its causal keys each sparse query reads, in (0, 1] (ceil; at least one key)"""
    tokens: int | None = None
    """an absolute budget of keys instead of ``density`` (at most the query's causal keys)"""
    shared: bool = True
    """select per KV head, from scores summed over its group's query heads (one selection saves the KV reads of the
    whole group); False selects per query head (the faithful form of the per-head papers)"""
    dense_layers: int = 0
    """the first layers stay dense (Quest and Double Sparsity use 2; Sparse Frontier 0)"""

    def __post_init__(self):
        if self.budgeted:
            check(self.density is not None or self.tokens is not None, "give a budget: density or tokens")
            if self.tokens is not None:
                check(_whole(self.tokens, 1), f"tokens {self.tokens!r}: give a whole number of keys, 1 or more")
            else:
                check(_number(self.density) and 0 < self.density <= 1,
                      f"density {self.density!r} is outside (0, 1]: give the share of the context each query reads")
        check(isinstance(self.shared, bool), "shared: give True or False")
        check(_whole(self.dense_layers, 0), f"dense_layers {self.dense_layers!r}: give a whole number, 0 or more")

    def fields(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def budget(self) -> dict:
        """density and tokens as ``core.attention.budget_tokens`` takes them (tokens wins)"""
        return {"density": None if self.tokens is not None else self.density, "tokens": self.tokens}

    def label(self) -> str:
        """How results name this configuration, as ``parse_attention_spec`` reads it: the budget, then every field
        that differs from its default, e.g. 'quest@1/8', 'h2o@256t' or 'quest@1/16+dense_layers=2'."""
        # booleans as JSON (true/false), which is how parse_attention_spec reads a field back
        return self._budget_label() + "".join(f"+{k}={str(v).lower() if isinstance(v, bool) else v}"
                                              for k, v in self._changed().items())

    def _budget_label(self) -> str:
        if not self.budgeted:
            return self.method
        if self.tokens is not None:
            return f"{self.method}@{self.tokens}t"
        inv = 1 / self.density
        return f"{self.method}@1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{self.method}@{self.density:g}"

    def _changed(self, budget=("density", "tokens")) -> dict:
        """Fields (other than the budget's) whose value differs from the default."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in budget and getattr(self, f.name) != f.default}


@attention_config
class PrefillConfig(AttentionConfig):
    """The fields every block-sparse prefill method takes: a prompt's prefill computes, per query block, the key
    blocks the method keeps (the sink block and the diagonal always); decode steps after it are dense."""

    kind: ClassVar[str] = "prefill"
    mass_field: ClassVar[str] = ""  # methods that keep a mass instead of a budget: the threshold's field (tau, gamma)

    density: float | None = 0.125
    """budgeted methods: share of each query block's causal key blocks it computes, in (0, 1] (ceil; the forced
    blocks count in it, and are kept when they alone exceed it)"""
    block: int = 64
    """positions per block on both axes: the kernel's tile and the unit of selection (MInference 64, Sparse
    Frontier 16, XAttention and FlexPrefill 128: 64 keeps enough blocks per row at our lengths, 128 at 4K in 32)"""

    def __post_init__(self):
        check(self.tokens is None, f"tokens {self.tokens!r}: a prefill budget is a share of the causal blocks, e.g. "
                                   f"{self.method}@1/8, not a key count")
        if not self.budgeted:
            check(self.density is None, f"{self.method} keeps a share of the attention mass, not a density: give "
                                        f"{self.mass_field} instead, e.g. {self.method}@{self.mass_field}0.9")
        super().__post_init__()
        check(_whole(self.block, 1), f"block {self.block!r}: give a whole number of positions, 1 or more")

    def _budget_label(self) -> str:
        if self.budgeted:
            return super()._budget_label()
        return f"{self.method}@{self.mass_field}{getattr(self, self.mass_field):g}"

    def _changed(self, budget=("density", "tokens")) -> dict:
        return super()._changed(budget + ((self.mass_field,) if self.mass_field else ()))


@dataclass(frozen=True)
class AttentionMethod:
    name: str
    summary: str
    config: type[AttentionConfig]
    selector: Callable  # (config, layer, adapter, tensors) -> KVSelector or BlockSelector
    calibrate: Callable | None = None  # (lm, config, progress) -> tensors for the plan (Double Sparsity)
