"""Method registry: a method is one module with a ``calibrate`` function, plus one line here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from sparsen.data import CALIB_CORPUS, corpus_windows
from sparsen.errors import SparsenError, UnreachableSparsity
from sparsen.methods.plan import Plan, check_sparsity


@dataclass(frozen=True)
class CalibrationConfig:
    """Where and how much a method calibrates."""

    corpus: str = CALIB_CORPUS
    """calibration text: a bundled corpus name or a UTF-8 file (never the evaluation corpus)"""
    tokens: int = 16384
    """calibration tokens (TEAL uses ~10 x 2048)"""
    ctx: int = 1024
    """window length of the calibration forward passes"""
    allocation: str = "uniform"
    """how sparsity is spread over the linears: 'uniform' (every linear at the target) or 'sensitivity'
    (per input group, greedy on measured KL per skipped byte; see methods/allocation.py)"""
    segments: int | None = None
    """rotation methods: runs of consecutive layers that get their own basis of the residual stream; each
    change of basis between runs costs a d x d product per token, charged against the sparsity
    (None: the method's default)"""
    basis: str | None = None
    """rotation methods: 'pca' (eigenbasis of the second moment) or 'sparse' (that basis refined so that
    per-token thresholding drops the least energy; see methods/rotation.py); None: the method's default"""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    calibrate: Callable  # (lm, sparsity, wins, config, progress) -> (sites, calibrated sparsity[, extras])
    needs_calibration: bool = True
    allocations: tuple = ("uniform",)
    segmented: bool = False  # takes CalibrationConfig.segments and .basis (the rotation methods)
    defaults: tuple = ()  # (field, value) pairs filled into a CalibrationConfig left at None


def _methods() -> dict[str, Method]:
    from sparsen.methods import cats, chess, rotation, rsparse, stat_topk, teal, topk, wina

    return {m.name: m for m in (teal.METHOD, cats.METHOD, chess.METHOD, wina.METHOD, stat_topk.METHOD, topk.METHOD,
                                rsparse.METHOD, rotation.METHOD, rotation.METHOD_WEIGHTED, rotation.METHOD_TOPK)}


def method_names() -> list[str]:
    return list(_methods())


def get_method(name: str) -> Method:
    methods = _methods()
    if name not in methods:
        raise SparsenError(f"unknown method '{name}': choose one of {', '.join(methods)}")
    return methods[name]


def calibrate(lm, method: str, sparsity: float, config: CalibrationConfig = CalibrationConfig(),
              progress: bool = True) -> Plan:
    """Calibrate ``method`` on ``lm`` for a model-wide ``sparsity`` and return the plan."""
    check_sparsity(sparsity)
    m = get_method(method)
    if config.allocation not in m.allocations:
        raise SparsenError(f"method '{method}' supports allocation {', '.join(m.allocations)}, not "
                           f"'{config.allocation}'")
    defaults = {"segments": 1, "basis": "pca", **dict(m.defaults)}
    config = replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
    if config.segments < 1 or (config.segments != 1 and not m.segmented):
        raise SparsenError(f"--segments {config.segments}: only the rotation methods take segments (1 or more)")
    if config.basis not in ("pca", "sparse") or (config.basis != "pca" and not m.segmented):
        raise SparsenError(f"--basis {config.basis}: use pca or sparse, and sparse only with a rotation method")
    wins = None
    if m.needs_calibration:
        n = max(1, config.tokens // config.ctx)
        wins = corpus_windows(lm.tokenizer, config.corpus, min(config.ctx, config.tokens), n)
    sites, calibrated, *extras = m.calibrate(lm, sparsity, wins, config, progress)
    extras = extras[0] if extras else {}
    return Plan(
        transform=extras.get("transform"),
        tensors=extras.get("tensors", {}),
        method=method,
        target_sparsity=sparsity,
        model=lm.spec,
        fingerprint=lm.fingerprint,
        sites=sites,
        params={"allocation": config.allocation,
                **({"segments": config.segments, "basis": config.basis} if m.segmented else {}),
                **extras.get("params", {})},
        calibration={"corpus": config.corpus, "tokens": int(wins.numel()) if wins is not None else 0,
                     "ctx": config.ctx} if m.needs_calibration else {},
        calibrated_sparsity=calibrated,
    )


MAX_LEVEL = 0.95  # no linear is asked to skip more than this share of its inputs


def level_for(lm, covered: list[str], target: float, method: str) -> float:
    """The uniform per-site level that makes the ``covered`` sites reach the model-wide ``target``.

    A method that sparsifies only some linears (CATS: up and down) must skip a larger share of
    those to reach a model-wide target; past MAX_LEVEL it cannot, and says so.
    """
    params = lm.adapter.linear_params()
    share = sum(params[s] for s in covered) / sum(params.values())
    level = target / share
    if level > MAX_LEVEL + 1e-9:
        raise UnreachableSparsity(f"method '{method}' sparsifies only {share:.1%} of the block weights, so it reaches at most "
                           f"{MAX_LEVEL * share:.2f} model-wide sparsity: ask for --sparsity {MAX_LEVEL * share:.2f} or less")
    return level


def weighted(lm, per_site: dict[str, float]) -> float:
    """Parameter-weighted model-wide sparsity of per-site sparsities (missing sites count as dense)."""
    params = lm.adapter.linear_params()
    return sum(per_site.get(s, 0.0) * p for s, p in params.items()) / sum(params.values())
