"""Attention sites: which cached positions each new query reads (decode-time KV selection), or which blocks of the
prompt's own attention a prefill computes (block-sparse prefill).

A site ``layers.3.attn`` is one full-attention layer (sliding-window layers are local already and have none). Its
rule is a ``KVSelector`` (the methods live in ``methods/attention/``). In the Hugging Face forward the rules run as
a registered attention function (transformers' ``AttentionInterface``, name ``sparsen``): a query at or after the
sparsifier's ``dense_prefix`` reads only the keys its selector keeps, an earlier query (the prompt) reads every
causal key. That is decoding with selection, teacher-forced: the query at position t chooses among keys 0..t,
which is what the cache holds when t is decoded. One sequence per forward (batch 1); a forward whose first query
is position 0 starts a new sequence (a stateful selector such as H2O forgets the last one).

Accounting per layer, on the sparse queries: keys read (the union over a KV head's query heads: what a kernel
reads from the cache), causal keys, and the head_dim vectors the importance estimate reads (Quest's page bounds,
Double Sparsity's label cache; the oracle reads every key), each per KV head.

The other rule kind is a ``BlockSelector`` (block-sparse prefill): a forward whose first query is position 0 and
that has more than one query (a prompt prefill) computes, for every query, exact causal softmax over the blocks its
selector keeps (``core/prefill.py``; sink block and diagonal always); any later forward (a decode step, a cached
continuation) is dense, and ``dense_prefix`` does not apply to it. Accounting per layer: the (query, key) entries
computed over the causal ones, and the estimate's FLOPs over the dense QK^T's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

ATTN_IMPL = "sparsen"
QUERY_CHUNK = 256  # sparse queries scored together (bounds the [heads, chunk, keys] score tensor)


class KVSelector:
    """One layer's decode-time key selection. Subclasses set the class flags and implement ``keep``."""

    shared: bool = True
    """select per KV head from scores summed over its group's query heads (what saves KV reads); False: per query head"""
    needs_prefix_mass: bool = False
    """the selector wants the dense prompt's attention mass per key (``observe_prefix``), e.g. H2O"""

    def reset(self) -> None:
        """Forget the previous sequence (called when a forward starts at position 0)."""

    def observe_prefix(self, mass: torch.Tensor) -> None:
        """mass [n_kv (shared) or n_heads, n_keys]: attention probabilities of dense queries summed per key."""

    def keep(self, q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The keys each query reads: bool [n_kv, 1 (shared) or group, n, n_keys], inside the causal range.
        q [n_kv, group, n, d] (query head kv * group + j), k [n_kv, n_keys, d], qpos [n] absolute positions,
        scores [n_kv, group, n, n_keys]: the exact scaled logits, -inf outside the causal range."""
        raise NotImplementedError

    def estimate_reads(self, n_keys: torch.Tensor) -> torch.Tensor:
        """head_dim vectors read per KV head to choose, for queries with ``n_keys`` causal keys."""
        return torch.zeros_like(n_keys, dtype=torch.float64)


class BlockSelector:
    """One layer's block-sparse prefill rule. Subclasses set ``shared`` and ``block`` and implement ``blocks``."""

    shared: bool = True
    """one mask per KV head, from scores summed over its group's query heads; False: one per query head"""
    block: int = 64
    """positions per block, on both axes"""
    needs_prefix_mass: bool = False  # (a decode selector's flag; prefill rules never want it)

    def reset(self) -> None:
        """Nothing carries over between sequences."""

    def blocks(self, q: torch.Tensor, k: torch.Tensor, scale: float):
        """The key blocks each query block computes: bool [n_kv (shared) or n_heads, n_qblocks, n_kblocks], or a
        ``core.prefill.PrefillPattern`` that adds token-level columns. q [n_kv, group, n, d] (query head kv * group +
        j, after RoPE), k [n_kv, n, d], scale the softmax scale. The sink block and the diagonal are added and
        non-causal blocks dropped by the caller."""
        raise NotImplementedError

    def estimate_flops(self, n: int, d: int, n_heads: int, n_kv: int) -> float:
        """FLOPs (multiply and add: 2 each) the choice costs for a prefill of n positions, all heads of the layer."""
        return 0.0


def group_sum(x: torch.Tensor, shared: bool) -> torch.Tensor:
    """[n_kv, group, ...] -> [n_kv, 1, ...] summed over the group when selection is shared."""
    return x.sum(1, keepdim=True) if shared else x


def budget_tokens(n_keys: torch.Tensor, density: float | None, tokens: int | None) -> torch.Tensor:
    """Keys a query may read: ``tokens`` (absolute) or ceil(density * n_keys), within [1, n_keys]."""
    n = n_keys.to(torch.long)
    b = torch.full_like(n, int(tokens)) if tokens is not None else torch.ceil(n.double() * float(density) - 1e-9).long()
    return torch.minimum(b.clamp_min(1), n)


def outside_to_ninf(values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """values [n_kv, 1 or group, n, n_keys] set to -inf where ``scores`` (exact logits) are outside the causal range
    (the same for every query head of a group)."""
    return values.masked_fill(~torch.isfinite(scores[:, : values.shape[1]]), -torch.inf)


def top_budget(values: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """values [..., n, m] (-inf where not allowed), budget [n]: keep each row's ``budget`` largest (ties included)."""
    if values.shape[-1] == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    s = values.sort(dim=-1, descending=True).values
    idx = (budget - 1).clamp(0, values.shape[-1] - 1).view(*([1] * (values.dim() - 2)), -1, 1)
    thr = s.gather(-1, idx.expand(*s.shape[:-1], 1))
    return (values >= thr) & torch.isfinite(values)


# --- the registered attention function -----------------------------------------------------------------------------
class _LayerControl:
    def __init__(self, sp, layer: int, selector: KVSelector | None, observer: Callable | None = None):
        self.sp, self.layer, self.selector, self.observer = sp, layer, selector, observer


_ACTIVE: dict[int, _LayerControl] = {}  # id(attention module) -> its control while installed
_MODELS: dict[int, list] = {}  # id(model) -> [installed count, the attention implementation to restore]


def _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: dense (SDPA) unless a selector is installed on this module and enabled."""
    ctl = _ACTIVE.get(id(module))
    if ctl is None:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if ctl.observer is not None:
        ctl.observer(ctl.layer, query, key)
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    sp, sel = ctl.sp, ctl.selector
    if not sp.enabled or sp.observing_prompt:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if query.shape[0] != 1:
        raise ValueError("sparse attention runs one sequence at a time (batch 1)")
    n, nk = query.shape[2], key.shape[2]
    q0 = nk - n  # absolute position of the first query (the cache holds every earlier position)
    if isinstance(sel, BlockSelector):
        if q0 != 0 or n < 2:  # a decode step or a continuation on a cache: dense
            return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        return _prefill_attention(sp, ctl.layer, sel, query, key, value, attention_mask, scale), None
    if q0 == 0:
        sel.reset()
    first_sparse = min(max(sp.dense_prefix - q0, 0), n)
    if first_sparse == n and not sel.needs_prefix_mass:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    return _sparse_attention(sp, ctl.layer, sel, query, key, value, attention_mask, scale, q0, first_sparse), None


def _sparse_attention(sp, layer, sel, query, key, value, attention_mask, scale, q0, first_sparse):
    _, n_heads, n, d = query.shape
    n_kv, nk = key.shape[1], key.shape[2]
    g = n_heads // n_kv
    q = query[0].float().reshape(n_kv, g, n, d)
    k, v = key[0].float(), value[0].float()
    out = torch.empty(n_kv, g, n, d)
    key_pos = torch.arange(nk)
    chunks = [(a, min(a + QUERY_CHUNK, end)) for start, end in ((0, first_sparse), (first_sparse, n))
              for a in range(start, end, QUERY_CHUNK)]  # dense and sparse queries never share a chunk
    for a, b in chunks:
        qc = q[:, :, a:b]
        qpos = q0 + torch.arange(a, b)
        allowed = key_pos[None, :] <= qpos[:, None]  # [m, nk]
        if attention_mask is not None:
            m = attention_mask[0, 0, a:b]
            allowed = allowed & (m if m.dtype == torch.bool else m == 0)
        scores = torch.einsum("hgmd,hkd->hgmk", qc, k) * scale
        scores = scores.masked_fill(~allowed, -math.inf)
        if a >= first_sparse:
            keep = sel.keep(qc, k, qpos, scores) & allowed
            causal = allowed.sum(-1)
            sp.attn_tally.add(layer, kept=int(keep.any(1).sum()), causal=int(causal.sum()) * n_kv,
                              estimate=float(sel.estimate_reads(causal).sum()) * n_kv, queries=b - a)
            scores = scores.masked_fill(~keep, -math.inf)
        probs = torch.softmax(scores, dim=-1)
        if a < first_sparse and sel.needs_prefix_mass:
            sel.observe_prefix(group_sum(probs, sel.shared).sum(2).flatten(0, 1))
        out[:, :, a:b] = torch.einsum("hgmk,hkd->hgmd", probs, v)
    return out.reshape(n_heads, n, d).transpose(0, 1)[None].to(query.dtype)


def _prefill_attention(sp, layer, sel, query, key, value, attention_mask, scale):
    from sparsen.core.prefill import finish_pattern, pattern_entries, run_prefill

    _, n_heads, n, d = query.shape
    n_kv = key.shape[1]
    if attention_mask is not None:  # batch 1 without padding: the mask, if given, is the causal one
        m = attention_mask[0, 0]
        allowed = m if m.dtype == torch.bool else m == 0
        if not torch.equal(allowed, torch.ones(n, n, dtype=torch.bool).tril()):
            raise ValueError("block-sparse prefill takes a causal mask only (no padding, no sliding window)")
    q, k, v = query[0].float(), key[0].float(), value[0].float()
    with torch.no_grad():
        pattern = finish_pattern(sel.blocks(q.reshape(n_kv, n_heads // n_kv, n, d), k, scale), n, sel.block,
                                 (n_kv, n_heads))
        out, backend = run_prefill(q.contiguous(), k.contiguous(), v.contiguous(), pattern, scale)
    kept, causal = pattern_entries(pattern, n)
    per_head = n_heads // pattern.heads
    sp.attn_tally.add_prefill(layer, kept=kept * per_head, causal=causal * per_head,
                              estimate=sel.estimate_flops(n, d, n_heads, n_kv),
                              dense_qk=2.0 * d * n_heads * n * (n + 1) / 2, tokens=n, backend=backend)
    return out.transpose(0, 1)[None].to(query.dtype)


class AttnTally:
    """Per layer: keys read, causal keys and estimate vectors (per KV head, summed), and sparse queries seen; for
    prefill rules, (query, key) entries computed and causal (per query head, summed), estimate and dense QK^T FLOPs,
    prompt positions."""

    def __init__(self):
        self.layers: dict[int, list[float]] = {}
        self.prefill: dict[int, list[float]] = {}
        self.backends: set[str] = set()

    def add_prefill(self, layer: int, kept: int, causal: int, estimate: float, dense_qk: float, tokens: int,
                    backend: str) -> None:
        acc = self.prefill.setdefault(layer, [0, 0, 0.0, 0.0, 0])
        for i, x in enumerate((kept, causal, estimate, dense_qk, tokens)):
            acc[i] += x
        self.backends.add(backend)

    def add(self, layer: int, kept: int, causal: int, estimate: float, queries: int) -> None:
        acc = self.layers.setdefault(layer, [0, 0, 0.0, 0])
        acc[0] += kept
        acc[1] += causal
        acc[2] += estimate
        acc[3] += queries

    def summary(self, n_attn_layers: int) -> dict:
        """Density over the causal keys of the sparse queries: in the sparse layers, and over every attention layer
        (the dense ones read all their keys); ``read_density`` adds the estimate's vectors (K and V rows: 2 per key).
        With prefill rules, the ``prefill_*`` fields beside them (``_prefill_summary``)."""
        out = self._decode_summary(n_attn_layers)
        if self.prefill:
            out.update(self._prefill_summary(n_attn_layers))
        return out

    def _prefill_summary(self, n_attn_layers: int) -> dict:
        """Density of the prefill: (query, key) entries computed over the causal ones, in the sparse layers and over
        every attention layer (the dense ones compute all theirs); the estimate's FLOPs as a share of the dense QK^T
        FLOPs of the same layers (the QK^T alone: the dense attention's total is twice it, with PV)."""
        kept, causal, est, dense_qk = (sum(v[i] for v in self.prefill.values()) for i in range(4))
        dense = (n_attn_layers - len(self.prefill)) * causal / len(self.prefill)
        return {"prefill_density": kept / causal, "prefill_density_all_layers": (kept + dense) / (causal + dense),
                "prefill_estimate_share": est / dense_qk, "prefill_layers": sorted(self.prefill),
                "prefill_per_layer": {str(i): v[0] / v[1] for i, v in sorted(self.prefill.items())},
                "prefill_tokens": max(v[4] for v in self.prefill.values()),
                "prefill_backend": "+".join(sorted(self.backends))}

    def _decode_summary(self, n_attn_layers: int) -> dict:
        kept = sum(v[0] for v in self.layers.values())
        causal = sum(v[1] for v in self.layers.values())
        est = sum(v[2] for v in self.layers.values())
        if not causal:
            return {"density": None, "read_density": None, "sparse_layers": sorted(self.layers), "per_layer": {}}
        per_layer_causal = causal / len(self.layers)
        dense = (n_attn_layers - len(self.layers)) * per_layer_causal
        return {"density": kept / causal, "density_all_layers": (kept + dense) / (causal + dense),
                "read_density": (2 * kept + est) / (2 * causal),
                "read_density_all_layers": (2 * kept + est + 2 * dense) / (2 * (causal + dense)),
                "estimate_share": est / (2 * causal), "sparse_layers": sorted(self.layers),
                "per_layer": {str(i): v[0] / v[1] for i, v in sorted(self.layers.items())},
                "queries": max(v[3] for v in self.layers.values())}


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)  # masks as SDPA gets them (sliding windows included)


def install(sp, adapter, module, layer: int, selector: KVSelector | None = None, observer: Callable | None = None):
    """Route ``module``'s attention through ``attention_forward`` with ``selector`` (or ``observer(layer, q, k)``);
    returns a handle whose ``remove()`` undoes it (the model's attention implementation is restored with the last)."""
    _register()
    key = id(adapter.model)
    if key not in _MODELS:
        _MODELS[key] = [0, adapter.attention_implementation]
        adapter.attention_implementation = ATTN_IMPL
    _MODELS[key][0] += 1
    _ACTIVE[id(module)] = _LayerControl(sp, layer, selector, observer)
    return _Handle(adapter, module)


class _Handle:
    def __init__(self, adapter, module):
        self.adapter, self.module = adapter, module

    def remove(self) -> None:
        if _ACTIVE.pop(id(self.module), None) is None:
            return
        key = id(self.adapter.model)
        _MODELS[key][0] -= 1
        if _MODELS[key][0] == 0:
            self.adapter.attention_implementation = _MODELS.pop(key)[1]


@contextmanager
def capturing_qk(adapter, fn: Callable):
    """Call ``fn(layer, query, key)`` (after RoPE, [1, heads, n, d]) in every full-attention layer while inside."""
    handles = [install(None, adapter, b.attn, b.index, observer=fn) for b in adapter.blocks if b.sliding_window is None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capturing_prefix_mass(adapter, out: dict):
    """While inside, every forward fills ``out[layer]`` with the dense attention probabilities summed per key,
    [n_heads, n_keys] (what H2O accumulates over a prompt), computed in chunks of queries beside SDPA's output."""
    scale = adapter.attn_scale

    def observe(layer, query, key):
        q, k = query[0].float(), key[0].float()
        n_heads, n, d = q.shape
        n_kv, nk = k.shape[0], k.shape[1]
        q = q.reshape(n_kv, n_heads // n_kv, n, d)
        q0 = nk - n
        mass = torch.zeros(n_heads, nk, dtype=torch.float64)
        for a in range(0, n, QUERY_CHUNK):
            b = min(a + QUERY_CHUNK, n)
            end = q0 + b  # keys past the chunk's last query are outside every causal range: not computed
            s = torch.einsum("hgmd,hkd->hgmk", q[:, :, a:b], k[:, :end]) * scale
            tail = s[..., q0 + a:]  # only the chunk's own square can hold keys after a query
            tail.masked_fill_(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), -math.inf)
            mass[:, :end] += torch.softmax(s, -1).sum(2).reshape(n_heads, end).double()
        out[layer] = out[layer] + mass if layer in out else mass

    with capturing_qk(adapter, observe):
        yield out


def prime(sp, mass: dict) -> None:
    """Start a new sequence whose prompt was computed elsewhere (a shared dense prefix): every selector forgets
    the last one, and those that want it get the prompt's attention mass (``capturing_prefix_mass``)."""
    for name, sel in sp.attention_rules.items():
        sel.reset()
        if isinstance(sel, KVSelector) and sel.needs_prefix_mass:
            m = mass[sp.sites[name].layer]  # [n_heads, n_keys]
            n_kv = sp.adapter.n_kv_heads
            sel.observe_prefix(m.reshape(n_kv, -1, m.shape[-1]).sum(1) if sel.shared else m)


# --- plans --------------------------------------------------------------------------------------------------------
ATTENTION_METHODS: dict[str, Callable] = {}
"""name -> build(spec, adapter, tensors) -> {site: KVSelector or BlockSelector}: filled by ``methods/attention``,
which ``import sparsen`` imports (core imports nothing from methods)"""


def attention_rules(spec: dict, adapter, tensors: dict) -> dict[str, KVSelector | BlockSelector]:
    """The selectors (decode or prefill) of a plan's ``attention`` entry ({"method": name, "config": {...}}), by site."""
    from sparsen.errors import SparsenError

    name = spec.get("method")
    if name not in ATTENTION_METHODS:
        raise SparsenError(f"plan attention method '{name}' is unknown: choose one of {', '.join(ATTENTION_METHODS)}")
    return ATTENTION_METHODS[name](spec, adapter, tensors)
