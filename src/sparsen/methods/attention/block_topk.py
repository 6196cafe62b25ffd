"""Block top-k prefill (MInference's block-sparse pattern, Sparse Frontier's BlockSparse): mean-pool queries and
keys per block, score block pairs by pooled q . pooled k, keep each query block's top key blocks.

As the references code it: the pooled score is the plain dot product of the block means (no softmax: only the order
matters); the sink block, the diagonal and the sub-diagonal are forced (they take the top places, so they count in
the budget). Budget: ``density`` of the query block's causal key blocks (ceil), where MInference keeps a fixed 100
blocks of 64 (near dense below 8K) and Sparse Frontier 64 blocks of 16. Shared selection sums the pooled scores over
the KV head's query heads. Estimate: pooling Q and K (n d adds per head) and the pooled scores ((L/B)^2 / 2 block
pairs, 2 d FLOPs each): about 1/B^2 + 2/L of the dense QK^T.
"""

from __future__ import annotations

import math

import torch

from sparsen.core.attention import BlockSelector
from sparsen.core.prefill import block_causal, mean_pool, n_blocks, rank_desc
from sparsen.methods.attention.base import AttentionMethod, PrefillConfig, attention_config


@attention_config
class BlockTopKConfig(PrefillConfig):
    """Top key blocks per query block by pooled q . pooled k."""

    method = "block-topk"


def block_budget(nb: int, density: float) -> torch.Tensor:
    """Key blocks each query block keeps: ceil(density * its causal blocks), at least 1: [nb]."""
    causal = torch.arange(1, nb + 1, dtype=torch.float64)
    return torch.ceil(causal * density - 1e-9).long().clamp_min(1)


class BlockTopK(BlockSelector):
    def __init__(self, config: BlockTopKConfig):
        self.shared, self.block, self.density = config.shared, config.block, float(config.density)

    def blocks(self, q, k, scale):
        n = k.shape[1]
        nb = n_blocks(n, self.block)
        qp = mean_pool(q, self.block)  # [n_kv, g, nb, d]
        kp = mean_pool(k, self.block)  # [n_kv, nb, d]
        if self.shared:
            s = torch.einsum("hqd,hkd->hqk", qp.sum(1), kp)  # the group's scores summed
        else:
            s = torch.einsum("hgqd,hkd->hgqk", qp, kp).flatten(0, 1)
        i = torch.arange(nb)
        causal = block_causal(nb)
        forced = ((i[None, :] == 0) | (i[None, :] == i[:, None]) | (i[None, :] == i[:, None] - 1)) & causal
        s = s.masked_fill(~causal, -math.inf).masked_fill(forced, math.inf)
        budget = torch.maximum(block_budget(nb, self.density), forced.sum(1))
        return (rank_desc(s) < budget[:, None]) & causal

    def estimate_flops(self, n, d, n_heads, n_kv):
        nb = n_blocks(n, self.block)
        pairs = nb * (nb + 1) / 2
        scored = n_kv if self.shared else n_heads
        return float((n_heads + n_kv) * n * d + 2.0 * d * pairs * scored)


METHOD = AttentionMethod("block-topk", "block-sparse prefill: top key blocks per query block by pooled q.k",
                         BlockTopKConfig, lambda c, layer, ad, t: BlockTopK(c))
