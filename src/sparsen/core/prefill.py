"""Block-sparse causal prefill: the pattern a ``BlockSelector`` returns, its exact attention, its accounting.

A pattern is a bool mask of kept (query block, key block) pairs per mask head (a KV head when selection is shared,
else a query head), plus optional token-level key columns that every later query of the head reads (MInference's
vertical lines). Blocks are ``block`` positions on both axes; the last block may be partial. Every pattern keeps
the sink block (key block 0) and the diagonal, and nothing above the diagonal (``finish_pattern``).

Attention over a pattern is exact softmax over the kept entries only: a query block reads the keys of its kept
blocks (the diagonal block causally) and the extra columns that are not in a kept block. The torch version here is
the reference and the fallback; a compiled kernel registered with ``register_prefill_kernel`` (sparsen.engine.prefill
registers the C one on import) computes the same thing faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PrefillPattern:
    mask: torch.Tensor
    """bool [mask_heads, n_qblocks, n_kblocks]: kept blocks (mask_heads: n_kv when shared, else n_heads)"""
    block: int
    columns: torch.Tensor | None = None
    """bool [mask_heads, n]: key columns read by every later query, beside the blocks (None: none)"""

    @property
    def heads(self) -> int:
        return self.mask.shape[0]


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_sizes(n: int, block: int) -> torch.Tensor:
    """Positions in each block (the last may be partial): [n_blocks]."""
    return (n - torch.arange(n_blocks(n, block)) * block).clamp_max(block)


def finish_pattern(raw, n: int, block: int, heads: tuple[int, ...]) -> PrefillPattern:
    """A selector's output (a mask or a PrefillPattern) with the sink block and the diagonal forced and nothing
    non-causal; ``heads`` the mask head counts allowed (n_kv, n_heads)."""
    p = raw if isinstance(raw, PrefillPattern) else PrefillPattern(raw, block)
    nb = n_blocks(n, block)
    if p.block != block or tuple(p.mask.shape[1:]) != (nb, nb) or p.mask.shape[0] not in heads:
        raise ValueError(f"a prefill selector returned a mask of shape {tuple(p.mask.shape)} for {nb} blocks of {block}")
    i = torch.arange(nb)
    causal = i[:, None] >= i[None, :]
    forced = (i[None, :] == 0) | (i[:, None] == i[None, :])
    mask = (p.mask.bool() | forced) & causal
    cols = None
    if p.columns is not None and bool(p.columns.any()):
        if tuple(p.columns.shape) != (p.mask.shape[0], n):
            raise ValueError(f"prefill columns of shape {tuple(p.columns.shape)} for {p.mask.shape[0]} heads, {n} keys")
        cols = p.columns.bool()
    return PrefillPattern(mask, block, cols)


def extra_columns(p: PrefillPattern, n: int) -> torch.Tensor:
    """Per mask head and query block, the columns read outside the kept blocks (all before the block): [h, nqb]."""
    nb = p.mask.shape[1]
    if p.columns is None:
        return torch.zeros(p.heads, nb, dtype=torch.long)
    per_block = torch.zeros(p.heads, nb, dtype=torch.long)
    per_block.index_add_(1, torch.arange(n) // p.block, p.columns.long())  # columns in each key block
    i = torch.arange(nb)
    before = i[:, None] > i[None, :]
    return (per_block[:, None, :] * (before & ~p.mask)).sum(-1)


def pattern_entries(p: PrefillPattern, n: int) -> tuple[int, int]:
    """(kept, causal) (query, key) entries per mask head summed: what a kernel computes (the diagonal block's
    causal triangle, whole off-diagonal blocks, the extra columns) and the causal entries n (n + 1) / 2 each."""
    rows = block_sizes(n, p.block)
    full = rows[:, None] * rows[None, :]
    entries = torch.where(torch.eye(len(rows), dtype=torch.bool), rows * (rows + 1) // 2, full)
    kept = int((p.mask.long() * entries).sum()) + int((extra_columns(p, n) * rows).sum())
    return kept, p.heads * n * (n + 1) // 2


def key_lists(p: PrefillPattern, qb: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys query block ``qb`` reads, per mask head, ascending: index [h, L] and valid [h, L] (heads that read
    fewer keys are padded with key 0, invalid)."""
    B = p.block
    end = min((qb + 1) * B, n)
    keep = p.mask[:, qb].repeat_interleave(B, dim=1)[:, :end]
    if p.columns is not None:
        keep = keep | (p.columns[:, :end] & (torch.arange(end) < qb * B))
    counts = keep.sum(1)
    L = int(counts.max())
    head, key = keep.nonzero(as_tuple=True)  # sorted by head, then key
    slot = torch.arange(len(key)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    index = torch.zeros(p.heads, L, dtype=torch.long)
    valid = torch.zeros(p.heads, L, dtype=torch.bool)
    index[head, slot] = key
    valid[head, slot] = True
    return index, valid


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: PrefillPattern,
                           scale: float) -> torch.Tensor:
    """Exact causal softmax over the pattern's entries only, one query block at a time (torch: SDPA on the gathered
    keys, the diagonal's causal part and the padding between heads masked): q [n_heads, n, d], k, v [n_kv, n, d]
    -> [n_heads, n, d]. Query head h reads KV head h // group and mask head h // group (shared) or h."""
    H, n, d = q.shape
    n_kv = k.shape[0]
    g = H // n_kv
    mh = p.heads
    gm = H // mh  # query heads per mask head
    kv_of_mask = torch.arange(mh) * gm // g
    qh = q.reshape(mh, gm, n, d)
    out = torch.empty(mh, gm, n, d, dtype=q.dtype)
    B = p.block
    for qb in range(n_blocks(n, B)):
        a, b = qb * B, min((qb + 1) * B, n)
        index, valid = key_lists(p, qb, n)
        L = index.shape[1]
        kk = k[kv_of_mask[:, None], index][:, None].expand(mh, gm, L, d)  # [mh, gm, L, d]: the gathered keys only
        vv = v[kv_of_mask[:, None], index][:, None].expand(mh, gm, L, d)
        allowed = valid[:, None, :] & (index[:, None, :] <= torch.arange(a, b)[None, :, None])  # [mh, m, L]
        out[:, :, a:b] = torch.nn.functional.scaled_dot_product_attention(qh[:, :, a:b], kk, vv,
                                                                          attn_mask=allowed[:, None], scale=scale)
    return out.reshape(H, n, d)


# --- a compiled kernel, when one is registered ------------------------------------------------------------------
_KERNEL: list[Callable] = []


def register_prefill_kernel(fn: Callable) -> None:
    """``fn(q, k, v, pattern, scale) -> out`` (block_sparse_attention's contract) runs the HF prefill from now on; it
    may raise ``SparsenError`` when it cannot run here (the torch version then runs)."""
    _KERNEL[:] = [fn]


def run_prefill(q, k, v, p: PrefillPattern, scale: float, backend: str = "auto") -> tuple[torch.Tensor, str]:
    """Attention over a pattern with the registered kernel if there is one ('auto', 'kernel') or in torch;
    returns the output and the backend that ran."""
    from sparsen.errors import SparsenError

    if backend != "torch" and _KERNEL:
        try:
            return _KERNEL[0](q, k, v, p, scale), "kernel"
        except SparsenError:
            if backend == "kernel":
                raise
    elif backend == "kernel":
        raise SparsenError("no prefill kernel is registered: import sparsen.engine.prefill (needs the built kernels)")
    return block_sparse_attention(q, k, v, p, scale), "torch"


# --- helpers the prefill methods share -----------------------------------------------------------------------------
def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over each block of positions (dim -2; the last block over the positions it has): [..., n, d] ->
    [..., n_blocks, d]."""
    n = x.shape[-2]
    nb = n_blocks(n, block)
    pad = nb * block - n
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], dim=-2)
    sums = x.reshape(*x.shape[:-2], nb, block, x.shape[-1]).sum(-2)
    return sums / block_sizes(n, block).to(x.dtype)[:, None]


def block_causal(nb: int) -> torch.Tensor:
    """bool [nb, nb]: key block <= query block."""
    i = torch.arange(nb)
    return i[:, None] >= i[None, :]


def rank_desc(values: torch.Tensor) -> torch.Tensor:
    """Each entry's rank in its row (dim -1), largest first, ties by position: 0 for the largest."""
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(values.shape[-1]).expand_as(order).contiguous())


def diagonal_sums(p: torch.Tensor, q0: int) -> torch.Tensor:
    """Sum of p [..., m, n] (queries at positions q0..q0+m-1, keys 0..n-1) along each causal diagonal: out[..., o]
    sums the entries with query - key = o, o in [0, n)."""
    m, n = p.shape[-2:]
    out = p.new_zeros(*p.shape[:-2], n)
    for i in range(m):  # query q0 + i: key j lies on diagonal q0 + i - j, so its causal keys reversed are o = 0, 1, ...
        t = q0 + i
        out[..., : t + 1] += p[..., i, : t + 1].flip(-1)
    return out


def cover_count(dist: torch.Tensor, mass: torch.Tensor | float) -> torch.Tensor:
    """How many of the largest entries (dim -1) it takes for their sum to reach ``mass`` (at least 1)."""
    s = dist.sort(dim=-1, descending=True).values.cumsum(-1)
    target = torch.as_tensor(mass, dtype=s.dtype)
    return ((s < target.unsqueeze(-1) - 1e-12).sum(-1) + 1).clamp_max(dist.shape[-1])
