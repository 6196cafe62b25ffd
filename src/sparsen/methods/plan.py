"""Sparsity plans: the artefact that flows between `calibrate`, `eval` (and later `generate`, `bench`).

A plan is a JSON file: the method and its parameters, the target and calibration-measured sparsity,
the model's fingerprint, and one rule per block linear (``layers.3.q``), one of:

- ``{"rule": "dense"}``: no mask;
- ``{"rule": "threshold", "threshold": t}``: keep x_i where |x_i| > t (TEAL);
- ``{"rule": "channel_threshold", "tensor": KEY}``: keep x_i where |x_i| > t_i, t = tensors[KEY] (WINA, CHESS);
- ``{"rule": "topk", "sparsity": s}``: zero each token's round(s * n) smallest |x_i|;
- ``{"rule": "gaussian_topk", "sparsity": s}``: keep |x_i| > rms(x) * Phi^-1((1 + s) / 2);
- ``{"rule": "gate_act", "threshold": t}`` or ``{..., "tensor": KEY}``, on a ``down`` site only
  (CATS, CHESS): MLP channel j is active iff |silu(gate(x))_j| > t_j; inactive channels skip up's
  row j and down's input j (the ``up`` site stays dense on its input).

A ``threshold`` or ``channel_threshold`` entry may also carry ``"lowrank": KEY`` (R-Sparse): the dropped
inputs reach the output through tensors[KEY + ".B"] @ tensors[KEY + ".A"] ([out, r] @ [r, in]).

Tensors (per-channel thresholds, a rotation) live in a safetensors file beside the JSON. A plan
refuses to apply to another model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sparsen.errors import SparsenError
from sparsen.io import write_json
from sparsen.methods.runtime import GateActRule, InputSparsifier, LowRankCompensated, ThresholdRule, TopKRule

PLAN_FORMAT = "sparsen-plan/1"


def check_sparsity(s: float) -> float:
    if not isinstance(s, (int, float)) or math.isnan(s) or not 0.0 <= s < 1.0:
        raise SparsenError(f"sparsity {s} is outside [0, 1): pass a share of inputs to skip, e.g. --sparsity 0.5")
    return float(s)


class GaussianTopKRule:
    """Statistical top-k (Spark Transformer, Gemma 3n): no sort, no calibration.

    Treats a token's entries as zero-mean Gaussian with std = rms(x) and keeps |x| above the
    quantile that leaves the share ``sparsity`` out: t = rms * Phi^-1((1 + s) / 2). Exact only when the
    entries are Gaussian; heavy-tailed inputs come out sparser than asked.
    """

    def __init__(self, sparsity: float):
        self.sparsity = sparsity
        self.z = float(torch.special.ndtri(torch.tensor((1.0 + sparsity) / 2.0, dtype=torch.float64)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsity <= 0:
            return x
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return x * (x.abs() > self.z * rms)


def _entry_threshold(entry: dict, tensors: dict):
    """A site entry's threshold: a number, or a per-channel vector named by ``tensor`` in the plan's tensors."""
    if "tensor" in entry:
        key = entry["tensor"]
        if key not in tensors or tensors[key].dim() != 1:
            raise ValueError(f"site threshold vector '{key}' is missing from the plan's tensors")
        return tensors[key]
    return float(entry["threshold"])


def rule_from_entry(entry: dict, tensors: dict | None = None):
    """The runtime rule of one plan site entry (see the module docstring for the kinds)."""
    tensors = tensors or {}
    if "lowrank" in entry:
        if entry.get("rule") not in ("threshold", "channel_threshold"):
            raise ValueError(f"a low-rank term goes with a threshold rule, not {entry.get('rule')!r}")
        A, B = tensors.get(f"{entry['lowrank']}.A"), tensors.get(f"{entry['lowrank']}.B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"low-rank factors '{entry['lowrank']}' are missing from the plan's tensors or misshapen")
        return LowRankCompensated(rule_from_entry({k: v for k, v in entry.items() if k != "lowrank"}, tensors), A, B)
    kind = entry.get("rule")
    if kind == "threshold":
        return ThresholdRule(float(entry["threshold"]))
    if kind == "channel_threshold":
        return ThresholdRule(_entry_threshold(entry, tensors))
    if kind == "gate_act":
        return GateActRule(_entry_threshold(entry, tensors))
    if kind == "topk":
        return TopKRule(float(entry["sparsity"]))
    if kind == "gaussian_topk":
        return GaussianTopKRule(float(entry["sparsity"]))
    if kind == "dense":
        return None
    raise SparsenError(f"plan rule '{kind}' is unknown: the plan is corrupt or from a newer sparsen; recalibrate it")


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
    transform: str | None = None
    """a weight transform the plan needs (e.g. 'residual_rotation'); its tensors live beside the plan"""
    tensors_file: str | None = None
    format: str = PLAN_FORMAT
    tensors: dict = field(default_factory=dict, repr=False)
    """in memory only: the transform's tensors (saved as safetensors next to the JSON)"""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        d = asdict(self)
        d.pop("tensors")
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
            plan = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
            if not isinstance(plan.sites, dict) or not plan.sites:
                raise ValueError("no sites")
            check_sparsity(plan.target_sparsity)
            if plan.transform is not None and plan.transform != "residual_rotation":
                raise ValueError(f"unknown transform {plan.transform!r}")
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
            if plan.transform is not None and ("Q" not in plan.tensors or plan.tensors["Q"].dim() not in (2, 3)):
                raise ValueError("the plan's rotation Q is missing from its tensors")
            for site, entry in plan.sites.items():
                rule = rule_from_entry(entry, plan.tensors)
                if isinstance(rule, GateActRule) and not site.endswith(".down"):
                    raise ValueError(f"gate_act rule on {site}: it belongs on a down site")
        except SparsenError:
            raise
        except (ValueError, TypeError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SparsenError(f"plan file '{path}' is corrupt ({e}): recreate it with `sparsen calibrate`") from None
        return plan

    def check_model(self, lm) -> None:
        if self.fingerprint != lm.fingerprint:
            raise SparsenError(f"this plan was made for model '{self.model}' (fingerprint {self.fingerprint}), not for "
                               f"'{lm.spec}' ({lm.fingerprint}): calibrate a plan for this model")

    def sparsifier(self, lm, dense_prefix: int = 0) -> InputSparsifier:
        """The hooks that apply this plan to ``lm`` (checked against the model's fingerprint)."""
        self.check_model(lm)
        if self.transform == "residual_rotation":
            from sparsen.methods.rotation import apply_transform, head_groups

            _, n_kv, hd = head_groups(lm)
            if self.tensors["Q"].shape[-1] != lm.adapter.hidden_size or (
                    "Qo" in self.tensors and tuple(self.tensors["Qo"].shape) != (lm.adapter.n_layers, n_kv, hd, hd)):
                raise SparsenError("the plan's rotation does not fit this model's shapes: recalibrate")
            apply_transform(lm, self.tensors)
        rules = {}
        for site, entry in self.sites.items():
            rule = rule_from_entry(entry, self.tensors)
            if rule is not None:
                rules[site] = rule
        try:
            sp = InputSparsifier(lm.adapter, rules, dense_prefix=dense_prefix)
        except KeyError as e:
            raise SparsenError(f"plan names linears this model does not have ({e}): calibrate a plan for it") from None
        except ValueError as e:
            raise SparsenError(f"the plan's {e}: recalibrate") from None
        if self.transform == "residual_rotation":
            from sparsen.methods.rotation import basis_changes

            sp.added_params += basis_changes(self.tensors) * lm.adapter.hidden_size ** 2
        return sp
