"""Sparsity plans: the artefact that flows between `calibrate`, `eval`, `generate` and `bench`.

A plan is a JSON file: the method, its config and parameters, the target and calibration-measured sparsity,
the model's fingerprint, and one rule entry per site (``layers.3.q``; kinds in ``core/rules.py``). Tensors
(per-channel thresholds, low-rank factors, a transform's bases) live in a safetensors file beside the JSON.
A plan may name registered weight transforms (``core/transforms.py``), applied in order (a rotation, then weights
tuned on the rotated model). A plan refuses to apply to another model.

Applying a plan is explicit: ``plan.transform_(lm)`` changes lm's weights (if the plan has a transform),
``plan.build_sparsifier(lm)`` only builds the hooks (and refuses a model that lacks the plan's transform);
``sparsen.sparsify_`` does both and attaches the hooks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparsen.core.attention import attention_rules
from sparsen.core.hooks import Sparsifier
from sparsen.core.rules import ExpertRule, GateActRule, check_sparsity, rule_from_entry
from sparsen.core.transforms import applied_key, get_transform
from sparsen.errors import SparsenError
from sparsen.io import write_json

PLAN_FORMAT = "sparsen-plan/1"


@dataclass
class Plan:
    method: str
    target_sparsity: float
    model: str
    fingerprint: str
    sites: dict[str, dict]
    params: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    calibrated_sparsity: float | None = None
    transform: str | list[str] | None = None
    """the registered weight transform(s) the plan needs, applied in order (e.g. 'residual_rotation', or
    ['residual_rotation', 'tuned_weights']); their tensors live beside the plan"""
    tensors_file: str | None = None
    format: str = PLAN_FORMAT
    config: dict | None = None
    """the method's config fields as calibrated (``sparsen.config_for(method, **config)`` rebuilds it)"""
    attention: dict | None = None
    """a key-selection method on the full-attention layers: {"method": name, "config": {...}} (its tensors, e.g.
    Double Sparsity's channel scores, are ``attn.*`` keys of the plan's tensors); composes with the linear rules"""
    tensors: dict = field(default_factory=dict, repr=False)
    """in memory only: the plan's tensors (saved as safetensors next to the JSON)"""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        d = asdict(self)
        d.pop("tensors")
        for key in ("config", "attention"):
            if d[key] is None:
                d.pop(key)
        if self.tensors:
            from sparsen.io import save_safetensors

            tensor_path = path.with_name(path.stem + ".safetensors")
            save_safetensors(tensor_path, self.tensors, metadata={"fingerprint": self.fingerprint})
            d["tensors_file"] = self.tensors_file = tensor_path.name
        return write_json(path, d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise SparsenError(f"plan file '{path}' not found: create one with `sparsen calibrate ... --out {path}`")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {d.get('format')!r}")
            plan = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "tensors"})
            if not isinstance(plan.sites, dict) or not (plan.sites or plan.attention):
                raise ValueError("no sites")
            if plan.attention is not None and not (isinstance(plan.attention, dict) and "method" in plan.attention):
                raise ValueError("attention entry without a method")
            check_sparsity(plan.target_sparsity)
            if plan.tensors_file:
                tensor_path = path.with_name(plan.tensors_file)
                if not tensor_path.is_file():
                    raise SparsenError(f"plan '{path}' needs '{tensor_path}', which is missing: keep the .safetensors "
                                       "file beside the plan, or recalibrate")
                from safetensors import SafetensorError
                from safetensors.torch import load_file

                try:
                    plan.tensors = load_file(str(tensor_path))
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{tensor_path.name}: {e}") from None
            if plan.transform is not None and not (isinstance(plan.transform, str) or (
                    isinstance(plan.transform, list) and plan.transform and all(isinstance(t, str) for t in plan.transform))):
                raise ValueError(f"transform {plan.transform!r}")
            for name in plan.transforms:
                get_transform(name).validate(plan.tensors)
            for site, entry in plan.sites.items():
                rule = rule_from_entry(entry, plan.tensors)
                if isinstance(rule, (GateActRule, ExpertRule)) and not site.endswith(".down"):
                    raise ValueError(f"{entry['rule']} rule on {site}: it belongs on a down site")
        except SparsenError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SparsenError(f"plan file '{path}' is corrupt ({e}): recreate it with `sparsen calibrate`") from None
        return plan

    def check_model(self, lm) -> None:
        if self.fingerprint != lm.fingerprint:
            raise SparsenError(f"this plan was made for model '{self.model}' (fingerprint {self.fingerprint}), not for "
                               f"'{lm.spec}' ({lm.fingerprint}): calibrate a plan for this model")

    # --- applying -------------------------------------------------------------------------------
    @property
    def transforms(self) -> list[str]:
        """The plan's weight transforms, in the order they apply (none: [])."""
        if self.transform is None:
            return []
        return [self.transform] if isinstance(self.transform, str) else list(self.transform)

    def add_transform(self, name: str, tensors: dict) -> None:
        """Append a transform (applied after the plan's others) with its tensors."""
        self.transform = name if self.transform is None else [*self.transforms, name]
        self.tensors.update(tensors)

    def transform_tensors(self) -> dict:
        """The tensors of the plan's transforms (the rest are thresholds and low-rank factors)."""
        keys = {k for name in self.transforms for k in get_transform(name).tensor_keys}
        return {k: v for k, v in self.tensors.items() if k in keys}

    def carried_by(self, lm) -> bool:
        """Whether ``lm`` already carries this plan's transform (always, for a plan without one)."""
        return self.transform is None or getattr(lm, "transform_key", None) == applied_key(self.transform_tensors())

    def transform_(self, lm) -> None:
        """Apply the plan's weight transforms to ``lm`` in place (once; nothing to do without a transform)."""
        self.check_model(lm)
        if self.transform is None or self.carried_by(lm):
            return
        if getattr(lm, "transform_key", None) is not None:
            raise SparsenError("this model already carries another plan's transform: load the model again")
        for name in self.transforms:  # every check before any weight changes
            get_transform(name).check_model(lm, self.tensors)
        for name in self.transforms:
            get_transform(name).apply_(lm, self.tensors)
        lm.transform_key = applied_key(self.transform_tensors())

    def build_sparsifier(self, lm, dense_prefix: int = 0, hold_reference: bool = True) -> Sparsifier:
        """The hooks that apply this plan's rules to ``lm`` (not attached; the model is not changed).
        ``hold_reference=False`` (for calibration only): a 'prompt'-hold plan's sites measured against scale 1."""
        self.check_model(lm)
        if not self.carried_by(lm):
            raise SparsenError(f"this {self.method} plan transforms the model's weights: apply it with "
                               "sparsen.sparsify_(lm, plan) (or plan.transform_(lm)) first")
        rules = {}
        for site, entry in self.sites.items():
            rule = rule_from_entry(entry, self.tensors)
            if rule is not None:
                rules[site] = rule
        if self.attention is not None:
            rules.update(attention_rules(self.attention, lm.adapter, self.tensors))
        added = sum(get_transform(name).added_params(lm, self.tensors) for name in self.transforms)
        holds = None
        if self.hold == "prompt":
            holds = {site: (float(e["target"]), float(e.get("prompt_scale", 1.0)) if hold_reference else 1.0)
                     for site, e in self.sites.items() if site in rules and "target" in e}
        try:
            return Sparsifier(lm.adapter, rules, dense_prefix=dense_prefix, added_params=added, holds=holds,
                              attention_config=(self.attention or {}).get("config"))
        except KeyError as e:
            raise SparsenError(f"plan names sites this model does not have ({e}): calibrate a plan for it") from None
        except ValueError as e:
            raise SparsenError(f"the plan's {e}: recalibrate") from None

    @property
    def hold(self) -> str:
        """How the thresholds meet new text at run time (the config's ``hold``; plans before it: 'calibrated')."""
        return (self.config or {}).get("hold", "calibrated")

    def residual_changes(self) -> dict:
        """layer -> R: the changes of basis of the residual stream the plan's transforms need (for the engine)."""
        changes = {}
        for name in self.transforms:
            for layer, R in get_transform(name).residual_changes(self.tensors).items():
                changes[layer] = changes[layer] @ R if layer in changes else R
        return changes
