"""Training-free sparse attention: decode-time key selection and block-sparse prefill, one file per method,
registered here.

``attention_plan(lm, config)`` turns a method's config into a ``core.Plan`` whose ``attention`` entry the core
layer installs on every full-attention layer past ``dense_layers`` (``core/attention.py``). It composes with an
activation-sparsity plan: ``attention_plan(lm, config, base=plan)`` carries both. The prefill methods
(block-topk, xattention, vertical-slash, flexprefill; ``config.kind == 'prefill'``) act on a prompt's prefill only.
"""

from __future__ import annotations

import copy

from sparsen.core.attention import ATTENTION_METHODS
from sparsen.core.plan import Plan
from sparsen.errors import SparsenError
from sparsen.methods.attention import (
    block_topk,
    double_sparsity,
    flexprefill,
    h2o,
    oracle,
    quest,
    sink_window,
    sketch,
    vertical_slash,
    xattention,
)
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, PrefillConfig
from sparsen.methods.attention.block_topk import BlockTopKConfig
from sparsen.methods.attention.double_sparsity import DoubleSparsityConfig
from sparsen.methods.attention.flexprefill import FlexPrefillConfig
from sparsen.methods.attention.h2o import H2OConfig
from sparsen.methods.attention.oracle import OracleTopKConfig, OracleTopPConfig
from sparsen.methods.attention.quest import QuestConfig
from sparsen.methods.attention.sink_window import SinkWindowConfig
from sparsen.methods.attention.sketch import SketchConfig
from sparsen.methods.attention.vertical_slash import VerticalSlashConfig
from sparsen.methods.attention.xattention import XAttentionConfig

METHODS: dict[str, AttentionMethod] = {m.name: m for m in (
    oracle.METHOD_TOPK, oracle.METHOD_TOPP, sink_window.METHOD, h2o.METHOD, quest.METHOD, double_sparsity.METHOD,
    sketch.METHOD, block_topk.METHOD, xattention.METHOD, vertical_slash.METHOD, flexprefill.METHOD)}
PREFILL_MASS_BUDGETS = ("tau", "gamma")  # '@tau0.9', '@gamma0.9': a prefill method's mass threshold as its budget


def attention_method_names() -> list[str]:
    return list(METHODS)


def get_attention_method(name: str) -> AttentionMethod:
    if name not in METHODS:
        raise SparsenError(f"unknown attention method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


def attention_config_for(method: str, **fields) -> AttentionConfig:
    """The config of ``method`` with ``fields`` (None values take the default): a budget of ``tokens`` replaces the
    default density."""
    cls = get_attention_method(method).config
    fields = {k: v for k, v in fields.items() if v is not None}
    if "tokens" in fields and "density" not in fields:
        fields["density"] = None
    return cls(**fields)


def parse_attention_spec(spec: str) -> AttentionConfig:
    """'NAME[@BUDGET][+FIELD=VALUE...]' -> config. BUDGET: a density '1/8' or '0.125' (decode: of the causal keys;
    prefill: of the causal blocks), a key count '256t', a mass 'p0.9' (oracle-topp), or a prefill method's mass
    threshold 'tau0.9' (xattention) or 'gamma0.9' (flexprefill), e.g. 'quest@1/16+dense_layers=2', 'h2o@512t',
    'oracle-topp@p0.95', 'block-topk@1/8', 'xattention@tau0.9' (= 'xattention+tau=0.9')."""
    from sparsen.methods.config import parse_fields

    head, *opts = spec.strip().split("+")
    name, at, budget = head.partition("@")
    fields = parse_fields(opts, what=f"attention method '{spec}'")
    if at:
        try:
            mass = next((m for m in PREFILL_MASS_BUDGETS if budget.startswith(m)), None)
            if mass is not None:
                fields[mass] = float(budget[len(mass):])
            elif budget.startswith("p"):
                fields["p"] = float(budget[1:])
            elif budget.endswith("t"):
                fields["tokens"] = int(budget[:-1])
            elif "/" in budget:
                num, den = budget.split("/")
                fields["density"] = float(num) / float(den)
            else:
                fields["density"] = float(budget)
        except (ValueError, ZeroDivisionError):
            raise SparsenError(f"attention budget '{budget}' in '{spec}': write a density (1/8 or 0.125), a key count "
                               "(256t), a mass (p0.9) or a prefill threshold (tau0.9, gamma0.9)") from None
    return attention_config_for(name.strip(), **fields)


def build_selectors(spec: dict, adapter, tensors: dict) -> dict:
    """A plan's attention entry -> {site: selector} on the full-attention layers past ``dense_layers``."""
    m = get_attention_method(spec["method"])
    try:
        config = m.config(**spec.get("config", {}))
    except SparsenError as e:
        raise SparsenError(f"the plan's attention config is invalid ({e}): make the plan again") from None
    return {f"layers.{b.index}.attn": m.selector(config, b.index, adapter, tensors)
            for b in adapter.blocks if b.sliding_window is None and b.index >= config.dense_layers}


for _name in METHODS:
    ATTENTION_METHODS[_name] = build_selectors


def attention_plan(lm, config: AttentionConfig, base: Plan | None = None, progress: bool = True,
                   tensors: dict | None = None) -> Plan:
    """A plan carrying ``config``'s key selection (calibrated if the method needs it, unless ``tensors`` holds a
    calibration of the same method and fields), on top of ``base``'s rules."""
    if not isinstance(config, AttentionConfig):
        raise SparsenError(f"attention_plan takes an attention config such as QuestConfig(density=0.125), not "
                           f"{type(config).__name__}")
    m = get_attention_method(config.method)
    if tensors is None:
        tensors = m.calibrate(lm, config, progress) if m.calibrate is not None else {}
    spec = {"method": m.name, "config": config.fields()}
    if base is not None:
        base.check_model(lm)
        plan = copy.copy(base)
        plan.tensors = {**{k: v for k, v in base.tensors.items() if not k.startswith("attn.")}, **tensors}
        plan.attention = spec
        return plan
    return Plan(method=m.name, target_sparsity=0.0, model=lm.spec, fingerprint=lm.fingerprint, sites={},
                attention=spec, tensors=tensors)


__all__ = ["AttentionConfig", "BlockTopKConfig", "DoubleSparsityConfig", "FlexPrefillConfig", "H2OConfig",
           "OracleTopKConfig", "OracleTopPConfig", "PrefillConfig", "QuestConfig", "SinkWindowConfig", "SketchConfig",
           "VerticalSlashConfig", "XAttentionConfig", "attention_config_for", "attention_method_names", "attention_plan",
           "build_selectors", "get_attention_method", "parse_attention_spec"]
