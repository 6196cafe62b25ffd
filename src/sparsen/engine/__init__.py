"""A batch-1 CPU decode engine whose kernels skip the weights of inactive channels (Llama family, Gemma 3).

``Engine(lm, plan)`` copies the (plan-transformed) model's weights into kernel-friendly layouts and decodes one
token per C call (``kernels/``: the whole forward inside one OpenMP parallel region). The prompt is prefilled
dense and every generated token runs the plan's rules: exactly the ``decode`` protocol of ``sparsen eval``.

The engine never changes ``lm``: a plan whose weight transform (a rotation) ``lm`` does not carry is applied to a
deep copy, the engine's weights are taken from the copy, and the copy is dropped.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsen.core.rules import (
    ExpertRule,
    GateActRule,
    GaussianTopKRule,
    LowRankCompensated,
    RuleKind,
    ThresholdRule,
    TopKRule,
    rule_from_entry,
)
from sparsen.core.sites import Site, SiteKind, model_sites
from sparsen.engine.cpu import cpu_flags
from sparsen.engine.quant import W_BF16, W_F32, Packed, head_bound, head_bound_refusal, pack
from sparsen.errors import SparsenError
from sparsen.models.adapters import LINEAR_NAMES
from sparsen.models.gguf_weights import QuantTensor, read_gguf_weights, unsupported_tensor
from sparsen.models.kv import cache_of
from sparsen.models.loading import stop_ids  # noqa: F401  (engine.stop_ids, as before)

ABI_VERSION = 9
"""must equal SP_ABI_VERSION in kernels/sparsen.h (bumped with any change to the structs below)"""
DTYPES = ("fp32", "bf16", "gguf")  # gguf: the model file's own quantized weights (engine.quant)
KV_DTYPES = {"fp32": np.float32, "fp16": np.float16}  # the KV cache's storage (fp16: IEEE half)
CODE_TILE = 64  # keys per tile of the int8 label cache (SP_CODE_TILE)
# A 4-bit linear whose plan keeps fewer of its inputs than this is stored as runs (engine.quant): reading whole active
# runs beats the tile-major product at low density and breaks even near half (BENCHMARKS.md, "The 50% point at 47cb2c3").
RUNS_BELOW_DENSITY = 0.4
RUNS_MAX_OUT = 8192  # SP_Q4_RUNS_MAX_OUT
ATTN_METHODS = {"oracle-topk": 1, "oracle-topp": 2, "sink-window": 3, "h2o": 4, "quest": 5, "double-sparsity": 6,
                "sketch": 7}
"""the attention methods the kernels run (enum sp_attn_method), by their name in sparsen.methods.attention"""
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # enum sp_activation
N_LIN = len(LINEAR_NAMES)
REBUILD = "rebuild them with `pip install -e .` in the sparsen checkout"

_p, _i, _f, _d = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_double


class Rule(ctypes.Structure):  # sp_rule
    _fields_ = [("kind", _i), ("same_as_prev", _i), ("param", _f), ("thr", _p)]


class Weight(ctypes.Structure):  # sp_weight
    _fields_ = [("type", _i), ("block", _i), ("scale_f32", _i), ("stride", _i), ("data", _p), ("scale", _p),
                ("min", _p)]


class Layer(ctypes.Structure):  # sp_layer
    _fields_ = [("w", Weight * N_LIN), ("bias", _p * N_LIN), ("attn_norm", _p), ("mlp_norm", _p), ("attn_out_norm", _p),
                ("mlp_out_norm", _p), ("q_norm", _p), ("k_norm", _p), ("basis", _p), ("rope_cos", _p),
                ("rope_sin", _p), ("window", _i), ("attn_select", _i), ("rule", Rule * N_LIN), ("lr_a", _p * N_LIN),
                ("lr_b", _p * N_LIN), ("lr_rank", _i * N_LIN), ("router", _p), ("router_bias", _p), ("experts", _p),
                ("n_experts", _i), ("expert_size", _i), ("top_k", _i)]


class HeadBoundC(ctypes.Structure):  # sp_head_bound
    _fields_ = [("rows", _i), ("nib", _p), ("bits", _p), ("scale", _p)]


class Model(ctypes.Structure):  # sp_model
    _fields_ = [("n_layers", _i), ("d", _i), ("n_heads", _i), ("n_kv", _i), ("head_dim", _i), ("inter", _i),
                ("vocab", _i), ("max_seq", _i), ("wbf16", _i), ("activation", _i), ("eps", _f), ("attn_scale", _f),
                ("embed_scale", _f), ("logit_softcap", _f), ("layers", _p), ("embed", _p), ("final_norm", _p),
                ("lm_head", Weight), ("kv_f16", _i), ("k_cache", _p), ("v_cache", _p), ("active", _p), ("seen", _p),
                ("blocks", _p), ("mask_sum", _p), ("attn", _p), ("timing", _p), ("head_bound", _p),
                ("head_tally", _p)]


class Attn(ctypes.Structure):  # sp_attn
    _fields_ = [("method", _i), ("sel_heads", _i), ("tokens", _i), ("density", _d), ("p", _d), ("recent_share", _d),
                ("sinks", _i), ("local", _i), ("page", _i), ("min_pages", _i), ("max_pages", _i), ("rank", _i),
                ("lab_heads", _i), ("label_scale", _f), ("proj", _p), ("qproj", _p),
                ("label_bits", _i), ("labels", _p), ("codes", _p), ("code_scale", _p),
                ("kmin", _p), ("kmax", _p), ("mass", _p), ("held", _p), ("tally", _p)]


STRUCTS = {"sp_rule": (0, Rule), "sp_layer": (1, Layer), "sp_model": (2, Model), "sp_attn": (3, Attn),
           "sp_weight": (4, Weight), "sp_head_bound": (5, HeadBoundC)}
"""name: (SP_STRUCT_*, ctypes)"""

STATUS = {  # enum sp_status
    -1: "the position is outside the context (max_seq)",
    -2: "the token id is outside the vocabulary",
    -3: "a model dimension or weight is missing or misshapen",
    -4: "the number of attention heads is not a multiple of the number of key-value heads",
    -5: "out of memory for the engine's workspace",
    -6: "the workspace does not fit this model or thread count",
    -7: "a plan rule the kernels cannot run",
    -8: "an attention selection the kernels cannot run (method, sizes or state buffers)",
}


def _status(rc: int) -> str:
    return STATUS.get(rc, f"kernel status {rc}")


def open_kernels(path: str | Path, abi_version: int = ABI_VERSION) -> ctypes.CDLL:
    """Load the kernel library at ``path`` and check it is the build this Python expects (ABI version, every shared
    struct's size, the rule numbering); anything else is a stale build and is refused with a one-line error."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise SparsenError(f"the engine's C kernels could not be loaded ({str(e).splitlines()[0]}): install the "
                           f"OpenMP runtime (libgomp) or {REBUILD}") from None
    try:
        lib.sp_abi_version.restype = _i
        version = lib.sp_abi_version()
    except AttributeError:
        version = None
    if version != abi_version:
        raise SparsenError(f"the engine's C kernels are a stale build (ABI {version}, this sparsen needs "
                           f"{abi_version}): {REBUILD}")
    lib.sp_isa.restype = ctypes.c_char_p
    isa = _isa(lib)
    flags = cpu_flags()
    missing = [f for f in isa if f not in flags] if flags else []
    if missing:
        raise SparsenError(f"the engine's C kernels were built for another CPU (they use {', '.join(missing)}, which "
                           f"this one lacks): {REBUILD}")
    lib.sp_struct_size.argtypes, lib.sp_struct_size.restype = [_i], ctypes.c_long
    for name, (which, cls) in STRUCTS.items():
        if lib.sp_struct_size(which) != ctypes.sizeof(cls):
            raise SparsenError(f"the engine's C kernels disagree with this sparsen on sizeof({name}) "
                               f"({lib.sp_struct_size(which)} vs {ctypes.sizeof(cls)} bytes): {REBUILD}")
    lib.sp_rule_kinds.restype = ctypes.c_char_p
    kinds = "".join(f"{k.name}={k.value}," for k in RuleKind)
    if lib.sp_rule_kinds().decode() != kinds:
        raise SparsenError(f"the engine's C kernels number the rule kinds differently ({lib.sp_rule_kinds().decode()} "
                           f"vs {kinds}): {REBUILD}")
    lib.sp_attn_methods.restype = ctypes.c_char_p
    methods = "".join(f"{k.upper().replace('-', '_')}={v}," for k, v in ATTN_METHODS.items())
    if lib.sp_attn_methods().decode() != methods:
        raise SparsenError(f"the engine's C kernels number the attention methods differently "
                           f"({lib.sp_attn_methods().decode()} vs {methods}): {REBUILD}")
    lib.sp_workspace_create.argtypes, lib.sp_workspace_create.restype = [_p, _i, ctypes.POINTER(_i)], _p
    lib.sp_workspace_free.argtypes, lib.sp_workspace_free.restype = [_p], None
    lib.sp_decode_step.argtypes, lib.sp_decode_step.restype = [_p, _p, _i, _i, _p, _i, _i], _i
    lib.sp_head_bound_vectorized.argtypes, lib.sp_head_bound_vectorized.restype = [], _i
    tests = {"sp_test_gemv": [_p, _i, _i, _p, _p, _i, _p, _i], "sp_test_dot_rows": [_p, _i, _i, _p, _p, _i, _p, _i],
             "sp_test_mask": [_i, _f, _p, _p, _i, _p], "sp_test_top_budget": [_p, _i, _i, _p],
             "sp_test_head": [_p, _p, _i, _i, _p, _p, _i, _f, _i]}
    for name, args in tests.items():  # the ops' test hooks (an older build, as scripts/kernel_ab.py loads, may lack one)
        if hasattr(lib, name):
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, _i
    return lib


def _planned_density(entry: dict | None) -> float:
    """The share of a linear's inputs its plan entry aims to keep (1 without a rule, or one that names no share)."""
    share = None if entry is None else entry.get("target", entry.get("sparsity"))
    return 1.0 - float(share) if share is not None else 1.0


def _isa(lib: ctypes.CDLL) -> list[str]:
    return [f for f in lib.sp_isa().decode().split(",") if f]


def kernel_isa() -> list[str]:
    """The instruction-set extensions the loaded kernels were compiled with (cpuinfo names)."""
    return _isa(kernels())


def library_path() -> Path | None:
    """The built kernel library inside the package, if the install built one."""
    found = sorted(Path(__file__).parent.glob("_kernels*.so"))
    return found[0] if found else None


_LIB = None


def kernels() -> ctypes.CDLL:
    """The compiled kernels (built by the package's install: `pip install -e .`, which `make` runs)."""
    global _LIB
    if _LIB is None:
        path = library_path()
        if path is None:
            raise SparsenError("the engine's C kernels are not built (sparsen was installed without a C compiler with "
                               "OpenMP): install gcc and libgomp, then run `pip install -e .` in the sparsen checkout")
        _LIB = open_kernels(path)
    return _LIB


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def weight_array(w: torch.Tensor, dtype: str) -> np.ndarray:
    """A contiguous numpy copy of ``w`` in the engine's storage dtype (bf16 as raw uint16, rounded to nearest)."""
    w = w.detach().contiguous()
    if dtype == "bf16":
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()
    return w.to(torch.float32).numpy().copy()


def c_weight(w, keep=_ptr) -> Weight:
    """The sp_weight of a packed quantized weight (``engine.quant.Packed``) or of a plain fp32 / bf16 (uint16) array
    whose last axis is a stored row; ``keep`` returns an array's address (and keeps it alive)."""
    cw = Weight()
    if isinstance(w, Packed):
        cw.type, cw.block, cw.stride, cw.scale_f32 = w.type, w.block, w.stride, int(w.scale.dtype == np.float32)
        cw.data, cw.scale, cw.min = keep(w.data), keep(w.scale), keep(w.min)
    else:
        cw.type, cw.stride, cw.data = (W_BF16 if w.dtype == np.uint16 else W_F32), w.shape[-1], keep(w)
    return cw


def _gguf_source(lm) -> Path | None:
    """The .gguf file ``lm`` was loaded from, if it was."""
    source = Path(str(getattr(lm, "source", "")))
    return source if source.suffix.lower() == ".gguf" and source.is_file() else None


def gguf_refusal(lm, plan) -> str | None:
    """Why the engine cannot run ``plan`` on the quantized weights of ``lm``'s GGUF file, or None if it can."""
    source = _gguf_source(lm)
    if source is None:
        return f"model '{lm.spec}' was not loaded from a .gguf file"
    if (bad := unsupported_tensor(source)) is not None:
        return f"its tensor '{bad[0]}' is {bad[1]}, which the engine does not run quantized"
    if plan is not None and (plan.transform is not None or plan.residual_changes()):
        return (f"the {plan.method} plan changes the weights (a rotation or tuned weights), which cannot keep the "
                "file's quantization")
    if plan is not None:
        for entry in plan.sites.values():
            if entry.get("rule") == "experts" or "lowrank" in entry:  # R-Sparse's factors, MoEfication's regrouping
                return (f"the {plan.method} plan adds weights or regroups the MLP's channels, which the file's "
                        "quantized blocks cannot follow")
    return None


def choose_weights(lm, plan) -> tuple[str, str | None]:
    """The engine's default weights for ``lm`` under ``plan``: the GGUF file's own ("gguf") when it can run them,
    else bf16 for a GGUF model (with the reason) and fp32 for any other."""
    why = gguf_refusal(lm, plan)
    if why is None:
        return "gguf", None
    return ("bf16", why) if _gguf_source(lm) is not None else ("fp32", None)


def _check_file_weight(qt, weight: torch.Tensor, site: str) -> None:
    """The file's tensor is this model's weight: its first block of every row dequantizes to the model's values."""
    w = weight.detach()
    if tuple(w.shape) != qt.shape:
        raise SparsenError(f"the GGUF tensor '{qt.name}' is {qt.shape}, the model's {site} {tuple(w.shape)}: the file "
                           "is not this model's; use --weights fp32")
    B = qt.block
    first = QuantTensor(qt.name, qt.qtype, qt.bits, B, qt.codes[:, :B], qt.scale[:, :1],
                        None if qt.min is None else qt.min[:, :1]).dequantize()
    if not np.array_equal(first, w[:, :B].to(torch.float32).numpy()):
        raise SparsenError(f"the GGUF tensor '{qt.name}' does not dequantize to the model's {site}: the file is not "
                           "this model's; use --weights fp32")


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy().copy()


def _c_rule(rule, n_in: int, site: str) -> tuple[int, float, np.ndarray | None]:
    """(kind, param, thresholds [n_in] float32 or None) of a runtime rule (``core.rules``) for the kernels."""
    if isinstance(rule, LowRankCompensated):
        rule = rule.base
    if rule is None:
        return RuleKind.DENSE, 0.0, None
    if isinstance(rule, (ThresholdRule, GateActRule)):
        t = rule.threshold
        thr = _f32(t) if isinstance(t, torch.Tensor) else np.full(n_in, float(t), np.float32)
        if thr.shape != (n_in,):
            raise SparsenError(f"the plan's thresholds for {site} have shape {thr.shape}, not ({n_in},): recalibrate")
        return rule.kind, 0.0, thr
    if isinstance(rule, ExpertRule):
        if rule.router is None:
            raise SparsenError(f"the engine cannot run the oracle router on {site} (it needs the dense MLP): evaluate "
                               "it with `sparsen eval`, or calibrate moefy with its linear router")
        return rule.kind, 0.0, None
    if isinstance(rule, TopKRule):
        return rule.kind, float(rule.sparsity), None
    if isinstance(rule, GaussianTopKRule):
        return (rule.kind, rule.z, None) if rule.sparsity > 0 else (RuleKind.DENSE, 0.0, None)
    raise SparsenError(f"the engine cannot run the rule {type(rule).__name__} on {site}: evaluate it with `sparsen eval`")


def _transformed_copy(lm, plan):
    """A deep copy of ``lm`` carrying ``plan``'s weight transform; ``lm`` itself is left as it was."""
    twin = lm.copy()
    plan.transform_(twin)
    return twin


def _model_option(lm, name: str):
    """A model option the adapter states, else the config's (e.g. Gemma's final_logit_softcapping)."""
    return getattr(lm.adapter, name, getattr(lm.config, name, None))


def prompt_ids(lm, text: str, chat: bool) -> list[int]:
    """The prompt's token ids: the text without special tokens, except the BOS its tokenizer adds (Gemma decodes
    garbage without it; SmolLM2's tokenizer adds none), or the chat template's user turn with ``chat``."""
    tok = lm.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise SparsenError(f"model '{lm.spec}' has no chat template: drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise SparsenError("the prompt is empty: pass some text with --prompt")
    bos = tok.bos_token_id
    if bos is not None and ids[0] != bos and tok(text, add_special_tokens=True)["input_ids"][:1] == [bos]:
        ids.insert(0, bos)
    return ids


@dataclass
class TorchPrefix:
    """A prompt's dense torch forward (``Engine.torch_prefix``): what ``Engine.prefill(ids, via="torch")`` copies in."""

    ids: list[int]
    model: object  # the torch model it ran on (engines on other weights refuse it)
    keys: list  # per layer [n_kv, positions, head_dim] after RoPE (a sliding layer may hold only its window)
    values: list
    mass: dict | None  # layer -> [n_heads, n] attention probability summed per key, or None
    logits: np.ndarray  # the last position's


class Engine:
    """Batch-1 decoding of a ``LoadedModel`` (Llama family or Gemma 3), optionally under a sparsity ``Plan``.

    ``plan`` None takes ``lm.plan`` (the plan ``sparsen.sparsify_`` applied), or decodes dense if there is none.
    ``lm`` is never changed: if the plan has a weight transform that ``lm`` does not carry, the weights come from a
    transformed deep copy (memory for a second model while the engine is built). The weights are copied: W^T
    [in, out] for every block linear (up as [out, in] rows under a gate-activation rule), lm_head as [vocab, d]
    rows, in fp32 or bf16 (``dtype``), or, with ``dtype="gguf"``, the model file's own quantized codes, scales and
    minima (``engine.quant``: never requantized, so the products equal the fp32 model's up to summation order; plans
    that rotate or add weights cannot use them: ``gguf_refusal``); norms, biases and the embedding stay fp32.
    ``max_seq``: the context, prompt and generated tokens together. ``kv_dtype``: the KV cache's storage, fp32 or fp16
    (IEEE half). ``greedy_head``: on a GGUF's int8 (Q8_0) lm_head, greedy steps (``step(..., greedy=True)``, greedy
    ``generate``) bound every logit from the codes' top five bits and dot only the rows that can be the largest
    (``kernels/head.c``; needs AVX-512 VNNI, else every row is dotted): the same token, fewer bytes.

    A plan with an ``attention`` entry (``sparsen.methods.attention``) selects keys on every generated token in
    its full-attention layers past ``dense_layers``: the kernels estimate, choose the positions and read only those
    K and V rows (``kernels/select.c``); the method's state (Quest's page summaries, the label cache of projected
    keys, H2O's mass) lives in numpy arrays here, updated by the kernels on every token, the prompt's included.
    """

    def __init__(self, lm, plan=None, dtype: str = "fp32", threads: int = 2, max_seq: int = 2048,
                 kv_dtype: str = "fp32", greedy_head: bool = True):
        if dtype not in DTYPES:
            raise SparsenError(f"weights dtype '{dtype}' is not supported: use one of {', '.join(DTYPES)}")
        if kv_dtype not in KV_DTYPES:
            raise SparsenError(f"KV cache dtype '{kv_dtype}' is not supported: use one of {', '.join(KV_DTYPES)}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SparsenError(f"threads {threads!r}: give a whole number of 1 or more")
        if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 1:
            raise SparsenError(f"max_seq {max_seq!r}: give a whole number of 1 or more")
        self.lib = kernels()
        if plan is None:
            plan = getattr(lm, "plan", None)
        carries = getattr(lm, "transform_key", None) is not None
        if plan is None and carries:
            raise SparsenError("this model carries a plan's weight transform but no plan: pass that plan, "
                               "Engine(lm, plan), or load the model again for a dense engine")
        if plan is not None and plan.transform is None and carries:  # its changes of basis would be missing
            raise SparsenError(f"this model carries another plan's weight transform, which this {plan.method} plan "
                               "does not have: load the model again")
        src, added, selectors = lm, 0, {}
        if plan is not None and plan.attention is not None and plan.attention.get("method") not in ATTN_METHODS:
            raise SparsenError(f"the engine cannot run the attention method '{plan.attention.get('method')}' (it runs "
                               f"{', '.join(ATTN_METHODS)}): score it with `sparsen attn-eval`")
        if dtype == "gguf" and (why := gguf_refusal(lm, plan)) is not None:
            raise SparsenError(f"the engine cannot run on the GGUF's quantized weights: {why}; use --weights bf16 "
                               "or fp32")
        if plan is not None:
            plan.check_model(lm)
            if not plan.carried_by(lm):
                src = _transformed_copy(lm, plan)
            sp = plan.build_sparsifier(src)  # also checks the plan's sites, factors and attention config
            added, selectors = sp.added_params, sp.attention_rules
        self.lm, self.plan, self.dtype, self.threads, self.max_seq = lm, plan, dtype, threads, max_seq
        self.kv_dtype, self.added_params, self.greedy_head = kv_dtype, added, bool(greedy_head)
        self._keep: list[np.ndarray] = []  # every array the C side points to stays alive here
        self._build(src, plan)
        self._build_attention(src.adapter, plan, selectors)
        status = _i(0)
        ws = self.lib.sp_workspace_create(ctypes.byref(self._model), threads, ctypes.byref(status))
        if not ws:
            raise SparsenError(f"the engine cannot run this model: {_status(status.value)}")
        self._ws = ws
        self._free = weakref.finalize(self, self.lib.sp_workspace_free, ws)
        self.logits = np.zeros(self.vocab, np.float32)
        self.pos = 0

    def _keep_ptr(self, a: np.ndarray | None) -> int | None:
        if a is None:
            return None
        self._keep.append(a)
        return _ptr(a)

    def _build(self, src, plan) -> None:
        """Fill the C structs from ``src`` (lm or its transformed copy), reading it through its adapter only."""
        ad, dtype, keep = src.adapter, self.dtype, self._keep_ptr
        self._src, self._held = src, {}
        self.packed = None  # gguf: {site: engine.quant.Packed}, "lm_head" included
        self.mask_sum = None  # record_masks()
        self.timing = None  # time_linears()
        self.head_bound = None  # gguf: the greedy steps' bound on the lm_head (engine.quant.HeadBound), or None
        gw = None
        if dtype == "gguf":
            gw = read_gguf_weights(src.source, ad.n_layers, ad.n_heads, ad.n_kv_heads)
            self.packed = {}
        self.d, self.inter, self.n_layers = ad.hidden_size, ad.intermediate_size, ad.n_layers
        self.n_heads, self.n_kv, self.head_dim = ad.n_heads, ad.n_kv_heads, ad.head_dim
        self.vocab = ad.vocab_size
        if self.n_heads % self.n_kv:
            raise SparsenError(f"the engine needs the attention heads ({self.n_heads}) to be a multiple of the "
                               f"key-value heads ({self.n_kv}): this model cannot run on it")
        if self.head_dim % 2:
            raise SparsenError(f"the engine's RoPE needs an even head_dim, not {self.head_dim}")
        if ad.mlp_activation not in ACTIVATIONS:
            raise SparsenError(f"the engine has no kernel for the activation '{ad.mlp_activation}': use one of "
                               f"{', '.join(ACTIVATIONS)}")
        if _model_option(src, "attn_logit_softcapping") is not None:
            raise SparsenError("the engine does not implement attention-logit softcapping, which this model uses")
        if ad.embed.weight.shape[0] != self.vocab:
            raise SparsenError(f"the embedding has {ad.embed.weight.shape[0]} rows and the lm_head {self.vocab}: the "
                               "engine needs one vocabulary for both")
        # accounting: the sites and their weights (modules dropped, so a transformed copy is not kept alive)
        all_sites = model_sites(ad)
        self.sites = {name: Site(name, s.kind, s.layer, s.part, None, s.params) for name, s in all_sites.items()
                      if s.kind is SiteKind.LINEAR_INPUT}
        self.params = {name: s.params for name, s in self.sites.items()}
        self.n_attn_layers = sum(s.kind is SiteKind.ATTENTION for s in all_sites.values())
        self.windows = [int(b.sliding_window or 0) for b in ad.blocks]

        sites = plan.sites if plan is not None else {}
        tensors = plan.tensors if plan is not None else {}
        basis_at = {int(i): _f32(R) for i, R in plan.residual_changes().items()} if plan is not None else {}
        tables = {}
        for key, (cos, sin) in ad.rope_tables(self.max_seq).items():
            if tuple(cos.shape) != (self.max_seq, self.head_dim) or cos.shape != sin.shape:
                raise SparsenError(f"the adapter's rotary table '{key}' is {tuple(cos.shape)}, not "
                                   f"({self.max_seq}, {self.head_dim}): the engine cannot use it")
            tables[key] = (keep(_f32(cos)), keep(_f32(sin)))
        layers = (Layer * self.n_layers)()
        # (a build without the symbol, such as kernel_ab's other commit, has no runs layout)
        runs_vectorized = hasattr(self.lib, "sp_q4_runs_vectorized") and self.lib.sp_q4_runs_vectorized() == 1
        for b in ad.blocks:
            L = layers[b.index]
            entries = {n: sites.get(f"layers.{b.index}.{n}") for n in LINEAR_NAMES}
            rules = {n: rule_from_entry(e, tensors) if e is not None else None for n, e in entries.items()}
            gate_act, experts = isinstance(rules["down"], GateActRule), isinstance(rules["down"], ExpertRule)
            if gate_act and rules["up"] is not None:
                raise SparsenError(f"the plan has a rule on layers.{b.index}.up beside the gate-activation rule on its "
                                   "down (the engine reads up by the active rows): recalibrate")
            if experts and (rules["up"] is not None or rules["gate"] is not None):
                raise SparsenError(f"the plan has a rule on layers.{b.index}.gate or up beside the experts rule on its "
                                   "down (the engine reads both by the routed rows): recalibrate")
            if experts and (b.linears["gate"].bias is not None or b.linears["up"].bias is not None):
                raise SparsenError("the engine's routed experts read gate and up without biases, which this model has")
            order = None
            if experts:  # the MLP's channels stored expert after expert: a routed expert is one run of rows
                r = rules["down"]
                if len({len(x) for x in r.groups}) != 1:
                    raise SparsenError(f"the experts of layers.{b.index} differ in size: the engine needs equal experts")
                order = torch.cat(r.groups)
            for j, n in enumerate(LINEAR_NAMES):
                lin, site = b.linears[n], f"layers.{b.index}.{n}"
                rows = (n == "up" and gate_act) or (n in ("gate", "up") and experts)
                if gw is not None:
                    _check_file_weight(gw.linears[b.index, n], lin.weight, site)
                    qt = gw.linears[b.index, n]
                    if (not rows and qt.bits == 4 and runs_vectorized and qt.shape[0] <= RUNS_MAX_OUT
                            and _planned_density(entries[n]) < RUNS_BELOW_DENSITY):
                        self.packed[site] = pack(qt, transposed=True, runs=True)
                    else:
                        self.packed[site] = pack(qt, transposed=not rows)
                    L.w[j] = c_weight(self.packed[site], keep)
                else:
                    w = lin.weight if rows else lin.weight.T
                    if order is not None and n in ("gate", "up", "down"):
                        w = w[order]  # gate, up: their rows; down: the rows of W^T (its input channels)
                    L.w[j] = c_weight(weight_array(w, dtype), keep)
                L.bias[j] = keep(_f32(lin.bias)) if lin.bias is not None else None
                n_in = self.inter if isinstance(rules[n], GateActRule) else lin.in_features
                kind, param, thr = _c_rule(rules[n], n_in, site)
                if kind in (RuleKind.GATE_ACT, RuleKind.EXPERTS) and n != "down":
                    raise SparsenError(f"the plan puts a {kind.name.lower()} rule on {site}: it belongs on a down site; "
                                       "recalibrate")
                L.rule[j].kind, L.rule[j].param, L.rule[j].thr = int(kind), param, keep(thr)
                if plan is not None and plan.hold == "prompt" and type(rules[n]) is ThresholdRule:
                    self._held[site] = (thr, thr.copy())  # the array C reads, and the calibrated thresholds
                if isinstance(rules[n], LowRankCompensated):  # R-Sparse (rule_from_entry checked the factors)
                    A, B = rules[n].A, rules[n].B
                    L.lr_a[j], L.lr_b[j] = keep(weight_array(A.T, dtype)), keep(weight_array(B.T, dtype))
                    L.lr_rank[j] = A.shape[0]
                prev = {"k": "q", "v": "k", "up": "gate"}.get(n)
                L.rule[j].same_as_prev = int(prev is not None and entries[n] == entries[prev])
            if experts:  # in the stored order expert e's channels are e * size ... (e + 1) * size - 1
                L.experts = keep(np.arange(self.inter, dtype=np.int32))
                L.router = keep(_f32(r.router))
                L.router_bias = keep(_f32(r.bias)) if r.bias is not None else None
                L.n_experts, L.expert_size, L.top_k = r.n_experts, len(r.groups[0]), r.k
            L.attn_norm, L.mlp_norm = keep(_f32(ad.norm_gain(b.attn_norm))), keep(_f32(ad.norm_gain(b.mlp_norm)))
            for field in ("attn_out_norm", "mlp_out_norm", "q_norm", "k_norm"):
                norm = getattr(b, field)
                setattr(L, field, keep(_f32(ad.norm_gain(norm))) if norm is not None else None)
            if b.rope not in tables:
                raise SparsenError(f"layer {b.index} names the rotary table '{b.rope}', which the adapter does not build")
            L.rope_cos, L.rope_sin = tables[b.rope]
            L.window = int(b.sliding_window or 0)
            L.basis = keep(basis_at.get(b.index))
        self._layers = layers

        m = Model()
        m.n_layers, m.d, m.n_heads, m.n_kv, m.head_dim = self.n_layers, self.d, self.n_heads, self.n_kv, self.head_dim
        m.inter, m.vocab, m.max_seq, m.wbf16 = self.inter, self.vocab, self.max_seq, int(dtype == "bf16")
        m.activation = ACTIVATIONS[ad.mlp_activation]
        m.eps, m.attn_scale, m.embed_scale = float(ad.norm_eps), float(ad.attn_scale), float(ad.embed_scale)
        m.logit_softcap = float(_model_option(src, "final_logit_softcapping") or 0.0)
        m.layers = ctypes.addressof(layers)
        embed = _f32(ad.embed.weight)
        m.embed = keep(embed)
        m.final_norm = keep(_f32(ad.norm_gain(ad.final_norm)))
        tied = ad.lm_head.weight.data_ptr() == ad.embed.weight.data_ptr()
        if gw is not None:
            _check_file_weight(gw.lm_head, ad.lm_head.weight, "lm_head")
            head = self.packed["lm_head"] = pack(gw.lm_head, transposed=False)
            m.lm_head = c_weight(head, keep)
            if self.greedy_head and self.lib.sp_head_bound_vectorized() and head_bound_refusal(head) is None:
                hb = self.head_bound = head_bound(head)
                self._head_bound_c = HeadBoundC(hb.rows, keep(hb.nib), keep(hb.bits), keep(hb.scale))
                m.head_bound = ctypes.addressof(self._head_bound_c)
        else:
            m.lm_head = c_weight(embed if tied and dtype == "fp32" else weight_array(ad.lm_head.weight, dtype), keep)
        self.head_tally = np.zeros(2, np.int64)  # greedy steps with the bound, lm_head rows they dotted exactly
        m.head_tally = keep(self.head_tally)
        kv = (self.n_layers, self.n_kv, self.max_seq, self.head_dim)
        self.k_cache, self.v_cache = np.zeros(kv, KV_DTYPES[self.kv_dtype]), np.zeros(kv, KV_DTYPES[self.kv_dtype])
        m.kv_f16 = int(self.kv_dtype == "fp16")
        m.k_cache, m.v_cache = keep(self.k_cache), keep(self.v_cache)
        self.active = np.zeros((self.n_layers, N_LIN), np.int64)
        self.seen = np.zeros((self.n_layers, N_LIN), np.int64)
        self.blocks = np.zeros((self.n_layers, N_LIN), np.int64)  # quantized: blocks whose scales were read
        m.active, m.seen, m.blocks = keep(self.active), keep(self.seen), keep(self.blocks)
        self._model = m

    def _build_attention(self, ad, plan, selectors: dict) -> None:
        """The plan's KV selection as the kernels run it (sp_attn) with its state arrays, or none."""
        self._attn = self.attn_state = None
        self.attn_layers: list[int] = []
        if plan is None or plan.attention is None:
            return
        from sparsen.methods.attention import get_attention_method

        name = plan.attention["method"]
        cfg = get_attention_method(name).config(**plan.attention.get("config", {}))
        self.attn_layers = sorted(int(site.split(".")[1]) for site in selectors)
        if not self.attn_layers:  # dense_layers covers every full-attention layer
            return
        n_layers, n_kv, nh, hd, S = self.n_layers, self.n_kv, self.n_heads, self.head_dim, self.max_seq
        A = Attn()
        A.method = ATTN_METHODS[name]
        # sink-window chooses the same keys for every head: one list per KV head, as its selector returns
        A.sel_heads = G = n_kv if cfg.shared or name == "sink-window" else nh
        budget = cfg.budget if cfg.budgeted else {"density": 1.0, "tokens": None}
        A.tokens, A.density = int(budget["tokens"] or 0), float(budget["density"] or 1.0)
        A.p = float(getattr(cfg, "p", 1.0))
        state = {"tally": np.zeros((n_layers, 4), np.float64)}
        if name == "sink-window":
            A.sinks = cfg.sinks
        elif name == "h2o":
            A.recent_share = float(cfg.recent_share)
            state["mass"] = np.zeros((n_layers, G, S), np.float64)
            state["held"] = np.ones((n_layers, G, S), np.uint8)
        elif name == "quest":
            A.page, A.min_pages = cfg.page_size, cfg.min_pages
            A.max_pages = -(-S // cfg.page_size)
            pages = (n_layers, n_kv, A.max_pages, hd)
            state["kmin"] = np.zeros(pages, KV_DTYPES[self.kv_dtype])
            state["kmax"] = np.zeros(pages, KV_DTYPES[self.kv_dtype])
        elif name in ("double-sparsity", "sketch"):
            if name == "sketch" and cfg.bits not in (0, 8):
                raise SparsenError(f"the engine keeps 8-bit or fp32 sketches, not {cfg.bits}-bit: make the plan with "
                                   "bits=8 (or 0)")
            bases = {layer: _label_basis(name, selectors[f"layers.{layer}.attn"], n_kv, hd) for layer in self.attn_layers}
            first = next(iter(bases.values()))[0]
            A.lab_heads, A.rank = first.shape[0], first.shape[2]
            state["proj"] = np.zeros((n_layers, A.lab_heads, hd, A.rank), np.float32)
            state["qproj"] = np.zeros_like(state["proj"])
            for layer, (Pq, Pk) in bases.items():
                state["qproj"][layer], state["proj"][layer] = Pq, Pk
            if name == "sketch":  # sketch.py: sinks and a local window forced, the group-summed softmax of estimates
                sel = selectors[f"layers.{self.attn_layers[0]}.attn"]
                A.sinks, A.local = int(sel.sinks), int(sel.local)
                A.label_scale, A.label_bits = float(sel.scale), int(sel.bits)
            else:
                A.label_scale = 1.0
            if A.label_bits:  # int8 codes in tiles of CODE_TILE keys, channel-major within a tile; a scale per key
                tiles = -(-S // CODE_TILE)
                state["codes"] = np.zeros((n_layers, A.lab_heads, tiles, A.rank, CODE_TILE), np.int8)
                state["code_scale"] = np.zeros((n_layers, A.lab_heads, S), np.float32)
            else:
                state["labels"] = np.zeros((n_layers, A.lab_heads, A.rank, S), np.float32)  # channel-major
        for field, arr in state.items():
            setattr(A, field, self._keep_ptr(arr))
        for layer in self.attn_layers:
            if self.windows[layer]:
                raise SparsenError(f"the plan selects keys in layer {layer}, a sliding-window layer: make the plan again")
            self._layers[layer].attn_select = 1
        self._attn, self.attn_state, self.attn_method = A, state, name
        self._model.attn = ctypes.addressof(A)

    def record_masks(self) -> np.ndarray:
        """Turn on a checksum of the masks: [n_layers, 7] uint64, each sparse token adding a hash of every linear's
        active channels (gate-activation rules: of down's), so two engines that chose the same masks agree on it."""
        if self.mask_sum is None:
            self.mask_sum = np.zeros((self.n_layers, N_LIN), np.uint64)
            self._model.mask_sum = self._keep_ptr(self.mask_sum)
        return self.mask_sum

    def time_linears(self, on: bool = True) -> np.ndarray | None:
        """Turn on (or off) timing the block linears: [threads, 7, 3] float64, per thread and linear (LINEAR_NAMES
        order) summed over layers and steps, seconds in its product, seconds waiting for the other threads after it,
        and products; zero it to start a count. Two clock reads per product, so leave it off where rates count."""
        if not on:
            self.timing, self._model.timing = None, None
            return None
        self.timing = np.zeros((self.threads, N_LIN, 3), np.float64)
        self._model.timing = self._keep_ptr(self.timing)
        return self.timing

    def lm_head_rows_dotted(self) -> float | None:
        """The lm_head rows a greedy step with the ``head_bound`` dotted, on average since the last reset (None: no
        such step)."""
        steps, rows = self.head_tally
        return rows / steps if steps else None

    # --- decoding -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the context, the sparsity counts and the KV selection's sequence state."""
        self.pos = 0
        self.active[:] = 0
        self.seen[:] = 0
        self.blocks[:] = 0
        self.head_tally[:] = 0
        if self.attn_state is not None:
            self.attn_state["tally"][:] = 0
            if "mass" in self.attn_state:
                self.attn_state["mass"][:] = 0
                self.attn_state["held"][:] = 1

    def step(self, token: int, dense: bool = False, greedy: bool = False) -> np.ndarray:
        """Run one token at the next position; returns its logits (a buffer reused by the next call). ``greedy``: only
        their largest is needed; with a ``head_bound`` the logits are then exact where they can be the largest and
        -inf elsewhere (the same argmax, first of ties included)."""
        token = int(token)
        if not 0 <= token < self.vocab:
            raise SparsenError(f"token id {token} is outside the vocabulary [0, {self.vocab}): check the tokenizer")
        if self.pos >= self.max_seq:
            raise SparsenError(f"the context is full ({self.max_seq} tokens): raise max_seq or shorten the run")
        rc = self.lib.sp_decode_step(ctypes.byref(self._model), self._ws, self.pos, token, _ptr(self.logits),
                                     int(dense), int(greedy))
        if rc != 0:
            raise SparsenError(f"the engine refused the token at position {self.pos}: {_status(rc)}")
        self.pos += 1
        return self.logits

    def greedy_steps(self, token: int, n: int) -> int:
        """Decode ``n`` greedy tokens after ``token``, each step's argmax fed to the next (the timed loop of ``bench``
        and the profiling scripts: no tokens kept); returns the last."""
        for _ in range(n):
            token = int(np.argmax(self.step(token, greedy=True)))
        return token

    def prefill(self, ids, via: str = "engine", prefix: TorchPrefix | None = None) -> np.ndarray:
        """The prompt, dense (as a dense prefill would compute it); returns the last position's logits.
        ``via="engine"`` steps the kernels token by token; ``via="torch"`` runs the prompt through the torch model in
        one forward and copies its KV cache in (minutes faster at thousands of tokens), or takes ``prefix``
        (``torch_prefix``: one forward shared by engines on the same weights)."""
        if via not in ("engine", "torch"):
            raise SparsenError(f"prefill via '{via}' is unknown: use 'engine' or 'torch'")
        self.reset()
        if len(ids) == 0:
            raise SparsenError("the prompt is empty: give at least one token")
        if len(ids) > self.max_seq:
            raise SparsenError(f"the prompt's {len(ids)} tokens do not fit the engine's context of {self.max_seq}: "
                               "build it with a larger max_seq")
        if self._held:
            self._hold_on(ids)
        if via == "torch":
            return self._load_prefix(prefix if prefix is not None else self.torch_prefix(ids), [int(t) for t in ids])
        for t in ids:
            logits = self.step(int(t), dense=True)
        return logits

    @property
    def needs_prefix_mass(self) -> bool:
        """H2O: a torch prefill must capture the prompt's attention mass."""
        return self.attn_state is not None and "mass" in self.attn_state

    def torch_prefix(self, ids, mass: bool | None = None) -> TorchPrefix:
        """One dense forward of the torch model this engine's weights come from (the plan's transform applied):
        every layer's cached K (after RoPE) and V, the last logits, and with ``mass`` (default: if this engine
        needs it) the prompt's attention mass per key (``core.attention.capturing_prefix_mass``)."""
        from contextlib import nullcontext

        from sparsen.core.attention import capturing_prefix_mass

        ids = [int(t) for t in ids]
        for t in ids:
            if not 0 <= t < self.vocab:
                raise SparsenError(f"token id {t} is outside the vocabulary [0, {self.vocab}): check the tokenizer")
        src = self._src
        captured: dict | None = {} if (self.needs_prefix_mass if mass is None else mass) else None
        with torch.no_grad(), capturing_prefix_mass(src.adapter, captured) if captured is not None else nullcontext():
            out = src.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
        return TorchPrefix(ids, src.model, [c.keys[0] for c in cache.layers], [c.values[0] for c in cache.layers],
                           captured, out.logits[0, -1].float().numpy())

    def _load_prefix(self, prefix: TorchPrefix, ids: list[int]) -> np.ndarray:
        """Copy a torch forward's KV cache in, in the cache's dtype, and rebuild the selection state from it as the
        kernels would have built it key by key (Quest's page summaries, the label cache, H2O's mass)."""
        if prefix.model is not self._src.model or prefix.ids != ids:
            raise SparsenError("this torch prefix is of another prompt or other weights: make it with this engine's "
                               "torch_prefix(ids)")
        if self.needs_prefix_mass and prefix.mass is None:
            raise SparsenError("this torch prefix has no attention mass, which H2O needs: make it with "
                               "torch_prefix(ids, mass=True)")
        n = len(ids)
        for layer in range(self.n_layers):
            k, v = prefix.keys[layer], prefix.values[layer]  # [n_kv, n or a window, head_dim]
            held = k.shape[1]  # a sliding-window layer's cache may hold only its last positions
            if tuple(k.shape) != (self.n_kv, held, self.head_dim) or held > n or (held < n and not self.windows[layer]):
                raise SparsenError(f"the torch cache of layer {layer} is {tuple(k.shape)}, not ({self.n_kv}, {n}, "
                                   f"{self.head_dim}): prefill via='engine'")
            self.k_cache[layer, :, n - held:n] = k.float().numpy()
            self.v_cache[layer, :, n - held:n] = v.float().numpy()
        if self.attn_state is not None:
            self._rebuild_selection(n, prefix.mass)
        self.pos = n
        self.logits[:] = prefix.logits
        return self.logits

    def _rebuild_selection(self, n: int, mass: dict) -> None:
        """The selection state of positions [0, n) from the cache, as the kernels update it key by key."""
        st, A = self.attn_state, self._attn
        for layer in self.attn_layers:
            k = self.k_cache[layer, :, :n].astype(np.float32)  # as stored (rounded to half with an fp16 cache)
            if "kmin" in st:
                page = A.page
                for p in range(-(-n // page)):
                    rows = self.k_cache[layer, :, p * page:min((p + 1) * page, n)]
                    st["kmin"][layer, :, p] = rows.min(1)
                    st["kmax"][layer, :, p] = rows.max(1)
            if "proj" in st:
                per = A.lab_heads // self.n_kv
                kk = np.repeat(k, per, axis=0)  # label head lh reads KV head lh // per
                lab = np.einsum("hnd,hdr->hnr", kk, st["proj"][layer]).astype(np.float32)
                if A.label_bits:  # the sketch's own rounding, as select.c does it
                    from sparsen.methods.attention.sketch import quantize

                    q, sc = (t.numpy() for t in quantize(torch.from_numpy(lab), A.label_bits))
                    codes = np.zeros((lab.shape[0], -(-n // CODE_TILE) * CODE_TILE, A.rank), np.int8)
                    codes[:, :n] = q
                    tiles = codes.reshape(lab.shape[0], -1, CODE_TILE, A.rank).transpose(0, 1, 3, 2)
                    st["codes"][layer, :, :tiles.shape[1]] = tiles
                    st["code_scale"][layer, :, :n] = sc[..., 0]
                else:
                    st["labels"][layer, :, :, :n] = lab.transpose(0, 2, 1)
            if "mass" in st:
                m = mass[layer].numpy()  # [n_heads, n]
                G = A.sel_heads
                st["mass"][layer, :, :n] = m.reshape(G, -1, n).sum(1) if G != self.n_heads else m

    def _hold_on(self, ids) -> None:
        """A 'prompt'-hold plan: rescale each held site's thresholds so the prompt's dense inputs reach its level
        (the scales measured by the torch sparsifier on a dense pass over the prompt, as ``eval`` measures them)."""
        sp = self.plan.build_sparsifier(self._src)
        with torch.no_grad(), sp.observing():
            self._src.model(torch.tensor([list(ids)], dtype=torch.long))
        for site, (thr, calibrated) in self._held.items():
            thr[:] = calibrated * np.float32(sp.scales.get(site, 1.0))

    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id=None, on_token=None) -> list[int]:
        """Prefill ``ids`` dense, then decode up to ``max_new_tokens`` sparse tokens (greedy unless temperature > 0),
        stopping after ``eos_token_id`` (an id or a collection of ids)."""
        if len(ids) + max_new_tokens - 1 > self.max_seq:
            raise SparsenError(f"{len(ids)} prompt tokens and {max_new_tokens} new ones do not fit the engine's "
                               f"context of {self.max_seq}: build it with a larger max_seq")
        stop = set() if eos_token_id is None else ({int(eos_token_id)} if np.isscalar(eos_token_id)
                                                   else {int(t) for t in eos_token_id})
        rng = np.random.default_rng(seed)
        logits = self.prefill(ids)
        out = []
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, rng)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stop:
                break
            if i + 1 < max_new_tokens:
                logits = self.step(tok, greedy=temperature <= 0)
        return out

    def generate_text(self, prompt: str, max_new_tokens: int = 64, chat: bool = False, **sampling) -> str:
        """The text generated after ``prompt`` (tokenized without special tokens, or as a chat user turn with
        ``chat``); ``sampling``: temperature, top_p, seed (greedy by default). Stops at an EOS (``stop_ids``)."""
        ids = prompt_ids(self.lm, prompt, chat)
        tokens = self.generate(ids, max_new_tokens, eos_token_id=stop_ids(self.lm), **sampling)
        return self.lm.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- accounting ---------------------------------------------------------------------------
    def achieved(self) -> dict:
        """Sparsity achieved on the sparse (decoded) tokens so far (``core.accounting.achieved``): the share of
        block-linear weight bytes skipped, parameter-weighted, less the weights the plan adds per token."""
        from sparsen.core.accounting import Tally, achieved

        tally = Tally()
        for b in range(self.n_layers):
            for j, n in enumerate(LINEAR_NAMES):
                seen = int(self.seen[b, j])
                tally.add(f"layers.{b}.{n}", seen - int(self.active[b, j]), seen)
        out = achieved(self.sites, tally, self.added_params)
        if self.plan is not None and self.plan.attention is not None:
            out["attention"] = self.attention_tally().summary(self.n_attn_layers)
        return out

    def attention_bytes(self, context: float) -> dict:
        """Bytes the attention reads per token with ``context`` cached positions: ``kv`` (K and V rows) and
        ``estimate`` (Quest's page summaries, the label cache, the oracle's K rows). A selecting layer counts what its
        tally says it read per sparse token so far (dense if it has none); the others read min(context, window)."""
        kvb = np.dtype(KV_DTYPES[self.kv_dtype]).itemsize
        row = self.n_kv * self.head_dim * kvb  # one position's K (or V), all KV heads
        tally = self.attn_state["tally"] if self.attn_state is not None else None
        est_bytes = {"quest": kvb, "oracle-topk": kvb, "oracle-topp": kvb}.get(getattr(self, "attn_method", None), 4)
        kv = est = 0.0
        for layer, w in enumerate(self.windows):
            if tally is not None and tally[layer, 3] > 0:
                q = tally[layer, 3]
                kv += 2 * tally[layer, 0] / q * self.head_dim * kvb
                est += tally[layer, 2] / q * self.head_dim * est_bytes
            else:
                kv += 2 * min(context, w or context) * row
        return {"kv": kv, "estimate": est}

    def attention_tally(self):
        """The KV selection's counts as ``core.attention.AttnTally`` (per sparse layer: keys read, causal keys,
        estimate vectors, sparse tokens), so its ``summary`` is ``Sparsifier.achieved()["attention"]``."""
        from sparsen.core.attention import AttnTally

        t = AttnTally()
        if self.attn_state is not None:
            for layer, (kept, causal, est, queries) in enumerate(self.attn_state["tally"]):
                if queries:
                    t.add(layer, int(kept), int(causal), float(est), int(queries))
        return t


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
    """Bytes read per token: block linears at ``sparsity``, lm_head, and the attention's reads at ``context`` cached
    positions (``Engine.attention_bytes``: every position, a sliding layer its window, a selecting layer what it
    read)."""
    block, head = weight_bytes(engine, sparsity)
    return block + head + sum(engine.attention_bytes(context).values())


def weight_bytes(engine: Engine, sparsity: float) -> tuple[float, float]:
    """(block linears, lm_head): the weight bytes a token reads with the block linears at ``sparsity``; on quantized
    weights (``dtype="gguf"``) the block linears' are ``quantized_block_bytes`` (dense at sparsity 0), and the
    lm_head's, after greedy steps with its bound (``head_tally``), the bound and the mean rows they dotted."""
    if engine.packed is not None:
        head, rows = engine.packed["lm_head"], engine.lm_head_rows_dotted()
        head_bytes = head.nbytes if rows is None else engine.head_bound.nbytes + rows * head.nbytes / head.shape[0]
        return quantized_block_bytes(engine, sparsity > 0), head_bytes
    wbytes = 2 if engine.dtype == "bf16" else 4
    return sum(engine.params.values()) * wbytes * (1 - sparsity), engine.vocab * engine.d * wbytes


def quantized_block_bytes(engine: Engine, sparse: bool) -> float:
    """Bytes the block linears of a quantized engine read per token: every code, scale and minimum (``sparse``
    False), or, from the engine's counts over its sparse tokens so far, per linear the codes of its active input
    channels (of its active rows when read by rows) and the scales and minima of the blocks holding an active
    channel."""
    total = 0.0
    for b in range(engine.n_layers):
        for j, n in enumerate(LINEAR_NAMES):
            p, seen = engine.packed[f"layers.{b}.{n}"], engine.seen[b, j]
            if not sparse or not seen:
                total += p.read_bytes()
            else:
                total += p.read_bytes(engine.active[b, j] / seen, engine.blocks[b, j] * p.block / seen)
    return total


def _label_basis(name: str, sel, n_kv: int, hd: int) -> tuple[np.ndarray, np.ndarray]:
    """(Pq, Pk), each [label heads, head_dim, r], of a layer's selector, its approximate score being (q Pq).(k Pk):
    Double Sparsity's channels as a 0/1 matrix for both (per KV head when shared, else per query head), the sketch's
    bilinear pair (A for queries, B for keys, per KV head)."""
    if name == "double-sparsity":
        idx = sel.idx.reshape(-1, sel.idx.shape[-1]).numpy()  # [label heads, r], query head kv * group + j
        P = np.zeros((idx.shape[0], hd, idx.shape[1]), np.float32)
        for h, channels in enumerate(idx):
            P[h, channels, np.arange(len(channels))] = 1.0
        return P, P
    Pq, Pk = (t.detach().float().contiguous().numpy().copy() for t in (sel.A, sel.B))
    if Pq.shape[:2] != (n_kv, hd) or Pk.shape != Pq.shape:
        raise SparsenError(f"the plan's sketch basis is {tuple(Pq.shape)}, not ({n_kv}, {hd}, rank): make the plan again")
    return Pq, Pk
