"""sketch (ours): the top keys by q.k estimated from a small int8 sketch of every key, in the rank-r bilinear form
that best reproduces the attention logits on calibration text; the first tokens and a local window always kept.

Offline, per layer and KV head, on WikiText-2 validation: the second moments of the queries (summed over the KV
head's query heads) Cq = Lq Lq^T and of the keys Ck = Lk Lk^T (after RoPE, as cached). The expected squared error
of an approximate logit q^T A B^T k is ||Lq^T (I - A B^T) Lk||_F^2, minimised at rank r by the truncated SVD
Lq^T Lk = U S V^T: A = Lq^-T U_r, B = Lk^-T V_r S_r. Every cached key keeps the sketch B^T k (r numbers, int8 with
one fp32 scale per key: 36 bytes at r = 32 against Quest's 32 bytes of page bounds per key). A query scores every
key by (A^T q) . sketch, takes each query head's softmax of those estimates (x attn_scale), sums it over the group
(shared selection) and reads the top keys by it, the first ``sinks`` and the last ``local`` positions always among
them. Related: Loki (PCA of the keys, top-k), Double Sparsity (offline-chosen channels), SparQ (the query's largest
channels); the bilinear basis, int8 sketch and group-summed probabilities are this method's choices, measured
against those in BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sparsen.core.attention import KVSelector, budget_tokens, capturing_qk, outside_to_ninf, top_budget
from sparsen.data import CALIB_CORPUS, EVAL_ONLY, corpus_windows
from sparsen.errors import SparsenError
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _whole, attention_config, check

BASES = ("bilinear", "pca-q", "pca-k")


@attention_config
class SketchConfig(AttentionConfig):
    """Top keys by q.k estimated from a calibrated int8 low-rank key sketch (ours)."""

    method = "sketch"

    rank: int = 32
    """numbers per key in the sketch (a model with a smaller head_dim keeps head_dim)"""
    bits: int = 8
    """bits per sketch number (symmetric, one fp32 scale per key): 8 or 4; 0 keeps them fp32"""
    basis: str = "bilinear"
    """'bilinear' (the rank-r form that best reproduces q.k on calibration text), 'pca-q' or 'pca-k' (the principal
    directions of the queries or of the keys, one basis for both: Loki's choice is pca-k)"""
    sinks: int = 4
    """first positions always read (inside the budget)"""
    local: int = 16
    """most recent positions always read (inside the budget)"""
    corpus: str = CALIB_CORPUS
    """calibration text of the basis (never an evaluation corpus)"""
    calib_tokens: int = 8192
    """calibration tokens"""
    calib_ctx: int = 2048
    """window length of the calibration passes"""

    def __post_init__(self):
        super().__post_init__()
        check(_whole(self.rank, 1), f"rank {self.rank!r}: give a whole number, 1 or more")
        check(self.bits in (0, 4, 8), f"bits {self.bits!r}: give 8, 4 or 0 (fp32 sketch)")
        check(self.basis in BASES, f"basis '{self.basis}': use one of {', '.join(BASES)}")
        check(_whole(self.sinks, 0) and _whole(self.local, 0), "sinks and local: give whole numbers, 0 or more")
        check(_whole(self.calib_tokens, 2) and _whole(self.calib_ctx, 2), "calib_tokens and calib_ctx: give 2 or more")
        check(self.corpus not in EVAL_ONLY,
              f"corpus '{self.corpus}' is an evaluation corpus: calibrate the basis on {CALIB_CORPUS}")



def sketch_bytes(rank: int, bits: int) -> int:
    """Bytes the sketch keeps per key, its scale included."""
    return rank * 4 if bits == 0 else (rank * bits + 7) // 8 + 4


def tensor_key(layer: int) -> str:
    return f"attn.{layer}.sketch_basis"


def bilinear_basis(cq: torch.Tensor, ck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B [n, d, d] (columns by decreasing singular value) with q^T A_r B_r^T k the best rank-r approximation of
    q^T k in expected squared error, for queries and keys of second moments cq, ck [n, d, d] (float64)."""
    eye = torch.eye(cq.shape[-1], dtype=cq.dtype)

    def chol(c):  # a tiny ridge: some directions of the keys carry almost nothing
        return torch.linalg.cholesky(c + 1e-6 * c.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye)

    lq, lk = chol(cq), chol(ck)
    U, S, Vh = torch.linalg.svd(lq.transpose(1, 2) @ lk)
    A = torch.linalg.solve_triangular(lq.transpose(1, 2), U, upper=True)
    B = torch.linalg.solve_triangular(lk.transpose(1, 2), Vh.transpose(1, 2) * S[:, None, :], upper=True)
    return A, B


@torch.no_grad()
def calibrate(lm, config: SketchConfig, progress: bool = True) -> dict:
    """Per full-attention layer the query and key projections, stacked [2, n_kv, head_dim, head_dim] (plan tensors
    ``attn.L.sketch_basis``; the first ``rank`` columns are used)."""
    ad = lm.adapter
    n = max(1, config.calib_tokens // config.calib_ctx)
    wins = corpus_windows(lm.tokenizer, config.corpus, min(config.calib_ctx, config.calib_tokens), n, bos=lm.window_bos)
    acc: dict[int, list] = {}

    def observe(layer, q, k):
        q, k = q[0].double(), k[0].double()
        a = acc.setdefault(layer, [0, 0, 0])
        a[0] = a[0] + torch.einsum("hnd,hne->hde", q, q)
        a[1] = a[1] + torch.einsum("hnd,hne->hde", k, k)
        a[2] += q.shape[1]

    with capturing_qk(ad, observe):
        for w in tqdm(wins, desc="sketch basis", unit="win", disable=not progress, leave=False):
            lm.model(w[None])
    n_kv, group = ad.n_kv_heads, ad.n_heads // ad.n_kv_heads
    out = {}
    for layer, (cq, ck, count) in acc.items():
        cq = (cq / count).reshape(n_kv, group, *cq.shape[1:]).sum(1)
        ck = ck / count
        if config.basis == "bilinear":
            A, B = bilinear_basis(cq, ck)
        else:
            _, V = torch.linalg.eigh(cq if config.basis == "pca-q" else ck)
            A = B = V.flip(-1)  # by decreasing variance
        out[tensor_key(layer)] = torch.stack([A, B]).float().contiguous()
    return out


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of x [..., r]: integer codes (as floats) and the scale per row, x ~ codes *
    scale (round half to even, as the engine's nearbyintf)."""
    if bits == 0:
        return x, torch.ones_like(x[..., :1])
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / (2 ** (bits - 1) - 1)
    return torch.round(x / scale), scale


class Sketch(KVSelector):
    def __init__(self, config: SketchConfig, basis: torch.Tensor, attn_scale: float):
        d = basis.shape[-1]
        r = min(config.rank, d)
        self.shared, self.budget = config.shared, config.budget
        self.A, self.B = basis[0, :, :, :r], basis[1, :, :, :r]  # [n_kv, d, r]
        self.bits, self.sinks, self.local, self.scale = config.bits, config.sinks, config.local, attn_scale
        self.per_key = sketch_bytes(r, config.bits) / (4 * d)  # fp32 K vectors' worth of bytes read per key

    def estimate(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Estimated logits [n_kv, g, n, n_keys] from the int8 sketch of k [n_kv, n_keys, d]."""
        codes, scale = quantize(torch.einsum("hkd,hdr->hkr", k, self.B), self.bits)
        qa = torch.einsum("hgnd,hdr->hgnr", q, self.A)
        return torch.einsum("hgnr,hkr->hgnk", qa, codes) * scale[:, None, None, :, 0] * self.scale

    def keep(self, q, k, qpos, scores):
        probs = torch.softmax(outside_to_ninf(self.estimate(q, k), scores), dim=-1)
        value = outside_to_ninf(probs.sum(1, keepdim=True) if self.shared else probs, scores)
        j = torch.arange(k.shape[1])
        forced = (j[None, :] < self.sinks) | (j[None, :] > (qpos[:, None] - self.local))
        value = torch.where(forced & torch.isfinite(value), torch.full_like(value, 2.0 * q.shape[1]), value)
        return top_budget(value, budget_tokens(qpos + 1, **self.budget))

    def estimate_reads(self, n_keys):
        return n_keys.double() * self.per_key


def _selector(config, layer, adapter, tensors):
    key = tensor_key(layer)
    if key not in tensors:
        raise SparsenError(f"this sketch plan has no basis for layer {layer}: calibrate it again")
    return Sketch(config, tensors[key], adapter.attn_scale)


METHOD = AttentionMethod("sketch", "ours: top keys by q.k from an int8 rank-r key sketch in a calibrated bilinear basis",
                         SketchConfig, _selector, calibrate=calibrate)
