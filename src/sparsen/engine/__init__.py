"""A batch-1 CPU decode engine for Llama-family models whose kernels skip the weights of inactive channels.

``Engine(lm, plan)`` copies the (plan-transformed) model's weights into kernel-friendly layouts and
decodes one token per C call (``kernels.c``: the whole forward inside one OpenMP parallel region).
The prompt is prefilled dense and every generated token runs the plan's rules: exactly the
``decode`` protocol of ``sparsen eval``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from sparsen.errors import SparsenError
from sparsen.models.adapters import LINEAR_NAMES

RULE_DENSE, RULE_THRESHOLD, RULE_TOPK, RULE_GAUSS, RULE_GATE_ACT = range(5)
DTYPES = ("fp32", "bf16")


class Rule(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("same_as_prev", ctypes.c_int), ("param", ctypes.c_float),
                ("thr", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p * 7), ("bias", ctypes.c_void_p * 7), ("norm1", ctypes.c_void_p),
                ("norm2", ctypes.c_void_p), ("basis", ctypes.c_void_p), ("rule", Rule * 7),
                ("lr_a", ctypes.c_void_p * 7), ("lr_b", ctypes.c_void_p * 7), ("lr_rank", ctypes.c_int * 7)]


class Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int), ("d", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("vocab", ctypes.c_int), ("max_seq", ctypes.c_int),
                ("wbf16", ctypes.c_int), ("eps", ctypes.c_float), ("layers", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("lm_head", ctypes.c_void_p), ("rope_cos", ctypes.c_void_p),
                ("rope_sin", ctypes.c_void_p), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("active", ctypes.c_void_p), ("seen", ctypes.c_void_p)]


_LIB = None


def kernels() -> ctypes.CDLL:
    """The compiled kernels (built by the package's install: `pip install -e .`, which `make` runs)."""
    global _LIB
    if _LIB is None:
        found = sorted(Path(__file__).parent.glob("_kernels*.so"))
        if not found:
            raise SparsenError("the engine's C kernels are not built: run `make test` or `pip install -e .` in the "
                               "sparsen checkout (needs gcc)")
        lib = ctypes.CDLL(str(found[0]))
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.decode_step.argtypes = [p, i, p, p, i]
        lib.decode_step.restype = i
        lib.gemv_axpy.argtypes = [p, i, i, i, p, p, i, p, i]
        lib.gemv_rows.argtypes = [p, i, i, i, p, p, i, p, i]
        lib.mask.argtypes = [i, f, p, p, i, p]
        lib.mask.restype = i
        lib.set_threads.argtypes = [i]
        _LIB = lib
    return _LIB


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def weight_array(w: torch.Tensor, dtype: str) -> np.ndarray:
    """A contiguous numpy copy of ``w`` in the engine's storage dtype (bf16 as raw uint16)."""
    w = w.detach().contiguous()
    if dtype == "bf16":
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()
    return w.to(torch.float32).numpy().copy()


def _entry_rule(entry: dict | None, plan, n_in: int) -> tuple[int, float, np.ndarray | None]:
    """(kind, param, thresholds [n_in] float32 or None) of a plan site entry."""
    if entry is None or entry["rule"] == "dense":
        return RULE_DENSE, 0.0, None
    kind = entry["rule"]

    def thresholds():
        if "tensor" in entry:
            return plan.tensors[entry["tensor"]].detach().to(torch.float32).numpy().copy()
        return np.full(n_in, float(entry["threshold"]), dtype=np.float32)

    if kind in ("threshold", "channel_threshold"):
        return RULE_THRESHOLD, 0.0, thresholds()
    if kind == "gate_act":
        return RULE_GATE_ACT, 0.0, thresholds()
    if kind == "topk":
        return RULE_TOPK, float(entry["sparsity"]), None
    if kind == "gaussian_topk":
        s = float(entry["sparsity"])
        z = float(torch.special.ndtri(torch.tensor((1.0 + s) / 2.0, dtype=torch.float64))) if s > 0 else 0.0
        return (RULE_GAUSS, z, None) if s > 0 else (RULE_DENSE, 0.0, None)
    raise SparsenError(f"the engine does not know plan rule '{kind}': recalibrate with this sparsen")


class Engine:
    """Batch-1 decoding of a Llama-family ``LoadedModel`` (optionally under a sparsity ``Plan``).

    The plan is applied to ``lm`` first (a rotation plan folds its rotation into lm's weights), then
    the weights are copied: W^T [in, out] for every block linear (up as [out, in] rows under a
    gate-activation rule), lm_head as [vocab, d] rows, in fp32 or bf16.
    """

    def __init__(self, lm, plan=None, dtype: str = "fp32", threads: int = 2, max_seq: int = 2048):
        if dtype not in DTYPES:
            raise SparsenError(f"weights dtype '{dtype}' is not supported: use one of {', '.join(DTYPES)}")
        if threads < 1:
            raise SparsenError("threads must be at least 1")
        self.lib = kernels()
        self.lm, self.plan, self.dtype, self.threads = lm, plan, dtype, threads
        added = 0
        if plan is not None:
            sp = plan.sparsifier(lm)  # checks the fingerprint; folds a rotation into lm's weights
            added = sp.added_params
        self.added_params = added
        cfg, ad = lm.config, lm.adapter
        self.d, self.inter, self.n_layers = ad.hidden_size, ad.intermediate_size, ad.n_layers
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, ad.head_dim
        self.vocab = ad.lm_head.weight.shape[0]
        self.max_seq = max_seq
        self._keep = []  # every array the C side points to stays alive here

        def keep(a):
            self._keep.append(a)
            return a

        sites = plan.sites if plan is not None else {}
        basis_at = {}
        if plan is not None and plan.transform == "residual_rotation" and "starts" in plan.tensors:
            from sparsen.methods.rotation import change_of_basis

            starts = plan.tensors["starts"].tolist()
            for s in range(1, len(starts)):
                basis_at[starts[s]] = keep(change_of_basis(plan.tensors["Q"], s).numpy().copy())
        self.params = {}
        layers = (Layer * self.n_layers)()
        for b in ad.blocks:
            L = layers[b.index]
            entries = {n: sites.get(f"layers.{b.index}.{n}") for n in LINEAR_NAMES}
            gate_act = entries["down"] is not None and entries["down"]["rule"] == "gate_act"
            for j, n in enumerate(LINEAR_NAMES):
                lin = b.linears[n]
                self.params[f"layers.{b.index}.{n}"] = lin.weight.numel()
                rows = n == "up" and gate_act
                L.w[j] = _ptr(keep(weight_array(lin.weight if rows else lin.weight.T, dtype)))
                L.bias[j] = _ptr(keep(lin.bias.detach().float().numpy().copy())) if lin.bias is not None else None
                kind, param, thr = _entry_rule(entries[n], plan, lin.in_features)
                if kind == RULE_GATE_ACT and n != "down":
                    raise SparsenError(f"plan puts a gate_act rule on layers.{b.index}.{n}: recalibrate it")
                L.rule[j].kind, L.rule[j].param = kind, param
                L.rule[j].thr = _ptr(keep(thr)) if thr is not None else None
                if entries[n] is not None and "lowrank" in entries[n]:  # R-Sparse (rule_from_entry checked it)
                    key = entries[n]["lowrank"]
                    A, B = plan.tensors[f"{key}.A"], plan.tensors[f"{key}.B"]
                    L.lr_a[j] = _ptr(keep(weight_array(A.T, dtype)))
                    L.lr_b[j] = _ptr(keep(weight_array(B.T, dtype)))
                    L.lr_rank[j] = A.shape[0]
                prev = {"k": "q", "v": "k", "up": "gate"}.get(n)
                L.rule[j].same_as_prev = int(prev is not None and entries[n] == entries[prev])
            L.norm1 = _ptr(keep(b.input_norm.weight.detach().float().numpy().copy()))
            L.norm2 = _ptr(keep(b.post_attn_norm.weight.detach().float().numpy().copy()))
            L.basis = _ptr(basis_at.get(b.index))
        self._layers = layers
        self.embed = ad.embed.weight.detach().float().numpy()
        with torch.no_grad():
            pos = torch.arange(max_seq)[None]
            cos, sin = lm.model.model.rotary_emb(torch.zeros(1, 1, self.d), pos)
        m = Model()
        m.n_layers, m.d, m.n_heads, m.n_kv, m.head_dim = self.n_layers, self.d, self.n_heads, self.n_kv, self.head_dim
        m.inter, m.vocab, m.max_seq, m.wbf16 = self.inter, self.vocab, max_seq, int(dtype == "bf16")
        m.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        m.layers = ctypes.addressof(layers)
        m.final_norm = _ptr(keep(ad.final_norm.weight.detach().float().numpy().copy()))
        m.lm_head = _ptr(keep(weight_array(ad.lm_head.weight, dtype)))
        m.rope_cos = _ptr(keep(cos[0].float().numpy().copy()))
        m.rope_sin = _ptr(keep(sin[0].float().numpy().copy()))
        kv = (self.n_layers, self.n_kv, max_seq, self.head_dim)
        self.k_cache, self.v_cache = keep(np.zeros(kv, np.float32)), keep(np.zeros(kv, np.float32))
        m.k_cache, m.v_cache = _ptr(self.k_cache), _ptr(self.v_cache)
        self.active = keep(np.zeros((self.n_layers, 7), np.int64))
        self.seen = keep(np.zeros((self.n_layers, 7), np.int64))
        m.active, m.seen = _ptr(self.active), _ptr(self.seen)
        self._model = m
        self.logits = np.zeros(self.vocab, np.float32)
        self.pos = 0

    # --- decoding -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0
        self.active[:] = 0
        self.seen[:] = 0

    def step(self, token: int, dense: bool = False) -> np.ndarray:
        """Run one token at the next position; returns its logits (a buffer reused by the next call)."""
        if self.pos >= self.max_seq:
            raise SparsenError(f"the context is full ({self.max_seq} tokens): raise --max-seq or shorten the run")
        self.lib.set_threads(self.threads)
        emb = np.ascontiguousarray(self.embed[int(token)])
        rc = self.lib.decode_step(ctypes.byref(self._model), self.pos, _ptr(emb), _ptr(self.logits), int(dense))
        if rc != 0:
            raise RuntimeError(f"decode_step failed at position {self.pos}")
        self.pos += 1
        return self.logits

    def prefill(self, ids) -> np.ndarray:
        """The prompt, dense (as a dense prefill would compute it); returns the last position's logits."""
        self.reset()
        if len(ids) == 0:
            raise SparsenError("the prompt is empty: give at least one token")
        for t in ids:
            logits = self.step(int(t), dense=True)
        return logits

    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None, on_token=None) -> list[int]:
        """Prefill ``ids`` dense, then decode up to ``max_new_tokens`` sparse tokens (greedy unless temperature > 0)."""
        rng = np.random.default_rng(seed)
        logits = self.prefill(ids)
        out = []
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            if i + 1 < max_new_tokens:
                logits = self.step(tok)
        return out

    # --- accounting ---------------------------------------------------------------------------
    def achieved(self) -> dict:
        """Sparsity achieved on the sparse (decoded) tokens so far: share of block-linear weight bytes skipped,
        parameter-weighted, less the weights a plan adds per token (a change of basis)."""
        per_site = {}
        for b in range(self.n_layers):
            for j, n in enumerate(LINEAR_NAMES):
                seen = int(self.seen[b, j])
                per_site[f"layers.{b}.{n}"] = 1.0 - self.active[b, j] / seen if seen else 0.0
        total = sum(self.params.values())
        skipped = sum(per_site[s] * p for s, p in self.params.items()) / total
        return {"overall": skipped - self.added_params / total, "skipped": skipped, "per_site": per_site}


def sample(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def bytes_per_token(engine: Engine, sparsity: float, context: float) -> float:
    """Bytes read per token: block linears at ``sparsity``, lm_head and the KV cache (fp32) dense."""
    wbytes = 2 if engine.dtype == "bf16" else 4
    block = sum(engine.params.values()) * wbytes
    head = engine.vocab * engine.d * wbytes
    kv = engine.n_layers * 2 * engine.n_kv * engine.head_dim * context * 4
    return block * (1 - sparsity) + head + kv

