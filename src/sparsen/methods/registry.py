"""Method registry: a method is one module with a config dataclass and a ``calibrate`` function, plus one line here.

``calibrate(lm, config)`` is the one entry point: it checks the config against the model, reads the calibration
windows and returns a ``Plan``. A method's function has the signature
``(lm, sparsity, wins, config, progress) -> (sites, calibrated sparsity[, extras])``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsen.core.plan import Plan
from sparsen.data import corpus_windows
from sparsen.errors import SparsenError, UnreachableSparsity
from sparsen.methods.config import ConfigFieldError, MethodConfig
from sparsen.methods.tuning import tune_plan


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config: type[MethodConfig]
    calibrate: Callable  # (lm, sparsity, wins, config, progress) -> (sites, calibrated sparsity[, extras])
    rotation: bool = False  # folds a rotation of the residual stream into the weights


def _methods() -> dict[str, Method]:
    from sparsen.methods import cats, chess, moefy, rotation, rsparse, stat_topk, teal, topk, wina

    return {m.name: m for m in (teal.METHOD, cats.METHOD, chess.METHOD, wina.METHOD, stat_topk.METHOD, topk.METHOD,
                                rsparse.METHOD, rotation.METHOD, rotation.METHOD_WEIGHTED, rotation.METHOD_TOPK,
                                moefy.METHOD)}


def method_names() -> list[str]:
    return list(_methods())


def get_method(name: str) -> Method:
    methods = _methods()
    if name not in methods:
        raise SparsenError(f"unknown method '{name}': choose one of {', '.join(methods)}")
    return methods[name]


def config_for(method: str, **fields) -> MethodConfig:
    """The config of ``method`` with ``fields`` (None values take the field's default), e.g.
    ``config_for("teal", sparsity=0.5, allocation="greedy")``."""
    cls = get_method(method).config
    return cls(**{k: v for k, v in fields.items() if v is not None})


def untuned_fields(config: MethodConfig) -> dict:
    """The config's fields with the tuning's at their defaults: what its plan is before the tuning step."""
    return {**config.fields(), **{f.name: f.default for f in dataclasses.fields(config) if f.name.startswith("tune_")}}


def calibrate(lm, config: MethodConfig, progress: bool = True, untuned: Plan | None = None) -> Plan:
    """Calibrate the method of ``config`` on ``lm`` and return the plan (the model is not changed). ``untuned``: this
    config's plan without its tuning, calibrated already on ``lm`` (a copy of it is tuned: calibration is skipped)."""
    if not isinstance(config, MethodConfig):
        raise ConfigFieldError(f"calibrate takes a method config such as sparsen.TealConfig(sparsity=0.5), not "
                               f"{type(config).__name__}")
    if untuned is not None:
        if untuned.config != untuned_fields(config) or untuned.fingerprint != lm.fingerprint:
            raise SparsenError("the untuned plan given was not calibrated with this config on this model")
        plan = copy.deepcopy(untuned)
        plan.config = config.fields()
        if config.tune_steps:
            tune_plan(lm, plan, config, progress)
        return plan
    m = get_method(config.method)
    if m.rotation and lm.adapter.rotation_refusal:
        raise SparsenError(f"method '{m.name}' cannot apply to {lm.config.model_type}: {lm.adapter.rotation_refusal}")
    if getattr(lm, "transform_key", None) is not None:
        raise SparsenError("this model carries a plan's weight transform: calibrate on a freshly loaded model")
    wins = None
    if config.needs_calibration:
        n = max(1, config.tokens // config.ctx)
        wins = corpus_windows(lm.tokenizer, config.corpus, min(config.ctx, config.tokens), n, bos=lm.window_bos)
    sites, calibrated, *extras = m.calibrate(lm, config.sparsity, wins, config, progress)
    extras = extras[0] if extras else {}
    plan = Plan(
        transform=extras.get("transform"),
        tensors=extras.get("tensors", {}),
        method=m.name,
        target_sparsity=config.sparsity,
        model=lm.spec,
        fingerprint=lm.fingerprint,
        sites=sites,
        params={"allocation": config.allocation,
                **({"segments": config.segments, "basis": config.basis} if m.rotation else {}),
                **extras.get("params", {})},
        calibration={"corpus": config.corpus, "tokens": int(wins.numel()) if wins is not None else 0,
                     "ctx": config.ctx} if config.needs_calibration else {},
        calibrated_sparsity=calibrated,
        config=config.fields(),
    )
    if config.hold == "prompt" and wins is not None:
        measure_prompt_scales(lm, plan, wins, progress)
    if config.tune_steps:
        tune_plan(lm, plan, config, progress)
    return plan


@torch.no_grad()
def measure_prompt_scales(lm, plan: Plan, wins, progress: bool = True) -> None:
    """For a 'prompt'-hold plan: each held site's prompt scale on the calibration text (the median over windows of
    the scale the first half of a window asks for), stored in its entry as ``prompt_scale``. At run time a prompt's
    scale divided by this one rescales the thresholds, so that text like the calibration text keeps them as
    calibrated and other text moves them by how much its inputs differ (prompt positions differ from later ones)."""
    target = lm
    if plan.transform is not None:
        target = lm.copy()
        plan.transform_(target)
    for entry in plan.sites.values():
        entry.pop("prompt_scale", None)
    sp = plan.build_sparsifier(target, hold_reference=False)
    per_site: dict[str, list[float]] = {s: [] for s in sp.holds}
    for w in tqdm(wins, desc="prompt scales", unit="win", disable=not progress, leave=False):
        with sp.observing():
            target.model(w[None, : max(1, w.numel() // 2)])
        for site, c in sp.scales.items():
            per_site[site].append(c)
    for site, cs in per_site.items():
        if cs:
            plan.sites[site]["prompt_scale"] = float(np.median(cs))


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
