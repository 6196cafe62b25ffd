"""Input sparsity applied to a torch model through forward pre-hooks on its block linears.

A *rule* per linear site turns the linear's input ``x [..., in]`` into the sparsified input the
linear should see. Positions before ``dense_prefix`` are left dense: with one forward pass over a
window, that reproduces exactly "dense prompt, sparse continuation" (a token's own computation is
what the mask touches, and its KV entries are computed in its own pass).

The runtime counts, per site, how many input entries it zeroed on the sparse positions: that is
the achieved sparsity, and weighted by each linear's parameter count it is the share of block
weight bytes a kernel could skip.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

import torch


class InputRule(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the sparsified input (same shape); zeros mark skipped channels."""


class ThresholdRule:
    """Keep x_i where |x_i| > t (t a scalar or a per-channel vector): TEAL-style magnitude sparsity."""

    def __init__(self, threshold: float | torch.Tensor):
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.abs() > self.threshold)


class TopKRule:
    """Keep each token's largest-|x| entries, zeroing the share ``sparsity`` of them (exact per-token top-k)."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = int(round(self.sparsity * x.shape[-1]))
        if k <= 0:
            return x
        drop = x.abs().topk(k, dim=-1, largest=False).indices
        return x.scatter(-1, drop, 0.0)


class GateActRule:
    """CATS / CHESS: the MLP intermediate's mask comes from the gate activation a = silu(gate(x)).

    Channel j is active iff |a_j| > t (t a scalar or a per-channel vector). An inactive channel's
    intermediate silu(g_j) * up_j is 0, so a kernel computes gate densely, then only the active
    rows of up, and reads only the active inputs of down. Installed on a block's ``down`` site; it
    acts on gate's *output* (zeroing g_j gives silu(0) = 0).
    """

    def __init__(self, threshold: float | torch.Tensor):
        self.threshold = threshold

    def keep(self, g: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(g).abs() > self.threshold


class LowRankCompensated:
    """R-Sparse (Zhang et al., ICLR 2025): a rule's dropped inputs still reach the output, through a rank-r
    approximation of the weight: y = W (x * m) + B A (x * (1 - m)), with A [r, in] and B [out, r] from the
    top-r SVD of W. The rule masks as ``base`` does; the sparsifier adds the low-rank term to the linear's
    output. Per token it reads r * (in + out) weights more (charged against the sparsity)."""

    def __init__(self, base, A: torch.Tensor, B: torch.Tensor):
        self.base, self.A, self.B = base, A, B

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    @property
    def added_params(self) -> int:
        return self.A.numel() + self.B.numel()


class InputSparsifier:
    """Installs rules on a model's block linears; use as a context manager or call attach()/detach()."""

    def __init__(self, adapter, rules: dict[str, Callable[[torch.Tensor], torch.Tensor]], dense_prefix: int = 0):
        self.adapter = adapter
        self.rules = dict(rules)
        self.dense_prefix = dense_prefix
        self.enabled = True
        self._handles: list = []
        self._modules = {site: mod for site, _, _, mod in adapter.linear_sites()}
        unknown = set(self.rules) - set(self._modules)
        if unknown:
            raise KeyError(f"unknown linear sites: {sorted(unknown)[:3]}")
        for site, rule in self.rules.items():
            if isinstance(rule, GateActRule) and not site.endswith(".down"):
                raise KeyError(f"a gate-activation rule belongs on a 'down' site, not {site}")
            mod = self._modules[site]
            if isinstance(rule, LowRankCompensated) and (rule.A.shape[1], rule.B.shape[0]) != (mod.in_features,
                                                                                              mod.out_features):
                raise ValueError(f"low-rank term for {site} does not fit its linear's shapes")
        self.params = {site: self._modules[site].weight.numel() for site in self._modules}
        # weights read per token beyond the block linears (charged against the sparsity): low-rank terms here,
        # a change of basis added by the plan
        self.added_params = sum(r.added_params for r in self.rules.values() if isinstance(r, LowRankCompensated))
        self._dropped: dict[str, torch.Tensor] = {}
        self.reset_stats()

    # --- stats -------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.zeros = {site: 0 for site in self._modules}
        self.entries = {site: 0 for site in self._modules}

    def achieved(self) -> dict:
        """Achieved sparsity on the tokens seen since reset: per site, per layer, per linear name, overall.

        Sites without a rule count as dense (0). Overall = parameter-weighted over all block linears, less
        the weights a method adds per token (``added_params``, e.g. a change of basis), as a share of them:
        the *effective* sparsity. ``skipped`` is the same before that charge.
        """
        per_site = {s: (self.zeros[s] / self.entries[s] if self.entries[s] else 0.0) for s in self._modules}
        total = sum(self.params.values())
        skipped = sum(per_site[s] * self.params[s] for s in per_site) / total
        overall = skipped - self.added_params / total
        per_layer: dict[int, float] = {}
        per_name: dict[str, float] = {}
        for _site, layer, name, _ in self.adapter.linear_sites():
            per_layer.setdefault(layer, 0.0)
            per_name.setdefault(name, 0.0)
        for kind, table in (("layer", per_layer), ("name", per_name)):
            weights: dict = {}
            for site, layer, name, _ in self.adapter.linear_sites():
                key = layer if kind == "layer" else name
                table[key] += per_site[site] * self.params[site]
                weights[key] = weights.get(key, 0) + self.params[site]
            for key in table:
                table[key] /= weights[key]
        return {"overall": overall, "skipped": skipped, "added_share": self.added_params / total,
                "per_layer": [per_layer[i] for i in sorted(per_layer)],
                "per_linear": per_name, "per_site": per_site}

    # --- hooks -------------------------------------------------------------------------------
    def _hook(self, site: str, rule):
        def pre_hook(module, args):
            if not self.enabled:
                return None
            x = args[0]
            p = self.dense_prefix
            if p <= 0:
                xs = rule(x)
                self.zeros[site] += int((xs == 0).sum())
                self.entries[site] += xs.numel()
            else:
                if x.shape[-2] <= p:
                    return None
                tail = rule(x[..., p:, :])
                self.zeros[site] += int((tail == 0).sum())
                self.entries[site] += tail.numel()
                xs = torch.cat([x[..., :p, :], tail], dim=-2)
            if isinstance(rule, LowRankCompensated):
                self._dropped[site] = x - xs
            return (xs,) + tuple(args[1:])

        return pre_hook

    def _lowrank_hook(self, site: str, rule: LowRankCompensated):
        """Forward hook: add B A (dropped inputs) to the output (the pre-hook left the dropped part here)."""
        def hook(module, args, y):
            dropped = self._dropped.pop(site, None)
            if dropped is None or not self.enabled:
                return None
            return y + (dropped @ rule.A.to(dropped.dtype).T) @ rule.B.to(dropped.dtype).T

        return hook

    def _gate_hook(self, down_site: str, rule: GateActRule):
        """Forward hook on gate: zero g_j of inactive channels; counts up's skipped rows and down's skipped inputs."""
        up_site = down_site[: -len("down")] + "up"

        def hook(module, args, g):
            if not self.enabled:
                return None
            p = self.dense_prefix
            if p > 0 and g.shape[-2] <= p:
                return None
            tail = g[..., p:, :] if p > 0 else g
            keep = rule.keep(tail)
            skipped, n = int((~keep).sum()), keep.numel()
            for site in (up_site, down_site):
                self.zeros[site] += skipped
                self.entries[site] += n
            tail = tail * keep
            return torch.cat([g[..., :p, :], tail], dim=-2) if p > 0 else tail

        return hook

    def attach(self) -> "InputSparsifier":
        if not self._handles:
            for site, rule in self.rules.items():
                if isinstance(rule, GateActRule):
                    gate = self._modules[site[: -len("down")] + "gate"]
                    self._handles.append(gate.register_forward_hook(self._gate_hook(site, rule)))
                else:
                    self._handles.append(self._modules[site].register_forward_pre_hook(self._hook(site, rule)))
                    if isinstance(rule, LowRankCompensated):
                        self._handles.append(self._modules[site].register_forward_hook(self._lowrank_hook(site, rule)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._dropped.clear()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    @contextmanager
    def disabled(self):
        """Temporarily run the dense model (for the KL reference) without removing the hooks."""
        prev = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = prev
