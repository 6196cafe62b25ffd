"""A top-k mixture-of-experts MLP, drop-in for a Llama-family block's MLP: [..., d_model] -> [..., d_model].

Router: logits = W_r x; probabilities softmax(logits / temperature) (``gate="softmax"``, Mixtral / Qwen2-MoE at
temperature 1) or softmax(tanh(logits)) (``gate="activation"``: an activation before the softmax, the dense-to-sparse
gate of Nguyen et al.); the k most probable experts, their probabilities renormalised to sum to 1 when
``normalize_topk`` (Mixtral) or not (Qwen2-MoE). Experts are gated MLPs stored as Mixtral stores them
(``gate_up`` [E, 2 d_ff, d], ``down`` [E, d, d_ff]); an optional shared expert is added through a sigmoid gate
(Qwen2-MoE).

Dispatch: dropless (assignments sorted by expert, one product per expert hit) or, with ``capacity_factor``, each
expert takes at most ceil(capacity_factor * tokens * k / E) assignments, first choices before second choices and in
token order within a rank (GShard's priority); an overflowing assignment adds nothing (the token's residual passes).

Losses (``aux_loss`` after each forward, added by the trainer): ``aux_coefficient`` x transformers'
``load_balancing_loss_func`` on this layer's scores (the logits themselves at temperature 1): E * sum_e f_e P_e,
k at perfect balance; and ``z_coefficient`` x the router z-loss mean(logsumexp(logits)^2) (Switch).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sparsen.core.config import check, strict_config
from sparsen.errors import SparsenError
from sparsen.nn.mlp import ACTIVATIONS

GATES = ("softmax", "activation")


@strict_config
class MoEConfig:
    kind: ClassVar[str] = "moe"
    d_model: int = 128
    d_ff: int = 128
    """each expert's hidden width"""
    experts: int = 8
    k: int = 2
    """experts per token"""
    activation: str = "silu"
    normalize_topk: bool = True
    """renormalise the k selected probabilities to sum to 1 (Mixtral; Qwen2-MoE does not)"""
    shared_d_ff: int = 0
    """hidden width of a shared expert added through a sigmoid gate (Qwen2-MoE); 0: none"""
    gate: str = "softmax"
    """softmax (of logits / temperature) or activation (softmax of tanh(logits))"""
    temperature: float = 1.0
    capacity_factor: float | None = None
    """None: dropless; else each expert takes at most ceil(factor * tokens * k / experts) assignments"""
    aux_coefficient: float = 0.0
    """weight of the load-balancing loss (Qwen2-MoE 0.001, OLMoE 0.01)"""
    z_coefficient: float = 0.0
    """weight of the router z-loss (Switch 0.001)"""

    def __post_init__(self):
        check(self.d_model > 0 and self.d_ff > 0, "d_model and d_ff must be > 0")
        check(isinstance(self.experts, int) and self.experts > 0, "experts must be a positive integer")
        check(isinstance(self.k, int) and 0 < self.k <= self.experts,
              f"k must be an integer in 1..{self.experts} (the number of experts), not {self.k!r}")
        check(self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}")
        check(self.gate in GATES, f"gate must be one of {', '.join(GATES)}")
        check(self.temperature > 0, "temperature must be > 0")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"capacity_factor must be > 0 (or None for dropless), not {self.capacity_factor!r}")
        check(self.aux_coefficient >= 0 and self.z_coefficient >= 0, "aux_coefficient and z_coefficient must be >= 0")
        check(self.shared_d_ff >= 0, "shared_d_ff must be >= 0")


def load_balancing_loss(router_logits, experts: int, k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func``: over the logits of every layer given (a tensor or a sequence of
    [tokens, experts] tensors), f_e = share of top-k assignments to e, P_e = mean probability of e; E * sum f_e P_e."""
    logits = torch.cat(list(router_logits)) if isinstance(router_logits, (list, tuple)) else router_logits
    probs = logits.float().softmax(-1)
    chosen = probs.topk(k, -1).indices
    f = F.one_hot(chosen, experts).float().sum(1).mean(0)
    return experts * (f * probs.mean(0)).sum()


def z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(router_logits.float(), -1).pow(2).mean()


def capacity(tokens: int, cfg: MoEConfig) -> int:
    return math.ceil(cfg.capacity_factor * tokens * cfg.k / cfg.experts)


def keep_within_capacity(chosen: torch.Tensor, experts: int, cap: int) -> torch.Tensor:
    """[tokens, k] expert ids -> [tokens, k] bool: the assignments each expert takes, rank by rank (first choices
    first), in token order within a rank, at most ``cap`` per expert."""
    n, k = chosen.shape
    order = chosen.T.reshape(-1)  # rank-major: all first choices, then all second choices
    onehot = F.one_hot(order, experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # each assignment's place in its expert's queue
    return (position < cap).view(k, n).T


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        e, f, d = cfg.experts, cfg.d_ff, cfg.d_model
        self.act = ACTIVATIONS[cfg.activation]
        self.router = nn.Linear(d, e, bias=False)
        self.gate_up = nn.Parameter(torch.randn(e, 2 * f, d) * 0.02)
        self.down = nn.Parameter(torch.randn(e, d, f) * 0.02)
        if cfg.shared_d_ff:
            self.shared_gate = nn.Linear(d, cfg.shared_d_ff, bias=False)
            self.shared_up = nn.Linear(d, cfg.shared_d_ff, bias=False)
            self.shared_down = nn.Linear(cfg.shared_d_ff, d, bias=False)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.hidden_out = nn.Identity()  # the routing weights [.., E]: zero for experts not chosen
        self.aux_loss = torch.zeros(())
        self.router_logits = None
        self.dropped = 0

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """What the softmax reads: logits / temperature, or tanh(logits)."""
        c = self.cfg
        return torch.tanh(logits) if c.gate == "activation" else logits / c.temperature

    def route(self, x: torch.Tensor):
        """x [n, d] -> logits [n, E], weights [n, k], chosen experts [n, k]."""
        c = self.cfg
        logits = self.router(x)
        probs = self.scores(logits).float().softmax(-1)
        weights, chosen = probs.topk(c.k, -1)
        if c.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(x.dtype), chosen

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, self.gate_up[e]).chunk(2, dim=-1)
        return F.linear(self.act(g) * u, self.down[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, chosen = self.route(x)
        keep = torch.ones_like(chosen, dtype=torch.bool)
        if c.capacity_factor is not None:
            keep = keep_within_capacity(chosen, c.experts, capacity(x.shape[0], c))
        self.dropped = int((~keep).sum())
        weights = weights * keep
        out = torch.zeros_like(x)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # assignments sorted by expert: one product per expert hit
        counts = torch.bincount(flat, minlength=c.experts).tolist()
        tokens = order // c.k
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = order[start:start + n]
                t = tokens[start:start + n]
                w = weights.reshape(-1)[idx]
                live = w != 0
                if live.any():
                    out.index_add_(0, t[live], self.expert(e, x[t[live]]) * w[live, None])
            start += n
        if c.shared_d_ff:
            shared = self.shared_down(self.act(self.shared_gate(x)) * self.shared_up(x))
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        dense_weights = torch.zeros(x.shape[0], c.experts, dtype=x.dtype).scatter(1, chosen, weights)
        self.hidden_out(dense_weights.view(*shape[:-1], c.experts))
        self.router_logits = logits
        aux = torch.zeros(())
        if c.aux_coefficient:  # on the router's own distribution (transformers' at temperature 1)
            aux = aux + c.aux_coefficient * load_balancing_loss(self.scores(logits), c.experts, c.k)
        if c.z_coefficient:
            aux = aux + c.z_coefficient * z_loss(logits)
        self.aux_loss = aux
        return out.view(shape)

    def expert_load(self) -> torch.Tensor:
        """Each expert's share of the last forward's top-k assignments [E]."""
        if self.router_logits is None:
            raise SparsenError("expert_load needs a forward pass first")
        chosen = self.route_from_logits(self.router_logits)
        return torch.bincount(chosen.reshape(-1), minlength=self.cfg.experts).float() / chosen.numel()

    def route_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scores(logits).float().softmax(-1).topk(self.cfg.k, -1).indices
