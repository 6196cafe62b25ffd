"""Discrete codes of attention heads (O'Neill & Bui, arXiv 2405.12522) and the circuit scores read from them.

One SAE is shared by all heads. Its inputs are the heads' outputs r_h in the residual stream, averaged over a
prompt's positions: one d_model vector per (prompt, head). As the paper's code: ReLU + L1, encoder and decoder
dictionary vectors of unit norm (the gradient along them removed, renormalised after every step), a tied bias b
subtracted before the encoder and added after the decoder, loss = mean squared error + lambda * mean_rows ||f||_1,
Adam at 1e-3 for 500 full-batch steps, a codebook of 200 latents, trained on the heads of only 10 prompts drawn
from positives and negatives alike. A head's code on a prompt is its argmax latent.

The paper's decoder normalises each output dimension's weights over the latents (its ``ConstrainedUnitNormLinear``
applied to a [d_in, d_sae] weight); here each latent's decoder vector is unit norm, the constraint the paper
describes. Inputs are used raw, as in the paper: lambda is scale-dependent, and SmolLM2-135M's position-mean head
outputs have GPT-2's scale (median norm 5.4, RMS per dimension 0.46 on IOI); ``rescale=True`` divides them by one
scalar, their RMS over the training set, for a model whose scale differs.

Node score of head h: the number of distinct codes seen at h on positives and never on negatives (the paper
softmaxes it over heads, a monotone map: the AUC is unchanged). Pair score: head pairs ranked by the number of
distinct code pairs seen on positives only; a head scores by how often it appears in the top n^2/2 head entries of
that ranking (n^2/4 ordered pairs). Ties at the cut get fractional credit (the expected score under a random order
of the tied pairs) instead of the paper's order-dependent cut.

Flip score (ours, not the paper's): the share of prompt pairs whose code at h differs between the positive and its
paired negative. A pair's prompts share everything but what the task hinges on (a name, a year's digits, the
parameter names), so a head whose code moves with it is one that change reaches; counting distinct codes instead
rewards heads whose codes vary from prompt to prompt for any reason.

TV score (ours): the total-variation distance between a head's code frequencies on positives and on negatives.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sparsen.sae import build_sae, sae_config

LAMBDA = {"docstring": 0.05}
"""the paper's L1 weight per task (0.02 for the others)"""


CODE_SCORES = ("node", "flip", "tv", "pair")
"""the per-head scores ``code_run`` reads from the codes, one row per seed in a circuits run"""


def default_lambda(task: str) -> float:
    return LAMBDA.get(task, 0.02)


def train_code_sae(x: torch.Tensor, d_sae: int = 200, l1: float = 0.02, steps: int = 500, lr: float = 1e-3,
                   seed: int = 0, rescale: bool = False):
    """Train the shared SAE on rows ``x`` [n, d] (full batch); returns (sae, scale): encode ``inputs / scale``."""
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    scale = float(x.pow(2).mean().sqrt().clamp_min(1e-12)) if rescale else 1.0
    xs = x / scale
    d = x.shape[1]
    sae = build_sae(sae_config("standard", d_in=d, d_sae=d_sae, apply_b_dec_to_input=True, l1_coefficient=l1))
    with torch.no_grad():
        enc = torch.randn(d, d_sae, generator=g)
        sae.W_enc.copy_(enc / enc.norm(dim=0, keepdim=True))
        dec = torch.randn(d_sae, d, generator=g)
        sae.W_dec.copy_(dec / dec.norm(dim=1, keepdim=True))
        sae.b_enc.copy_((torch.rand(d_sae, generator=g) * 2 - 1) / d ** 0.5)
        sae.b_dec.zero_()
    opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        f = sae.encode(xs)
        recon = sae.decode(f)
        loss = (recon - xs).pow(2).mean() + l1 * f.sum(1).mean()
        loss.backward()
        with torch.no_grad():  # no step along a dictionary vector: only around the unit sphere
            we, wd = sae.W_enc, sae.W_dec
            we.grad -= we * (we.grad * we).sum(0, keepdim=True)
            wd.grad -= wd * (wd.grad * wd).sum(1, keepdim=True)
        opt.step()
        with torch.no_grad():
            sae.W_enc /= sae.W_enc.norm(dim=0, keepdim=True)
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    sae.requires_grad_(False)
    return sae, scale


@torch.no_grad()
def codes_of(sae, scale: float, outputs: torch.Tensor, batch: int = 8192, null_code: bool = False) -> np.ndarray:
    """Argmax latent of every (prompt, head): outputs [N, n_heads, d] -> int codes [N, n_heads]. ``null_code``: a
    row with no active latent gets code d_sae (argmax would read latent 0), so a quiet head keeps one code."""
    n, h, d = outputs.shape
    flat = outputs.reshape(-1, d)
    out = np.empty(n * h, dtype=np.int64)
    for s in range(0, len(flat), batch):
        f = sae.encode(flat[s: s + batch].float() / scale)
        c = f.argmax(-1)
        if null_code:
            c = torch.where(f.max(-1).values > 0, c, f.shape[1])
        out[s: s + batch] = c.numpy()
    return out.reshape(n, h)


def node_scores(codes_pos: np.ndarray, codes_neg: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per head: distinct codes seen on positives and never on negatives. codes [N, n_heads] -> [n_heads]."""
    k = int(max(codes_pos.max(initial=0), codes_neg.max(initial=0)) + 1) if k is None else k
    n_heads = codes_pos.shape[1]
    heads = np.arange(n_heads)[None]
    pos = np.zeros((n_heads, k), dtype=bool)
    neg = np.zeros((n_heads, k), dtype=bool)
    pos[np.broadcast_to(heads, codes_pos.shape), codes_pos] = True
    neg[np.broadcast_to(heads, codes_neg.shape), codes_neg] = True
    return (pos & ~neg).sum(1).astype(float)


def flip_scores(codes_pos: np.ndarray, codes_neg: np.ndarray) -> np.ndarray:
    """Per head: the share of pairs (row i of each) whose codes differ. codes [N, n_heads] -> [n_heads]."""
    if codes_pos.shape != codes_neg.shape:
        raise ValueError(f"flip scores need paired codes: shapes {codes_pos.shape} and {codes_neg.shape}")
    return (codes_pos != codes_neg).mean(0)


def tv_scores(codes_pos: np.ndarray, codes_neg: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per head: the total-variation distance 1/2 sum_c |P(c | positives) - P(c | negatives)| between its code
    frequencies (the node score's "seen only on positives" with the frequencies kept). codes [N, n_heads]."""
    k = int(max(codes_pos.max(initial=0), codes_neg.max(initial=0)) + 1) if k is None else k
    n_heads = codes_pos.shape[1]

    def freq(codes):
        at = np.arange(n_heads)[None] * k + codes
        return np.bincount(at.ravel(), minlength=n_heads * k).reshape(n_heads, k) / max(len(codes), 1)

    return 0.5 * np.abs(freq(codes_pos) - freq(codes_neg)).sum(1)


def pair_counts(codes_pos: np.ndarray, codes_neg: np.ndarray, k: int | None = None) -> np.ndarray:
    """[n_heads, n_heads]: for each head pair, the distinct code pairs (c1, c2) seen on positives and never on
    negatives (the diagonal is 0)."""
    k = int(max(codes_pos.max(initial=0), codes_neg.max(initial=0)) + 1) if k is None else k
    n = codes_pos.shape[1]
    pair_id = np.arange(n * n, dtype=np.int64).reshape(n, n)

    def keys(codes):  # distinct (pair, c1, c2) keys, sorted (np.sort + diff: np.unique is 50x slower here)
        c = codes.astype(np.int64)
        s = np.sort(((pair_id[None] * k + c[:, :, None]) * k + c[:, None, :]).ravel())
        return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s

    pk, nk = keys(codes_pos), keys(codes_neg)
    if len(nk):
        at = np.searchsorted(nk, pk).clip(max=len(nk) - 1)
        only = pk[nk[at] != pk]
    else:
        only = pk
    counts = np.bincount(only // (k * k), minlength=n * n).reshape(n, n).astype(float)
    np.fill_diagonal(counts, 0.0)
    return counts


def pair_scores(counts: np.ndarray, top: int | None = None) -> np.ndarray:
    """Per head: how often it appears in the top ``top`` ordered head pairs by ``counts`` (default n^2/4, i.e. the
    paper's n^2/2 head entries), ties at the cut credited fractionally."""
    n = counts.shape[0]
    top = (n * n) // 4 if top is None else top
    flat = counts.reshape(-1)
    if top <= 0:
        return np.zeros(n)
    order = np.sort(flat)[::-1]
    cut = order[min(top, len(order)) - 1]
    above = flat > cut
    tied = flat == cut
    weight = above.astype(float)
    if tied.any():
        weight[tied] = (top - above.sum()) / tied.sum()
    w = weight.reshape(n, n)
    return w.sum(1) + w.sum(0)


def code_run(outputs_pos: torch.Tensor, outputs_neg: torch.Tensor, seed: int, d_sae: int = 200, l1: float = 0.02,
             steps: int = 500, lr: float = 1e-3, train_prompts: int = 10, rescale: bool = False,
             null_code: bool = False) -> dict:
    """One seed of the method: draw ``train_prompts`` prompts from positives and negatives, train the SAE on their
    heads, code every prompt, score the heads. Returns codes, both scores and the stage's seconds. ``null_code``
    (not the paper's): see ``codes_of``."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(10_000 + seed)
    both = torch.cat([outputs_pos, outputs_neg])
    pick = torch.randperm(len(both), generator=g)[:train_prompts]
    train_x = both[pick].reshape(-1, both.shape[-1])
    sae, scale = train_code_sae(train_x, d_sae=d_sae, l1=l1, steps=steps, lr=lr, seed=seed, rescale=rescale)
    t_train = time.perf_counter() - t0
    cp = codes_of(sae, scale, outputs_pos, null_code=null_code)
    cn = codes_of(sae, scale, outputs_neg, null_code=null_code)
    k = d_sae + null_code
    node = node_scores(cp, cn, k)
    flip = flip_scores(cp, cn)
    tv = tv_scores(cp, cn, k)
    t_node = time.perf_counter() - t0
    counts = pair_counts(cp, cn, k)
    pair = pair_scores(counts)
    t_all = time.perf_counter() - t0
    with torch.no_grad():
        xs = train_x / scale
        f = sae.encode(xs)
        fvu = float((sae.decode(f) - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
        l0 = float((f > 0).float().sum(1).mean())
    return {"seed": seed, "codes_pos": cp, "codes_neg": cn, "node": node, "flip": flip, "tv": tv, "pair": pair,
            "train_prompts": pick.tolist(), "fvu": fvu, "l0": l0, "codes_used": int(len(np.unique(np.concatenate([cp, cn])))),
            "seconds": {"train": t_train, "codes_and_node": t_node - t_train, "pair": t_all - t_node, "total": t_all}}
