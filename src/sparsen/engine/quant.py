"""The kernels' layouts of a GGUF file's quantized weights (``kernels/quant.c`` says how they are read).

Transposed (block linears): scales and minima [in / block, stride], stride the output count padded to a multiple of
64 (4-bit) or 16 (int8) (padding codes and scales are zero); int8 codes [in, stride]; 4-bit codes tile-major within
each block of inputs: the block's tiles of 128 outputs, each its rows' 64 bytes in turn (nibble j of 32-bit lane l
holding output 128c + 16j + l), then a tile of 64 if the stride has one (32 bytes a row, nibble j of lane l output
8j + l); 64-byte aligned, so a row's chunk of a 128-tile is one cache line. 4-bit runs (``runs=True``, for a linear
whose plan keeps few of its inputs): row i's codes for every output in one run of stride / 2 bytes, its chunks packed
as the tile-major ones (a run starts on a 32-byte boundary when the stride is an odd multiple of 64). Rows (lm_head,
rows read by a gate-activation or experts rule): codes [rows, in] (4-bit: ggml's order, byte j of a block holding
inputs j and j + block / 2), scales and minima [rows, in / block].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsen.models.gguf_weights import QuantTensor

W_F32, W_BF16, W_Q4, W_Q8, W_Q4_RUNS = 0, 1, 2, 3, 4  # enum sp_wtype


@dataclass
class Packed:
    """A weight in a kernel layout: the arrays sp_weight points to, and the [out, in] matrix it stores."""

    type: int
    block: int
    stride: int
    data: np.ndarray
    scale: np.ndarray
    min: np.ndarray | None
    shape: tuple[int, int]  # (out, in) of the matrix
    transposed: bool

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.scale, self.min) if a is not None)

    def read_bytes(self, share: float = 1.0, block_share: float = 1.0) -> float:
        """Bytes one product reads with a ``share`` of its input channels active (transposed: their code rows, and
        the scales and minima of a ``block_share`` of the blocks) or a ``share`` of its rows (each with its codes and
        its blocks' scales and minima)."""
        out, n_in = self.shape
        code = 0.5 if self.type in (W_Q4, W_Q4_RUNS) else 1.0
        param = self.scale.itemsize * (2 if self.min is not None else 1)
        if self.transposed:
            return share * n_in * out * code + block_share * (n_in // self.block) * out * param
        return share * out * (n_in * code + n_in // self.block * param)


def _params(a: np.ndarray | None, rows: int, stride: int, transpose: bool) -> np.ndarray | None:
    if a is None:
        return None
    if not transpose:
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[1], stride), a.dtype)
    out[:, :rows] = a.T
    return out


def pack(qt: QuantTensor, transposed: bool, runs: bool = False) -> Packed:
    """``qt`` ([out, in] as the file stores it) in the transposed layout or as rows; ``runs``: a 4-bit transposed
    weight as runs (each input's codes in one run) instead of tile-major."""
    out, n_in = qt.shape
    kind = W_Q4 if qt.bits == 4 else W_Q8
    if runs and (kind != W_Q4 or not transposed):
        raise ValueError("runs are a layout of transposed 4-bit codes")
    if not transposed:
        if kind == W_Q4:  # ggml's order within a block: inputs j and j + block / 2 share byte j
            c = qt.codes.reshape(out, n_in // qt.block, 2, qt.block // 2)
            data = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(out, n_in // 2)
        else:
            data = qt.codes
        return Packed(kind, qt.block, n_in, np.ascontiguousarray(data), _params(qt.scale, out, n_in, False),
                      _params(qt.min, out, n_in, False), (out, n_in), False)
    multiple = 64 if kind == W_Q4 else 16
    stride = -(-out // multiple) * multiple
    codes = np.zeros((n_in, stride), qt.codes.dtype)
    codes[:, :out] = qt.codes.T
    if kind == W_Q4:
        codes = _aligned(_q4_runs(codes) if runs else _q4_tile_major(codes, qt.block))
        kind = W_Q4_RUNS if runs else W_Q4
    return Packed(kind, qt.block, stride, np.ascontiguousarray(codes), _params(qt.scale, out, stride, True),
                  _params(qt.min, out, stride, True), (out, n_in), True)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """[..., lanes, 8] codes (nibble j of each 32-bit lane last) as the lanes' little-endian bytes, j even low."""
    c = c.reshape(*c.shape[:-1], 4, 2)
    return (c[..., 0] | (c[..., 1] << 4)).reshape(*c.shape[:-3], c.shape[-3] * 4)


def _q4_tile_major(codes: np.ndarray, block: int) -> np.ndarray:
    """[in, stride] 4-bit codes as bytes in the tile-major order (the module docstring), [in / block, ...] per block."""
    n_in, stride = codes.shape
    nb, full = n_in // block, stride // 128 * 128
    wide = codes[:, :full].reshape(nb, block, full // 128, 8, 16)  # [b, row, tile, j, lane]
    parts = [_nibbles(wide.transpose(0, 2, 1, 4, 3)).reshape(nb, full // 2 * block)]  # [b, tile, row, lane, j]
    if full < stride:
        tail = codes[:, full:].reshape(nb, block, 8, 8)  # [b, row, j, lane]
        parts.append(_nibbles(tail.transpose(0, 1, 3, 2)).reshape(nb, 32 * block))
    return np.concatenate(parts, axis=1)


def _q4_runs(codes: np.ndarray) -> np.ndarray:
    """[in, stride] 4-bit codes as bytes, each row one run of its chunks (the module docstring)."""
    n_in, stride = codes.shape
    full = stride // 128 * 128
    parts = [_nibbles(codes[:, :full].reshape(n_in, full // 128, 8, 16).transpose(0, 1, 3, 2)).reshape(n_in, full // 2)]
    if full < stride:
        parts.append(_nibbles(codes[:, full:].reshape(n_in, 8, 8).transpose(0, 2, 1)).reshape(n_in, 32))
    return np.concatenate(parts, axis=1)


def _aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A copy of ``a`` whose data starts on an ``alignment``-byte boundary."""
    buf = np.empty(a.nbytes + alignment, np.uint8)
    start = -buf.ctypes.data % alignment
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@dataclass
class HeadBound:
    """A greedy step's bound on every logit of an int8 lm_head (``sp_head_bound``, ``kernels/head.c``): each code's
    top five bits, in tiles of 64 rows, and the rows' scales beside them."""

    rows: int  # the vocabulary rounded up to a multiple of 64
    nib: np.ndarray  # uint8 [rows / 64, d / 32, 4, 4, 64]
    bits: np.ndarray  # uint64 [rows / 64, d / 32, 4, 4, 2]
    scale: np.ndarray  # float16 [rows / 64, d / 32, 64]

    @property
    def nbytes(self) -> int:
        return self.nib.nbytes + self.bits.nbytes + self.scale.nbytes


def head_bound_refusal(head: Packed) -> str | None:
    """Why a greedy step cannot bound this lm_head's logits from its codes' top bits (None: it can)."""
    if head.transposed or head.type != W_Q8 or head.block != 32 or head.min is not None:
        return "the lm_head is not int8 rows in blocks of 32 without minima"
    if head.scale.dtype != np.float16:
        return "the lm_head's scales are not IEEE half"
    s = head.scale.astype(np.float32)
    if not (np.isfinite(s).all() and (s >= 0).all()):
        return "the lm_head has a negative or non-finite scale (the bound needs d >= 0)"
    return None


def head_bound(head: Packed) -> HeadBound:
    """The bound's layout of an int8 lm_head (``head_bound_refusal`` is None): for tile t of 64 rows, block b of 32
    inputs, group g of 8 inputs and 16 rows s, byte 4l + m of ``nib`` holds (q >> 4) + 8 of input 8g + m (low nibble)
    and of 8g + 4 + m (high) of row 64t + 16s + l; bit 4l + m of ``bits``' first (second) word (q >> 3) & 1 of the
    same inputs."""
    vocab, d = head.shape
    rows, nb = -(-vocab // 64) * 64, d // 32
    tiles = rows // 64
    nib, words = np.empty((tiles, nb, 4, 4, 64), np.uint8), np.empty((tiles, nb, 4, 4, 2), np.uint64)
    step = 256  # tiles at a time: the temporaries stay a few MB (Gemma 3's head has 4,096 tiles)
    for t0 in range(0, tiles, step):
        t1 = min(t0 + step, tiles)
        q = np.zeros(((t1 - t0) * 64, d), np.int8)
        q[: max(0, min(vocab, 64 * t1) - 64 * t0)] = head.data[64 * t0:64 * t1]
        # [tile, s, l, block, g, half, m] -> [tile, block, g, s, l, m, half]
        q = q.reshape(t1 - t0, 4, 16, nb, 4, 2, 4).transpose(0, 3, 4, 1, 2, 6, 5)
        n = ((q >> 4) + 8).astype(np.uint8)  # arithmetic shifts of int8: floor(q / 16) + 8, 0..15
        nib[t0:t1] = (n[..., 0] | (n[..., 1] << 4)).reshape(t1 - t0, nb, 4, 4, 64)
        bit = np.moveaxis(((q >> 3) & 1).astype(np.uint8), -1, -3).reshape(t1 - t0, nb, 4, 4, 2, 64)
        words[t0:t1] = np.packbits(bit, axis=-1, bitorder="little").view("<u8")[..., 0]
    scale = np.zeros((rows, nb), np.float16)
    scale[:vocab] = head.scale
    scale = scale.reshape(tiles, 64, nb).transpose(0, 2, 1)
    return HeadBound(rows, _aligned(nib), _aligned(words), _aligned(scale))
