"""XAttention (Xu et al., 2025): score blocks by antidiagonal sums, keep each query block's blocks until they hold a
share tau of its estimated attention mass.

As the reference codes it (``xattn_estimate``, "inverse" mode, ``find_blocks_chunked``): queries and keys are cut
into groups of ``stride`` S positions; the score of query group r and key group c is the antidiagonal sum
sum_t q[rS + S-1-t] . k[cS + t] (queries reversed within the group, keys strided); softmax over the key groups of
score * scale / S (causal at group level: c <= r, as the reference masks it), padded groups excluded; summed to
B x B blocks. Per query block: the first block and the diagonal are kept, then the other blocks in decreasing
mass while the mass kept before them (forced blocks included) is below tau of the row's total (so the block that
crosses tau is kept; tau = 1 keeps every block, whatever the rounding). The reference repeats KV per query head;
shared selection sums the block masses over the KV head's query heads, ``shared=False`` selects per query head as
the reference does.

Block: the reference asserts B = 128; we default to 64, because at 4K a row of 128-blocks has at most 32 blocks
and a mass threshold then keeps most of them (near dense); with B = 64 and S = 8 a block still has 8 x 8 groups.
Estimate: the strided product is 1/S of the dense QK^T (per query head), plus the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsen.core.attention import BlockSelector
from sparsen.core.prefill import block_causal, n_blocks
from sparsen.methods.attention.base import AttentionMethod, PrefillConfig, _number, _whole, attention_config, check


@attention_config
class XAttentionConfig(PrefillConfig):
    """Antidiagonal block scoring; blocks kept per query block up to a share tau of the mass."""

    method = "xattention"
    budgeted = False
    mass_field = "tau"

    density: float | None = None
    tau: float = 0.9
    """share of each query block's estimated attention mass its kept blocks hold, in (0, 1] (reference 0.9;
    Xattention_prefill's default 0.8)"""
    stride: int = 8
    """antidiagonal stride S (reference 8 or 16); the block must be a multiple of it"""

    def __post_init__(self):
        super().__post_init__()
        check(_number(self.tau) and 0 < self.tau <= 1, f"tau {self.tau!r} is outside (0, 1]: give the share of the "
                                                       "attention mass to keep")
        check(_whole(self.stride, 1), f"stride {self.stride!r}: give a whole number, 1 or more")
        check(self.block % self.stride == 0, f"block {self.block} is not a multiple of stride {self.stride}: "
                                             "give a block that the stride divides")


def antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, scale: float, stride: int, block: int) -> torch.Tensor:
    """q [n_kv, g, n, d], k [n_kv, n, d] -> estimated attention mass per block pair, per query head
    [n_kv, g, nb, nb] (each real query group's softmax sums to 1)."""
    n_kv, g, n, d = q.shape
    S = stride
    nb = n_blocks(n, block)
    n_pad = nb * block
    ns, r = n_pad // S, block // S
    qr = F.pad(q, (0, 0, 0, n_pad - n)).reshape(n_kv, g, ns, S, d).flip(3).reshape(n_kv, g, ns, S * d)
    kr = F.pad(k, (0, 0, 0, n_pad - n)).reshape(n_kv, ns, S * d)
    logits = torch.einsum("hgrx,hcx->hgrc", qr, kr) * (scale / S)
    groups = torch.arange(ns)
    real = groups * S < n  # groups holding at least one real position
    allowed = (groups[:, None] >= groups[None, :]) & real[None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1) * real[:, None]
    return probs.reshape(n_kv, g, nb, r, nb, r).sum((3, 5))


def keep_mass(mass: torch.Tensor, tau: float) -> torch.Tensor:
    """mass [h, nb, nb] (0 above the diagonal) -> bool kept blocks: first and diagonal, then the others in decreasing
    mass while the mass before them is below tau of the row total (find_blocks_chunked)."""
    nb = mass.shape[-1]
    i = torch.arange(nb)
    causal = block_causal(nb)
    forced = ((i[None, :] == 0) | (i[None, :] == i[:, None])) & causal
    required = tau * mass.sum(-1, keepdim=True)
    others = mass.masked_fill(forced | ~causal, 0.0)
    vals, order = others.sort(dim=-1, descending=True, stable=True)
    before = (mass * forced).sum(-1, keepdim=True) + vals.cumsum(-1) - vals
    keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, order, before < required)
    return (keep & causal) | forced


class XAttention(BlockSelector):
    def __init__(self, config: XAttentionConfig):
        self.shared, self.block = config.shared, config.block
        self.tau, self.stride = float(config.tau), config.stride

    def blocks(self, q, k, scale):
        if self.tau >= 1:
            nb = n_blocks(k.shape[1], self.block)
            return torch.ones(k.shape[0] if self.shared else q.shape[0] * q.shape[1], nb, nb, dtype=torch.bool)
        mass = antidiagonal_mass(q, k, scale, self.stride, self.block)
        mass = mass.sum(1) if self.shared else mass.flatten(0, 1)
        return keep_mass(mass, self.tau)

    def estimate_flops(self, n, d, n_heads, n_kv):
        ns = -(-n // self.stride)
        return 2.0 * self.stride * d * ns * (ns + 1) / 2 * n_heads


METHOD = AttentionMethod("xattention", "block-sparse prefill: antidiagonal block scores kept up to a mass tau",
                         XAttentionConfig, lambda c, layer, ad, t: XAttention(c))
