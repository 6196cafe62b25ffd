"""The hooks that apply rules to a torch model's sites (forward hooks; nothing in the weights changes).

Positions before ``dense_prefix`` are left dense: with one forward pass over a window, that reproduces
exactly "dense prompt, sparse continuation" (a token's own computation is what the mask touches, and its
KV entries are computed in its own pass). The sparsifier counts, per site, the inputs it zeroed on the
sparse positions (``core/accounting.py``).

Installers are per site kind: a new kind registers one with ``register_installer`` and the existing
methods do not change.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

from sparsen.core.accounting import Tally, achieved
from sparsen.core.attention import AttnTally, BlockSelector, KVSelector, install
from sparsen.core.rules import ExpertRule, GateActRule, LowRankCompensated, ThresholdRule
from sparsen.core.sites import SiteKind, model_sites

INSTALLERS: dict[SiteKind, Callable] = {}


def register_installer(kind: SiteKind):
    """Decorator: ``fn(sparsifier, site, rule) -> [handles]`` installs ``rule`` on a site of this kind."""
    def deco(fn):
        INSTALLERS[kind] = fn
        return fn

    return deco


class Sparsifier:
    """Rules on a model's sites; use as a context manager or call attach()/detach().

    ``rules`` maps site names (``layers.3.q``) to rules (``core/rules.py``). ``added_params``: weights read per
    token beyond the sites' own (a change of basis, low-rank terms), charged against the sparsity."""

    def __init__(self, adapter, rules: dict[str, Callable], dense_prefix: int = 0, added_params: int = 0,
                 holds: dict[str, tuple[float, float]] | None = None, attention_config: dict | None = None):
        self.adapter = adapter
        self._attention_config = dict(attention_config or {})
        self.rules = dict(rules)
        self.dense_prefix = dense_prefix
        # Holding sparsity on the prompt (``holds``: site -> (calibrated level, the calibration text's prompt scale)):
        # a threshold rule is multiplied by the scale at which the dense prompt's own inputs reach the level, over
        # the calibration text's. With dense_prefix > 0 the prompt is the prefix of the same pass; otherwise a pass
        # under observing() measures it and the scales serve the passes that follow.
        self.holds = dict(holds or {})
        self.scales: dict[str, float] = {}
        self.observing_prompt = False
        self.enabled = True
        self._handles: list = []
        self._outer: list[bool] = []
        self.sites = model_sites(adapter)
        unknown = set(self.rules) - set(self.sites)
        if unknown:
            raise KeyError(f"unknown sites: {sorted(unknown)[:3]}")
        for name, rule in self.rules.items():
            attn_site = self.sites[name].kind is SiteKind.ATTENTION
            if attn_site != isinstance(rule, (KVSelector, BlockSelector)):
                raise KeyError(f"{name} takes {'a key selector' if attn_site else 'a linear rule'}")
            if isinstance(rule, (GateActRule, ExpertRule)) and not name.endswith(".down"):
                raise KeyError(f"a {'gate-activation' if isinstance(rule, GateActRule) else 'expert'} rule belongs on "
                               f"a 'down' site, not {name}")
            mod = self.sites[name].module
            if isinstance(rule, ExpertRule) and (rule.expert_of.numel() != mod.in_features or (
                    rule.router is not None and rule.router.shape[1] != adapter.hidden_size)):
                raise ValueError(f"experts for {name} ({rule.expert_of.numel()} channels, router input "
                                 f"{None if rule.router is None else rule.router.shape[1]}) do not fit its MLP "
                                 f"({mod.in_features} channels, hidden {adapter.hidden_size})")
            if isinstance(rule, LowRankCompensated) and (rule.A.shape[1], rule.B.shape[0]) != (mod.in_features,
                                                                                              mod.out_features):
                raise ValueError(f"low-rank term for {name} does not fit its linear's shapes")
        self.params = {name: site.params for name, site in self.sites.items()}
        self.added_params = added_params + sum(r.added_params for r in self.rules.values()
                                               if isinstance(r, (LowRankCompensated, ExpertRule)))
        self._dropped: dict[str, torch.Tensor] = {}
        self.reset_stats()

    # --- stats -------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.tally = Tally({s: 0 for s in self.sites}, {s: 0 for s in self.sites})
        self.attn_tally = AttnTally()

    @property
    def zeros(self) -> dict[str, int]:
        return self.tally.zeros

    @property
    def entries(self) -> dict[str, int]:
        return self.tally.entries

    def achieved(self) -> dict:
        """Achieved sparsity on the tokens seen since reset (``core/accounting.achieved``); with attention rules also
        ``attention``: the density of the keys read by decode selectors and, for prefill rules, ``prefill_density``
        and ``prefill_estimate_share`` (``core/attention.AttnTally.summary``)."""
        out = achieved(self.sites, self.tally, self.added_params)
        if self.attention_rules:
            n_attn = sum(s.kind is SiteKind.ATTENTION for s in self.sites.values())
            out["attention"] = self.attn_tally.summary(n_attn)
        return out

    @property
    def attention_config(self) -> dict:
        """The attention method's config fields as the plan records them ({} without one)."""
        return self._attention_config

    @property
    def attention_rules(self) -> dict[str, KVSelector | BlockSelector]:
        return {n: r for n, r in self.rules.items() if isinstance(r, (KVSelector, BlockSelector))}

    @property
    def prefill_rules(self) -> dict[str, BlockSelector]:
        """The block-sparse prefill rules (they act on a prompt's prefill only; later forwards are dense)."""
        return {n: r for n, r in self.rules.items() if isinstance(r, BlockSelector)}

    # --- hooks -------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "Sparsifier":
        if not self._handles:
            for name, rule in self.rules.items():
                site = self.sites[name]
                self._handles += INSTALLERS[site.kind](self, site, rule)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._dropped.clear()

    def __enter__(self):
        self._outer.append(self.attached)  # a sparsifier attached before the with-block stays attached after it
        return self.attach()

    def __exit__(self, *exc):
        if not self._outer.pop():
            self.detach()

    @contextmanager
    def observing(self):
        """A dense pass over a prompt that only measures it: every held site's scale is set from its inputs."""
        prev, self.observing_prompt = self.observing_prompt, True
        try:
            with self:
                yield
        finally:
            self.observing_prompt = prev

    @contextmanager
    def disabled(self):
        """Temporarily run the dense model (for the KL reference) without removing the hooks."""
        prev = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = prev


@register_installer(SiteKind.LINEAR_INPUT)
def install_linear_input(sp: Sparsifier, site, rule) -> list:
    """A pre-hook masks the linear's input; a gate-activation rule hooks gate's output instead; a low-rank term
    adds B A (dropped inputs) to the output in a forward hook."""
    if isinstance(rule, (GateActRule, ExpertRule)):
        gate = sp.adapter.blocks[site.layer].linears["gate"]
        hook = _gate_hook if isinstance(rule, GateActRule) else _expert_hook
        return [gate.register_forward_hook(hook(sp, site.name, rule))]
    handles = [site.module.register_forward_pre_hook(_input_hook(sp, site.name, rule))]
    if isinstance(rule, LowRankCompensated):
        handles.append(site.module.register_forward_hook(_lowrank_hook(sp, site.name, rule)))
    return handles


@register_installer(SiteKind.ATTENTION)
def install_attention(sp: Sparsifier, site, rule: KVSelector | BlockSelector) -> list:
    """The layer's attention runs through ``core/attention.attention_forward`` with this selector."""
    return [install(sp, sp.adapter, site.module, site.layer, selector=rule)]


def prompt_scale(rule: ThresholdRule, prompt: torch.Tensor, level: float) -> float:
    """c such that a share ``level`` of the prompt's entries have |x_i| <= c * t_i (the rule's thresholds t)."""
    t = torch.as_tensor(rule.threshold, dtype=torch.float32)
    a = prompt.detach().abs().float().reshape(-1, prompt.shape[-1])
    ratio = torch.where(t > 0, a / t.clamp_min(1e-30), torch.where(a > 0, torch.inf, 0.0)).reshape(-1)
    k = int(round(level * ratio.numel()))
    if k < 1 or not torch.isfinite(ratio).any():
        return 1.0
    c = float(torch.kthvalue(ratio, min(k, ratio.numel())).values)
    return c if math.isfinite(c) and c > 0 else 1.0


def _held(sp: Sparsifier, name: str, rule) -> bool:
    return name in sp.holds and type(rule) is ThresholdRule


def _hold_scale(sp: Sparsifier, name: str, rule, prompt: torch.Tensor) -> float:
    level, reference = sp.holds[name]
    return prompt_scale(rule, prompt, level) / reference


def _input_hook(sp: Sparsifier, name: str, rule):
    def pre_hook(module, args):
        if not sp.enabled:
            return None
        x = args[0]
        p = sp.dense_prefix
        held = _held(sp, name, rule)
        if sp.observing_prompt:
            if held:
                sp.scales[name] = _hold_scale(sp, name, rule, x)
            return None
        if p <= 0:
            r = ThresholdRule(rule.threshold * sp.scales[name]) if held and name in sp.scales else rule
            xs = r(x)
            sp.tally.add(name, int((xs == 0).sum()), xs.numel())
        else:
            if x.shape[-2] <= p:
                return None
            if held:
                sp.scales[name] = _hold_scale(sp, name, rule, x[..., :p, :])
                rule_now = ThresholdRule(rule.threshold * sp.scales[name])
            else:
                rule_now = rule
            tail = rule_now(x[..., p:, :])
            sp.tally.add(name, int((tail == 0).sum()), tail.numel())
            xs = torch.cat([x[..., :p, :], tail], dim=-2)
        if isinstance(rule, LowRankCompensated):
            sp._dropped[name] = x - xs
        return (xs,) + tuple(args[1:])

    return pre_hook


def _lowrank_hook(sp: Sparsifier, name: str, rule: LowRankCompensated):
    """Forward hook: add B A (dropped inputs) to the output (the pre-hook left the dropped part here)."""
    def hook(module, args, y):
        dropped = sp._dropped.pop(name, None)
        if dropped is None or not sp.enabled:
            return None
        return y + (dropped @ rule.A.to(dropped.dtype).T) @ rule.B.to(dropped.dtype).T

    return hook


def _gate_hook(sp: Sparsifier, down_site: str, rule: GateActRule):
    """Forward hook on gate: zero g_j of inactive channels; counts up's skipped rows and down's skipped inputs."""
    act = sp.adapter.activation
    return _gate_mask_hook(sp, down_site, ("up", "down"), lambda x, g: rule.keep(act(g)))


def _expert_hook(sp: Sparsifier, down_site: str, rule: ExpertRule):
    """Forward hook on gate: zero g_j outside the token's k experts; counts gate's and up's skipped rows and down's
    skipped inputs (a kernel reads all three only for the chosen experts)."""
    block = sp.adapter.blocks[int(down_site.split(".")[1])]
    act = sp.adapter.activation

    def scores(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if rule.router is not None:
            return rule.scores(x)
        up, down = block.linears["up"], block.linears["down"]  # the oracle: the dense MLP's intermediates
        return rule.oracle_scores(act(g) * torch.nn.functional.linear(x, up.weight, up.bias), down.weight)

    return _gate_mask_hook(sp, down_site, ("gate", "up", "down"), lambda x, g: rule.keep(scores(x, g)))


def _gate_mask_hook(sp: Sparsifier, down_site: str, counted: tuple[str, ...], keep_of):
    """A forward hook on a block's gate that zeroes g where ``keep_of(x, g)`` is False (x gate's input) on the positions
    past the dense prefix, counting the skipped channels on the block's ``counted`` linears."""
    prefix = down_site[: -len("down")]

    def hook(module, args, g):
        if not sp.enabled:
            return None
        p = sp.dense_prefix
        if p > 0 and g.shape[-2] <= p:
            return None
        tail, x = (g[..., p:, :], args[0][..., p:, :]) if p > 0 else (g, args[0])
        keep = keep_of(x, tail)
        skipped, n = int((~keep).sum()), keep.numel()
        for name in counted:
            sp.tally.add(prefix + name, skipped, n)
        tail = tail * keep
        return torch.cat([g[..., :p, :], tail], dim=-2) if p > 0 else tail

    return hook
