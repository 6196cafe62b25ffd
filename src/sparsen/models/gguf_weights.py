"""A GGUF file's block linears and lm_head as the file stores them: codes, scales and minima, never requantized.

Every type read here is affine per (output row, block of inputs): ``w[o, i] = scale[o, b] * codes[o, i] + min[o, b]``
with ``b = i // block``, the scale and minimum computed in fp32 exactly as gguf-py's dequantization computes them,
so ``QuantTensor.dequantize()`` equals the fp32 model sparsen loads from the same file (``load_model``). The engine
(``sparsen.engine.quant``) packs these into its kernels' layouts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsen.errors import SparsenError
from sparsen.models.adapters import LINEAR_NAMES

# sparsen's linear names -> the GGUF's (blk.{i}.{name}.weight)
GGUF_LINEARS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
                "down": "ffn_down"}


@dataclass
class QuantTensor:
    """One weight of a GGUF file: ``w = scale * codes + min`` per (row, block of ``block`` inputs)."""

    name: str  # the file's tensor name
    qtype: str  # the GGML type (Q4_1, Q8_0, ...)
    bits: int  # storage of a code: 4 (unsigned 0..15) or 8 (int8)
    block: int  # inputs per scale and minimum
    codes: np.ndarray  # [rows, in] uint8 (bits 4) or int8 (bits 8)
    scale: np.ndarray  # [rows, in // block] float16 or float32
    min: np.ndarray | None  # as scale, or None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def take_rows(self, rows) -> QuantTensor:
        """The tensor with its rows reordered (or selected)."""
        return QuantTensor(self.name, self.qtype, self.bits, self.block, self.codes[rows], self.scale[rows],
                           None if self.min is None else self.min[rows])

    def dequantize(self) -> np.ndarray:
        """[rows, in] fp32, computed as gguf-py computes it: scale * code (+ min), in fp32."""
        rows, n = self.codes.shape
        s = np.repeat(self.scale.astype(np.float32), self.block, axis=1)
        w = s * self.codes.astype(np.float32)
        if self.min is not None:
            w = w + np.repeat(self.min.astype(np.float32), self.block, axis=1)
        return w.reshape(rows, n)


def _blocks(raw: np.ndarray, rows: int, nbytes: int) -> np.ndarray:
    """A tensor's raw bytes as [rows, blocks per row, bytes per block]."""
    return np.ascontiguousarray(raw).reshape(rows, -1, nbytes)


def _half(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float16 (little-endian)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _q4_1(raw, rows):  # d (f16), m (f16), 16 bytes: byte j holds input j (low nibble) and j + 16 (high)
    b = _blocks(raw, rows, 20)
    qs = b[..., 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)
    return 4, 32, codes, _half(b[..., 0:2]), _half(b[..., 2:4])


def _q4_0(raw, rows):  # d (f16), 16 bytes; w = d * (q - 8)
    b = _blocks(raw, rows, 18)
    qs = b[..., 2:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int8) - 8
    return 8, 32, codes.reshape(rows, -1), _half(b[..., 0:2]), None


def _q8_0(raw, rows):  # d (f16), 32 int8
    b = _blocks(raw, rows, 34)
    return 8, 32, np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1), _half(b[..., 0:2]), None


def _q5(raw, rows, with_min: bool):  # d (f16), [m (f16)], qh (4 bytes: bit j = 5th bit of input j), 16 bytes
    nb = 24 if with_min else 22
    b = _blocks(raw, rows, nb)
    off = 4 if with_min else 2
    qh = np.ascontiguousarray(b[..., off:off + 4]).view(np.uint32)[..., 0]
    qs = b[..., off + 4:]
    high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1) | high
    if with_min:
        return 8, 32, codes.reshape(rows, -1).astype(np.int8), _half(b[..., 0:2]), _half(b[..., 2:4])
    return 8, 32, (codes.astype(np.int16) - 16).astype(np.int8).reshape(rows, -1), _half(b[..., 0:2]), None


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minima (ggml's get_scale_min_k4)."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(raw, rows):  # per 256: d, dmin (f16), 12 bytes of scales, 128 bytes (4 x 32 bytes: 2 sub-blocks each)
    b = _blocks(raw, rows, 144)
    d = _half(b[..., 0:2]).astype(np.float32)[..., None]
    dmin = _half(b[..., 2:4]).astype(np.float32)[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:].reshape(rows, -1, 4, 32)
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1)  # sub-block 2g: low nibbles, 2g + 1: high
    scale = (d * sc.astype(np.float32)).reshape(rows, -1)
    mins = -(dmin * mn.astype(np.float32)).reshape(rows, -1)
    return 4, 32, codes, scale, mins


def _q6_k(raw, rows):  # per 256: ql 128, qh 64, 16 int8 scales, d (f16); w = d * sc * (q - 32), sub-blocks of 16
    b = _blocks(raw, rows, 210)
    ql = b[..., :128].reshape(rows, -1, 2, 64)
    qh = b[..., 128:192].reshape(rows, -1, 2, 32)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)
    d = _half(b[..., 208:210]).astype(np.float32)[..., None]
    q = np.empty(ql.shape[:-2] + (2, 4, 32), np.int16)  # [rows, n, half, quarter, 32]
    q[..., 0, :] = (ql[..., :32] & 15) | (((qh >> 0) & 3) << 4)
    q[..., 1, :] = (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4)
    q[..., 2, :] = (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4)
    q[..., 3, :] = (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)
    codes = (q - 32).astype(np.int8).reshape(rows, -1)
    return 8, 16, codes, (d * sc).reshape(rows, -1), None


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": lambda r, n: _q5(r, n, False), "Q5_1": lambda r, n: _q5(r, n, True),
            "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
"""the GGML types the engine runs exactly, by name"""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: str  # GGML type name
    shape: tuple  # ggml order: (in, rows...)
    offset: int  # of its data, from the file's start


# GGUF metadata value types: fixed sizes (8: string, 9: array are read apart)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_index(path: str | Path) -> tuple[dict, dict]:
    """(string metadata, {name: TensorInfo}) of a GGUF file, reading only its header: gguf-py's reader parses every
    metadata array (a tokenizer's 50k tokens: seconds) where this skips them. Read once per file version (the
    engine's checks and its loading both ask; treat the result as read-only)."""
    st = Path(path).stat()
    return _gguf_index(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_index(path: str, size: int, mtime_ns: int) -> tuple[dict, dict]:
    import struct

    import gguf

    with open(path, "rb") as f:
        buf = f.read(1 << 16)
        pos = 0

        def need(n):
            nonlocal buf
            while pos + n > len(buf):
                more = f.read(max(1 << 20, n))
                if not more:
                    raise SparsenError(f"'{path}' ends inside its GGUF header: the file is truncated")
                buf += more

        def take(fmt):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n)
            v = struct.unpack_from(fmt, buf, pos)
            pos += n
            return v if len(v) > 1 else v[0]

        def string():
            nonlocal pos
            n = take("<Q")
            need(n)
            v = bytes(buf[pos:pos + n]).decode("utf-8", "replace")
            pos += n
            return v

        def skip(vtype):
            nonlocal pos
            if vtype == 8:
                string()
            elif vtype == 9:
                etype, count = take("<IQ")
                if etype in _SCALAR:
                    need(_SCALAR[etype] * count)
                    pos += _SCALAR[etype] * count
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                need(_SCALAR[vtype])
                pos += _SCALAR[vtype]

        if take("<4s") != b"GGUF":
            raise SparsenError(f"'{path}' is not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = take("<IQQ")
        meta = {}
        for _ in range(n_kv):
            key, vtype = string(), take("<I")
            if vtype == 8:
                meta[key] = string()
            elif vtype in (4, 5):
                meta[key] = take("<I" if vtype == 4 else "<i")
            else:
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = take("<I")
            shape = tuple(take("<" + "Q" * dims)) if dims > 1 else (take("<Q"),)
            qtype, offset = take("<IQ")
            infos.append((name, shape, qtype, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = {n: TensorInfo(n, gguf.GGMLQuantizationType(t).name, sh, start + off) for n, sh, t, off in infos}
    return meta, tensors


def _llama_rows(out: int, heads: int) -> np.ndarray:
    """The row order Hugging Face's GGUF loader gives a Llama q or k weight (it undoes llama.cpp's RoPE permute)."""
    idx = np.arange(out)
    return idx.reshape(heads, out // heads // 2, 2).swapaxes(2, 1).reshape(out)


def _is_block_linear(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LINEARS.values()) or name == "output.weight"


def unsupported_tensor(path: str | Path) -> tuple[str, str] | None:
    """(name, type) of the first block linear or lm_head of a GGUF file whose type the engine cannot run, or None."""
    _, tensors = gguf_index(path)
    for t in tensors.values():
        lm_head = t.name == "token_embd.weight" and "output.weight" not in tensors
        if (_is_block_linear(t.name) or lm_head) and t.qtype not in DECODERS:
            return t.name, t.qtype
    return None


@dataclass
class GGUFWeights:
    """The quantized block linears ({(layer, name): QuantTensor}, rows in Hugging Face's order) and lm_head."""

    path: Path
    linears: dict
    lm_head: QuantTensor


def read_gguf_weights(path: str | Path, n_layers: int, n_heads: int, n_kv_heads: int) -> GGUFWeights:
    """The block linears and lm_head of a GGUF file, as stored. A tensor of a type the engine cannot run exactly is
    refused with its name and type."""
    import gguf

    path = Path(path)
    try:
        meta, tensors = gguf_index(path)
    except (OSError, ValueError, KeyError) as e:
        raise SparsenError(f"could not read GGUF file '{path}': {str(e).splitlines()[0]}") from None
    arch = meta.get("general.architecture")
    data = np.memmap(path, np.uint8, mode="r")

    def load(name: str) -> QuantTensor:
        t = tensors.get(name)
        if t is None:
            raise SparsenError(f"the GGUF file '{path.name}' has no tensor '{name}': it is not the model's file; "
                               "use --weights fp32")
        qtype = t.qtype
        if qtype not in DECODERS:
            raise SparsenError(f"tensor '{name}' of '{path.name}' is {qtype}, which the engine cannot run on its "
                               f"quantized weights (it runs {', '.join(DECODERS)}): use --weights fp32")
        n_in, rows = int(t.shape[0]), int(np.prod(t.shape[1:]))
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        raw = np.asarray(data[t.offset:t.offset + rows * (n_in // block) * nbytes]).reshape(rows, -1)
        bits, block, codes, scale, mins = DECODERS[qtype](raw, rows)
        if codes.shape != (rows, n_in):
            raise SparsenError(f"tensor '{name}' of '{path.name}' decodes to {codes.shape}, not {(rows, n_in)}")
        return QuantTensor(name, qtype, bits, block, codes, scale, mins)

    linears = {}
    for layer in range(n_layers):
        for n in LINEAR_NAMES:
            qt = load(f"blk.{layer}.{GGUF_LINEARS[n]}.weight")
            if arch == "llama" and n in ("q", "k"):
                qt = qt.take_rows(_llama_rows(qt.shape[0], n_heads if n == "q" else n_kv_heads))
            linears[layer, n] = qt
    head = load("output.weight" if "output.weight" in tensors else "token_embd.weight")
    return GGUFWeights(path, linears, head)
