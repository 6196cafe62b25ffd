"""Top-k encode and decode whose backward touches only the active latents.

A TopK dictionary's gradient with respect to its pre-activations has k non-zeros per token, so W_enc's gradient
is a sparse-times-dense product (B*k*d_in multiply-adds instead of B*d_sae*d_in) and the decoder reads k rows of
W_dec per token (``embedding_bag``). The forward still computes every pre-activation once (a dense GEMM): that is
the cost a top-k dictionary cannot skip. AuxK's top-k over the dead latents reuses the same pre-activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, k_aux, dead, signed):
        pre = torch.addmm(b_enc, x, W_enc)
        score = pre.abs() if signed else pre
        vals, idx = score.topk(k, dim=1, sorted=False)
        if signed:
            vals = pre.gather(1, idx)
        else:
            vals = vals.clamp_min(0)
        aux_vals = aux_idx = None
        if k_aux:
            masked = pre.masked_fill(~dead, float("-inf"))
            aux_vals, aux_idx = masked.topk(k_aux, dim=1, sorted=False)
            aux_vals = aux_vals.clamp_min(0)
        ctx.save_for_backward(x, W_enc, idx, vals, aux_idx, aux_vals)
        ctx.signed = signed
        ctx.d_sae = W_enc.shape[1]
        if aux_idx is None:
            aux_vals = torch.zeros(x.shape[0], 0)
            aux_idx = torch.zeros(x.shape[0], 0, dtype=torch.long)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x, W_enc, idx, vals, aux_idx, aux_vals = ctx.saved_tensors
        g = g_vals if ctx.signed else g_vals * (vals > 0)
        idx_all, g_all = idx, g
        if aux_idx is not None and g_aux is not None and g_aux.numel():
            idx_all = torch.cat([idx, aux_idx], 1)
            g_all = torch.cat([g, g_aux * (aux_vals > 0)], 1)
        B, kk = idx_all.shape
        rows = torch.arange(B).repeat_interleave(kk)
        gt = torch.sparse_coo_tensor(torch.stack([idx_all.reshape(-1), rows]), g_all.reshape(-1),
                                     (ctx.d_sae, B), check_invariants=False).coalesce()
        grad_w = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.sparse.mm(gt, x).T
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.d_sae, dtype=g_all.dtype).index_add_(0, idx_all.reshape(-1), g_all.reshape(-1))
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_all, W_enc.T, per_sample_weights=g_all, mode="sum")
        return grad_x, grad_w, grad_b, None, None, None, None


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, k_aux: int = 0,
                dead: torch.Tensor | None = None, signed: bool = False):
    """(vals, idx) of the k largest pre-activations per row of x [B, d_in] (ReLU'd; with ``signed``, the k largest
    by magnitude, sign kept), and (aux_vals, aux_idx): the k_aux largest among the ``dead`` latents (empty when
    k_aux is 0). Gradients reach W_enc and b_enc through the selected entries only."""
    if k_aux and (dead is None or not bool(dead.any())):
        k_aux = 0
    if k_aux:
        k_aux = min(k_aux, int(dead.sum()))
    return _TopKEncode.apply(x, W_enc, b_enc, k, k_aux, dead, signed)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[:, j] * W_dec[idx[:, j]]: [B, k] -> [B, d_out], reading only the k rows."""
    if idx.shape[1] == 0:
        return vals.new_zeros(vals.shape[0], W_dec.shape[1])
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
