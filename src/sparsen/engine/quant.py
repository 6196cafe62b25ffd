"""The kernels' layouts of a GGUF file's quantized weights (``kernels/quant.c`` says how they are read).

Transposed (block linears): codes [in, stride] (4-bit: 64 outputs per 32 bytes, nibble j of the chunk's 32-bit lane
l holding output 64c + 8j + l), scales and minima [in / block, stride]; stride is the output count padded to a
multiple of 64 (4-bit) or 16 (int8) (padding codes and scales are zero). Rows (lm_head, rows read by a
gate-activation or experts rule): codes [rows, in] (4-bit: ggml's order, byte j of a block holding inputs j and
j + block / 2), scales and minima [rows, in / block].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsen.models.gguf_weights import QuantTensor

W_F32, W_BF16, W_Q4, W_Q8 = 0, 1, 2, 3  # enum sp_wtype


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
        code = 0.5 if self.type == W_Q4 else 1.0
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


def pack(qt: QuantTensor, transposed: bool) -> Packed:
    """``qt`` ([out, in] as the file stores it) in the transposed layout or as rows."""
    out, n_in = qt.shape
    kind = W_Q4 if qt.bits == 4 else W_Q8
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
    if kind == W_Q4:  # [in, chunk, j, lane] -> bytes [in, chunk, lane, j // 2], j even in the low nibble
        c = codes.reshape(n_in, stride // 64, 8, 8).transpose(0, 1, 3, 2).reshape(n_in, stride // 64, 8, 4, 2)
        codes = (c[..., 0] | (c[..., 1] << 4)).reshape(n_in, stride // 2)
    return Packed(kind, qt.block, stride, np.ascontiguousarray(codes), _params(qt.scale, out, stride, True),
                  _params(qt.min, out, stride, True), (out, n_in), True)
