"""PROTOTYPE: top keys by q.k approximated in a calibrated low-rank basis (experiment, not final)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sparsen.core.attention import KVSelector, budget_tokens, capturing_qk, outside_to_ninf, top_budget
from sparsen.data import CALIB_CORPUS, EVAL_ONLY, corpus_windows
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _whole, attention_config, check


@attention_config
class LowRankConfig(AttentionConfig):
    method = "lowrank"
    rank: int = 8
    basis: str = "q"
    sinks: int = 4
    local: int = 16
    combine: str = "prob"
    bits: int = 0
    corpus: str = CALIB_CORPUS
    calib_tokens: int = 8192
    calib_ctx: int = 2048

    def __post_init__(self):
        super().__post_init__()
        check(_whole(self.rank, 1), "rank")
        check(self.basis in ("q", "k", "qk", "bilinear"), "basis")
        check(self.corpus not in EVAL_ONLY, "corpus")


def tensor_key(layer):
    return f"attn.{layer}.basis"


@torch.no_grad()
def calibrate(lm, config, progress=True):
    ad = lm.adapter
    wins = corpus_windows(lm.tokenizer, config.corpus, config.calib_ctx, max(1, config.calib_tokens // config.calib_ctx),
                          bos=lm.window_bos)
    acc = {}

    def observe(layer, q, k):
        q, k = q[0].double(), k[0].double()
        a = acc.setdefault(layer, [0, 0, 0])
        a[0] = a[0] + torch.einsum("hnd,hne->hde", q, q)
        a[1] = a[1] + torch.einsum("hnd,hne->hde", k, k)
        a[2] += q.shape[1]

    with capturing_qk(ad, observe):
        for w in tqdm(wins, desc="lowrank basis", disable=not progress, leave=False):
            lm.model(w[None])
    n_kv, g = ad.n_kv_heads, ad.n_heads // ad.n_kv_heads
    out = {}
    for layer, (cq, ck, n) in acc.items():
        cq = (cq / n).reshape(n_kv, g, *cq.shape[1:]).sum(1)
        ck = ck / n
        if config.basis == "bilinear":
            d = cq.shape[-1]
            eye = torch.eye(d, dtype=torch.float64)
            lq = torch.linalg.cholesky(cq + 1e-6 * cq.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye)
            lk = torch.linalg.cholesky(ck + 1e-6 * ck.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye)
            U, S, Vh = torch.linalg.svd(lq.transpose(1, 2) @ lk)
            A = torch.linalg.solve_triangular(lq.transpose(1, 2), U, upper=True)
            B = torch.linalg.solve_triangular(lk.transpose(1, 2), Vh.transpose(1, 2) * S[:, None, :], upper=True)
            out[tensor_key(layer)] = torch.stack([A, B], 0).float().contiguous()
            continue
        if config.basis == "q":
            m = cq
        elif config.basis == "k":
            m = ck
        else:
            m = cq / cq.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] + ck / ck.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
        _, V = torch.linalg.eigh(m)
        out[tensor_key(layer)] = V.flip(-1).float().contiguous()  # [n_kv, d, d] by decreasing eigenvalue
    return out


class LowRank(KVSelector):
    def __init__(self, config, basis, scale):
        self.shared, self.budget = config.shared, config.budget
        if basis.dim() == 4:
            self.P, self.Pk = basis[0][:, :, : config.rank], basis[1][:, :, : config.rank]
        else:
            self.P = self.Pk = basis[:, :, : config.rank]
        self.bits = config.bits
        self.r, self.d = config.rank, basis.shape[1]
        self.sinks, self.local, self.combine, self.scale = config.sinks, config.local, config.combine, scale

    def keep(self, q, k, qpos, scores):
        qa = torch.einsum("hgnd,hdr->hgnr", q, self.P)
        ka = torch.einsum("hkd,hdr->hkr", k, self.Pk)
        if self.bits:
            lim = 2 ** (self.bits - 1) - 1
            sc = ka.abs().amax(-1, keepdim=True).clamp_min(1e-30) / lim
            ka = (ka / sc).round() * sc
        s = outside_to_ninf(torch.einsum("hgnr,hkr->hgnk", qa, ka) * self.scale, scores)
        if self.combine == "prob":
            v = torch.softmax(s, -1)
            v = v.sum(1, keepdim=True) if self.shared else v
        else:
            v = s.sum(1, keepdim=True) if self.shared else s
        v = outside_to_ninf(v, scores)
        j = torch.arange(k.shape[1])
        forced = (j[None, :] < self.sinks) | (j[None, :] > (qpos[:, None] - self.local))
        v = torch.where(forced & torch.isfinite(v), torch.full_like(v, 1e30), v)
        return top_budget(v, budget_tokens(qpos + 1, **self.budget))

    def estimate_reads(self, n_keys):
        return n_keys.double() * self.r / self.d


def _selector(config, layer, adapter, tensors):
    return LowRank(config, tensors[tensor_key(layer)], adapter.attn_scale)


METHOD = AttentionMethod("lowrank", "prototype", LowRankConfig, _selector, calibrate=calibrate)
