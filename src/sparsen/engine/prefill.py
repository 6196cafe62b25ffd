"""The C block-sparse prefill kernel (kernels/prefill_attention.c) for the HF forward, and a prefill timer.

Importing this module registers the kernel with ``core.prefill`` (the API and the CLI import it), so a prefill
plan's HF forward runs on it; without built kernels the torch version runs instead (``achieved()["attention"]
["prefill_backend"]`` says which). ``kernel_attention`` is exact softmax over a ``PrefillPattern``'s entries;
dense is the same kernel with every causal block. ``time_prefill_attention`` times dense SDPA, the kernel dense and
the kernel at a pattern on the same q, k, v (``scripts/time_prefill.py`` calls it at SmolLM2's shapes).
"""

from __future__ import annotations

import ctypes
import time

import torch

from sparsen.core.prefill import PrefillPattern, finish_pattern, n_blocks, pattern_entries, register_prefill_kernel
from sparsen.errors import SparsenError

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_FN = None
_FAILED: str | None = None


def _function():
    """sp_prefill_attention from the built kernels (SparsenError, remembered, when they are missing or stale)."""
    global _FN, _FAILED
    if _FN is not None:
        return _FN
    if _FAILED is not None:
        raise SparsenError(_FAILED)
    from sparsen.engine import REBUILD, kernels

    try:
        lib = kernels()
        fn = lib.sp_prefill_attention
    except SparsenError as e:
        _FAILED = str(e)
        raise
    except AttributeError:
        _FAILED = f"the built kernels have no prefill attention (built before it): {REBUILD}"
        raise SparsenError(_FAILED) from None
    fn.argtypes = [_p, _p, _p, _p, _i, _i, _i, _i, _i, _f, _p, _i, _p, _p, _i]
    fn.restype = _i
    _FN = fn
    return fn


def available() -> bool:
    """Whether the C prefill kernel can run here."""
    try:
        _function()
        return True
    except SparsenError:
        return False


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: PrefillPattern, scale: float,
                     threads: int | None = None) -> torch.Tensor:
    """Exact causal softmax over the pattern's entries: q [n_heads, n, d], k, v [n_kv, n, d] (float32) ->
    [n_heads, n, d]; ``core.prefill.block_sparse_attention``'s contract, in C (OpenMP, ``threads`` or torch's)."""
    fn = _function()
    H, n, d = q.shape
    n_kv = k.shape[0]
    q, k, v = (x.detach().float().contiguous() for x in (q, k, v))
    mask = pattern.mask.to(torch.uint8).contiguous()
    if tuple(mask.shape[1:]) != (n_blocks(n, pattern.block),) * 2:
        raise ValueError(f"pattern of {tuple(mask.shape)} blocks for {n} positions in blocks of {pattern.block}")
    cols = start = None
    if pattern.columns is not None:
        head, col = pattern.columns.nonzero(as_tuple=True)  # by head, then ascending
        cols = col.to(torch.int32).contiguous()
        start = torch.cat([torch.zeros(1, dtype=torch.int64),
                           torch.bincount(head, minlength=pattern.heads).cumsum(0)]).to(torch.int32)
    out = torch.empty(H, n, d, dtype=torch.float32)
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), H, n_kv, n, d, pattern.block, float(scale),
            mask.data_ptr(), pattern.heads, None if cols is None else cols.data_ptr(),
            None if start is None else start.data_ptr(), threads or torch.get_num_threads())
    if rc != 0:
        raise SparsenError(f"the prefill kernel failed ({'out of memory' if rc == -2 else 'bad shapes'}, code {rc}): "
                           "give fewer positions or report the shapes")
    return out


def dense_pattern(n: int, heads: int, block: int = 64) -> PrefillPattern:
    """Every causal block (the kernel then computes dense causal attention)."""
    nb = n_blocks(n, block)
    return finish_pattern(torch.ones(heads, nb, nb, dtype=torch.bool), n, block, (heads,))


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, OpenMP threads)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def time_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: PrefillPattern | None = None,
                           block: int = 64, repeats: int = 3, threads: int | None = None) -> dict:
    """Seconds (best of ``repeats``) for causal attention of q [n_heads, n, d], k, v [n_kv, n, d]: dense SDPA
    (torch, KV repeated per query head), the kernel dense, and the kernel at ``pattern`` (if given), with the
    pattern's density (entries computed over the causal ones) and the speed-ups."""
    H, n, d = q.shape
    n_kv = k.shape[0]
    scale = d ** -0.5
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    kk, vv = k.repeat_interleave(H // n_kv, 0), v.repeat_interleave(H // n_kv, 0)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q[None], kk[None], vv[None], is_causal=True, scale=scale)

    dense = dense_pattern(n, n_kv, block if pattern is None else pattern.block)
    out = {"n": n, "heads": H, "kv_heads": n_kv, "head_dim": d, "threads": threads or torch.get_num_threads(),
           "sdpa_dense_s": _best(sdpa, repeats),
           "kernel_dense_s": _best(lambda: kernel_attention(q, k, v, dense, scale, threads), repeats)}
    if pattern is not None:
        kept, causal = pattern_entries(pattern, n)
        out["density"] = kept / causal
        out["kernel_sparse_s"] = _best(lambda: kernel_attention(q, k, v, pattern, scale, threads), repeats)
        out["speedup_vs_sdpa"] = out["sdpa_dense_s"] / out["kernel_sparse_s"]
        out["speedup_vs_kernel_dense"] = out["kernel_dense_s"] / out["kernel_sparse_s"]
    return out


register_prefill_kernel(kernel_attention)
