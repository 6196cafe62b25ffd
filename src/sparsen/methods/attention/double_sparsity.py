"""Double Sparsity (Yang et al., 2024): approximate q.k on a few channels ranked offline, then the top keys.

Offline, per layer, each query head's channels are scored on calibration text by mean|q_c| * mean|k_c| (after
RoPE, the keys as cached: the "qk" outlier criterion); the ``channels`` best of each head (summed over the KV
head's query heads under shared selection) form the label cache. A query's approximate score of a key is q.k on
those channels only; it reads the top keys by that score. No sink or window is forced, as in the reference.
Estimate: the label cache, ``channels`` / head_dim of a K vector per key.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sparsen.core.attention import KVSelector, budget_tokens, capturing_qk, group_sum, outside_to_ninf, top_budget
from sparsen.data import CALIB_CORPUS, EVAL_ONLY, corpus_windows
from sparsen.errors import SparsenError
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _whole, attention_config, check


@attention_config
class DoubleSparsityConfig(AttentionConfig):
    """Top keys by q.k approximated on offline-ranked channels."""

    method = "double-sparsity"

    channels: int = 8
    """channels per head the approximate score uses (the paper: 16 of 128; here head_dim / 8)"""
    corpus: str = CALIB_CORPUS
    """calibration text the channels are ranked on (never an evaluation corpus)"""
    calib_tokens: int = 16384
    """calibration tokens"""
    calib_ctx: int = 1024
    """window length of the calibration passes"""

    def __post_init__(self):
        super().__post_init__()
        check(_whole(self.channels, 1), f"channels {self.channels!r}: give a whole number, 1 or more")
        check(_whole(self.calib_tokens, 2) and _whole(self.calib_ctx, 2), "calib_tokens and calib_ctx: give 2 or more")
        check(self.corpus not in EVAL_ONLY,
              f"corpus '{self.corpus}' is an evaluation corpus: rank the channels on {CALIB_CORPUS}")


def tensor_key(layer: int) -> str:
    return f"attn.{layer}.channel_score"


@torch.no_grad()
def calibrate(lm, config: DoubleSparsityConfig, progress: bool = True) -> dict:
    """Per full-attention layer, the channel scores [n_heads, head_dim] (plan tensors ``attn.L.channel_score``)."""
    ad = lm.adapter
    n = max(1, config.calib_tokens // config.calib_ctx)
    wins = corpus_windows(lm.tokenizer, config.corpus, min(config.calib_ctx, config.calib_tokens), n, bos=lm.window_bos)
    sums: dict[int, list] = {}

    def observe(layer, q, k):
        qa, ka = q[0].abs().float().sum(1), k[0].abs().float().sum(1)  # [heads, d], [n_kv, d]
        acc = sums.setdefault(layer, [0, 0, 0])
        acc[0] = acc[0] + qa
        acc[1] = acc[1] + ka
        acc[2] += q.shape[2]

    with capturing_qk(ad, observe):
        for w in tqdm(wins, desc="double-sparsity channels", unit="win", disable=not progress, leave=False):
            lm.model(w[None])
    group = ad.n_heads // ad.n_kv_heads
    return {tensor_key(layer): (qs / cnt) * (ks / cnt).repeat_interleave(group, 0)
            for layer, (qs, ks, cnt) in sums.items()}


class DoubleSparsity(KVSelector):
    def __init__(self, config: DoubleSparsityConfig, channel_score: torch.Tensor, n_kv: int):
        self.shared, self.budget, self.r = config.shared, config.budget, config.channels
        heads, d = channel_score.shape
        if self.r > d:
            raise SparsenError(f"double-sparsity channels {self.r} exceeds head_dim {d}: give at most {d}")
        score = channel_score.float().reshape(n_kv, heads // n_kv, d)
        score = group_sum(score, self.shared)  # [n_kv, g', d]
        self.idx = score.topk(self.r, dim=-1).indices  # [n_kv, g', r]
        self.d = d

    def keep(self, q, k, qpos, scores):
        n_kv, g, n, d = q.shape
        idx = self.idx if not self.shared else self.idx.expand(n_kv, g, self.r)
        qc = q.gather(-1, idx[:, :, None, :].expand(n_kv, g, n, self.r))  # [n_kv, g, n, r]
        kc = k[:, None].expand(n_kv, g, k.shape[1], d).gather(-1, idx[:, :, None, :].expand(n_kv, g, k.shape[1], self.r))
        approx = group_sum(torch.einsum("hgnr,hgkr->hgnk", qc, kc), self.shared)
        approx = outside_to_ninf(approx, scores)
        return top_budget(approx, budget_tokens(qpos + 1, **self.budget))

    def estimate_reads(self, n_keys):
        return n_keys.double() * self.r / self.d


def _selector(config, layer, adapter, tensors):
    key = tensor_key(layer)
    if key not in tensors:
        raise SparsenError(f"this double-sparsity plan has no channel scores for layer {layer}: calibrate it again")
    return DoubleSparsity(config, tensors[key], adapter.n_kv_heads)


METHOD = AttentionMethod("double-sparsity", "Double Sparsity: top keys by q.k on offline-ranked channels",
                         DoubleSparsityConfig, _selector, calibrate=calibrate)
