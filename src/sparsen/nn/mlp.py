"""Feed-forward modules, drop-in for a Llama-family block's MLP: [..., d_model] -> [..., d_model].

Every module passes its hidden activation (what ``down`` reads; BlockFFN: its router) through ``self.hidden_out``,
an identity that measurements hook to count nonzeros per neuron.

- ``DenseMLP``: down(act(up x)), or gated down(act(gate x) * up x) as Llama (SwiGLU) and Gemma (GeGLU).
- ``TopKMLP``: the same, with each token's k largest |hidden| entries kept (the top-k Transformer of Li et al.).
- ``StatTopKMLP``: statistical top-k on the pre-activation (the gate's when gated) before the activation; with
  ``activation="gelu_tanh", gated=True`` and ``sparsity`` it is Gemma 3n's ``Gemma3nTextMLP``.
- ``PredictorFFN``: Spark's FFN, V (act(sel(K1 x[:r])) * K2 x[r:]): the first r input dimensions pick the neurons,
  the rest computes values only for them. r = 0 means no separate predictor: V act(sel(K2 x)), a plain MLP.
- ``BlockFFN``: a router RMSNorm(ReLU(W_r x)) over small SiLU experts, output sum_e r_e expert_e(x); zeros in the
  router are skipped experts, measured per token and per chunk of consecutive tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sparsen.core.config import check, strict_config
from sparsen.nn.topk import check_k, exact_topk, statistical_topk, topk_mask

ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "silu": F.silu}


@strict_config
class MLPConfig:
    kind: ClassVar[str] = "dense"
    d_model: int = 128
    d_ff: int = 512
    activation: str = "relu"
    """relu, gelu, gelu_tanh or silu"""
    gated: bool = False
    """act(gate x) * up x (Llama, Gemma) instead of act(up x)"""
    bias: bool = False

    def __post_init__(self):
        check(self.d_model > 0 and self.d_ff > 0, "d_model and d_ff must be > 0")
        check(self.activation in ACTIVATIONS, f"activation must be one of {', '.join(ACTIVATIONS)}")


class DenseMLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.activation]
        if cfg.gated:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.hidden_out = nn.Identity()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.gated:
            return self.act(self.gate(x)) * self.up(x)
        return self.act(self.up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden_out(self.hidden(x)))


@strict_config
class TopKMLPConfig(MLPConfig):
    kind: ClassVar[str] = "topk"
    k: int = 32
    """hidden units kept per token (the largest |hidden|)"""

    def __post_init__(self):
        super().__post_init__()
        check_k(self.k, self.d_ff)


class TopKMLP(DenseMLP):
    def hidden(self, x):
        h = super().hidden(x)
        return h * topk_mask(h.abs(), self.cfg.k) if self.cfg.k < self.cfg.d_ff else h


@strict_config
class StatTopKMLPConfig(MLPConfig):
    kind: ClassVar[str] = "stat-topk"
    k: int | None = 32
    """target units kept per token: threshold mean + std * Phi^-1(1 - k/d_ff)"""
    sparsity: float | None = None
    """instead of k, the target share zeroed: threshold mean + std * Phi^-1(sparsity) (Gemma 3n's parameter)"""
    soft: bool = True
    """max(z - theta, 0) (Spark, Gemma 3n) instead of z where z > theta"""

    def __post_init__(self):
        super().__post_init__()
        check((self.k is None) != (self.sparsity is None), "give exactly one of k and sparsity")
        if self.k is not None:
            check_k(self.k, self.d_ff)
        else:
            check(0 < self.sparsity < 1, f"sparsity must be in (0, 1), not {self.sparsity!r}")


class StatTopKMLP(DenseMLP):
    def hidden(self, x):
        c = self.cfg
        pre = self.gate(x) if c.gated else self.up(x)
        a = self.act(statistical_topk(pre, c.k, soft=c.soft, sparsity=c.sparsity))
        return a * self.up(x) if c.gated else a


@strict_config
class PredictorFFNConfig(MLPConfig):
    kind: ClassVar[str] = "predictor"
    activation: str = "gelu_tanh"
    r: int = 64
    """input dimensions that predict (the first r); the other d_model - r compute the values"""
    k: int = 32
    """neurons selected per token"""
    selection: str = "statistical"
    """statistical (Spark: soft threshold) or exact (torch.topk)"""

    def __post_init__(self):
        super().__post_init__()
        check(not self.gated, "the predictor FFN is gated by its predictor: leave gated False")
        check(isinstance(self.r, int) and 0 <= self.r < self.d_model,
              f"r must be an integer in 0..{self.d_model - 1} (d_model - 1), not {self.r!r}")
        check_k(self.k, self.d_ff)
        check(self.selection in ("statistical", "exact"), "selection must be statistical or exact")


class PredictorFFN(nn.Module):
    def __init__(self, cfg: PredictorFFNConfig):
        super().__init__()
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.activation]
        self.predictor = nn.Linear(cfg.r, cfg.d_ff, bias=cfg.bias) if cfg.r else None  # K1
        self.up = nn.Linear(cfg.d_model - cfg.r, cfg.d_ff, bias=cfg.bias)  # K2
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # V
        self.hidden_out = nn.Identity()

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return statistical_topk(scores, c.k) if c.selection == "statistical" else exact_topk(scores, c.k)

    def hidden(self, x):
        r = self.cfg.r
        if r == 0:
            return self.act(self.select(self.up(x)))
        return self.act(self.select(self.predictor(x[..., :r]))) * self.up(x[..., r:])

    def forward(self, x):
        return self.down(self.hidden_out(self.hidden(x)))

    @torch.no_grad()
    def forward_selected(self, x: torch.Tensor) -> torch.Tensor:
        """The inference path: K2's columns and V's rows gathered for the selected neurons only (each token's
        nonzero gates); equal to ``forward``. x is [n, d_model]."""
        c, r = self.cfg, self.cfg.r
        check(r > 0, "forward_selected needs a predictor (r > 0)")
        gates = self.act(self.select(self.predictor(x[:, :r])))
        out = torch.zeros(x.shape[0], c.d_model, dtype=x.dtype)
        for i in range(x.shape[0]):
            idx = gates[i].nonzero().squeeze(1)
            v = self.up.weight[idx] @ x[i, r:]
            if self.up.bias is not None:
                v = v + self.up.bias[idx]
            out[i] = self.down.weight[:, idx] @ (gates[i, idx] * v)
        return out + self.down.bias if self.down.bias is not None else out


@strict_config
class BlockFFNConfig(MLPConfig):
    kind: ClassVar[str] = "blockffn"
    activation: str = "silu"
    experts: int = 16
    """experts; each is a non-gated act FFN of width d_ff // experts"""
    router_l1: float = 0.0
    """weight of the mean |router| term the trainer adds to the loss (BlockFFN's activation-sparsity loss)"""

    def __post_init__(self):
        super().__post_init__()
        check(self.experts > 0 and self.d_ff % self.experts == 0, "d_ff must be a multiple of experts (> 0)")
        check(self.router_l1 >= 0, "router_l1 must be >= 0")


class BlockFFN(nn.Module):
    def __init__(self, cfg: BlockFFNConfig):
        super().__init__()
        self.cfg = cfg
        e, w, d = cfg.experts, cfg.d_ff // cfg.experts, cfg.d_model
        self.act = ACTIVATIONS[cfg.activation]
        self.router = nn.Linear(d, e, bias=False)
        self.router_norm = nn.RMSNorm(e, eps=1e-6)
        self.w_up = nn.Parameter(torch.randn(e, w, d) / d ** 0.5)
        self.w_down = nn.Parameter(torch.randn(e, d, w) / w ** 0.5)
        self.hidden_out = nn.Identity()  # the router: a zero is a skipped expert
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        r = self.hidden_out(self.router_norm(torch.relu(self.router(x))))  # [..., E]
        self.aux_loss = self.cfg.router_l1 * r.abs().mean()
        e, w, d = self.w_up.shape
        h = self.act(x @ self.w_up.reshape(e * w, d).T).unflatten(-1, (e, w)) * r.unsqueeze(-1)  # two plain matmuls
        return h.flatten(-2) @ self.w_down.permute(0, 2, 1).reshape(e * w, d)


def chunk_sparsity(active: torch.Tensor, chunk: int) -> float:
    """BlockFFN's chunk-level sparsity: 1 - |union of units active in `chunk` consecutive tokens| / units, averaged
    over the chunks; ``active`` is [batch, tokens, units] (bool)."""
    b, t, u = active.shape
    n = t // chunk
    check(n > 0, f"chunk {chunk} is longer than the {t} tokens")
    union = active[:, :n * chunk].reshape(b, n, chunk, u).any(2)
    return float(1 - union.float().mean())

