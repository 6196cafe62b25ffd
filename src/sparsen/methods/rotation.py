"""Our method: TEAL-style thresholds in an orthogonal basis of the residual stream, folded into the weights.

Why: on SmolLM2 most of the damage of input sparsity comes from the inputs of q/k/v and gate/up
(the post-RMSNorm residual stream), which are dense in the standard basis. In the eigenbasis of
their second moment the energy concentrates in fewer coordinates, so a magnitude threshold drops
less of what matters.

Why it costs no bytes (computational invariance, as in SliceGPT): fold every RMSNorm gain into
the linears that read the normalized vector (and the final norm's gain into the lm_head, which
then no longer shares the embedding's storage); RMSNorm without gain commutes with an orthogonal
Q (it only divides by the norm). Then rotate the residual stream by Q: embedding rows E <- E Q,
readers of the stream (q, k, v, gate, up, lm_head) W <- W Q, writers (o, down) W <- Q^T W. The
rotated model computes the same function (up to fp rounding) and its q/k/v and gate/up inputs
are Q^T x. The plan stores only Q (d x d, safetensors beside the plan); applying the plan refolds
and rotates the loaded model in place.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from sparsen.methods import teal
from sparsen.methods.registry import Method

TRANSFORM = "residual_rotation"


@torch.no_grad()
def fold_norm_gains(lm) -> None:
    """Move every RMSNorm gain into the following linears; set the gains to 1. Unties the lm_head."""
    ad = lm.adapter
    for b in ad.blocks:
        for norm, readers in ((b.input_norm, ("q", "k", "v")), (b.post_attn_norm, ("gate", "up"))):
            g = norm.weight.double()
            for name in readers:
                w = b.linears[name].weight
                w.copy_((w.double() * g[None, :]).to(w.dtype))
            norm.weight.fill_(1.0)
    g = ad.final_norm.weight.double()
    head = ad.lm_head
    head.weight = torch.nn.Parameter((head.weight.double() * g[None, :]).to(head.weight.dtype), requires_grad=False)
    ad.final_norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_residual(lm, Q: torch.Tensor) -> None:
    """Rotate the residual stream of a gain-folded model by the orthogonal Q [d, d] (in place)."""
    ad = lm.adapter
    Qd = Q.double()

    def right(p):  # W <- W Q
        p.copy_((p.double() @ Qd).to(p.dtype))

    right(ad.embed.weight)
    right(ad.lm_head.weight)
    for b in ad.blocks:
        for name in ("q", "k", "v", "gate", "up"):
            right(b.linears[name].weight)
        for name in ("o", "down"):
            lin = b.linears[name]
            lin.weight.copy_((Qd.T @ lin.weight.double()).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_((Qd.T @ lin.bias.double()).to(lin.bias.dtype))


def apply_transform(lm, tensors: dict) -> None:
    """Fold and rotate ``lm`` by the plan's Q, once per model instance."""
    Q = tensors["Q"]
    key = hash(Q.numpy().tobytes())
    if getattr(lm, "_sparsen_transform", None) == key:
        return
    if getattr(lm, "_sparsen_transform", None) is not None:
        raise RuntimeError("model already carries another rotation: load it again")
    fold_norm_gains(lm)
    rotate_residual(lm, Q)
    lm._sparsen_transform = key


@torch.no_grad()
def residual_basis(lm, wins, progress: bool = True) -> torch.Tensor:
    """Eigenbasis (descending eigenvalue) of the second moment of the normalized residual stream,
    pooled over the q/k/v and gate/up inputs of every layer of a gain-folded model."""
    d = lm.adapter.hidden_size
    C = torch.zeros(d, d, dtype=torch.float64)
    handles = []
    for b in lm.adapter.blocks:
        for name in ("q", "gate"):
            def hook(m, args):
                x = args[0].reshape(-1, d).double()
                C.add_(x.T @ x)

            handles.append(b.linears[name].register_forward_pre_hook(hook))
    try:
        for w in tqdm(wins, desc="residual basis", unit="win", disable=not progress, leave=False):
            lm.model(w[None])
    finally:
        for h in handles:
            h.remove()
    evals, evecs = torch.linalg.eigh(C)
    return evecs.flip(-1).to(torch.float32).contiguous()


def _rotated_copy(lm, wins, progress):
    work = copy.copy(lm)  # calibrate on a transformed copy; the caller's model stays as it was
    work.model = copy.deepcopy(lm.model)
    from sparsen.models.adapters import adapter_for

    work.adapter = adapter_for(work.model)
    work._sparsen_transform = None
    fold_norm_gains(work)
    Q = residual_basis(work, wins, progress)
    rotate_residual(work, Q)
    work._sparsen_transform = hash(Q.numpy().tobytes())
    return work, Q


def calibrate(lm, sparsity, wins, config, progress):
    work, Q = _rotated_copy(lm, wins, progress)
    sites, achieved, extras = teal.calibrate(work, sparsity, wins, config, progress)
    return sites, achieved, {**extras, "transform": TRANSFORM, "tensors": {"Q": Q}}


def group_column_norms(lm) -> dict:
    """Per site, the column norms of all the linears that read its input (q|k|v, gate|up, o, down):
    one criterion, hence one mask, per shared input, as a fused kernel wants."""
    from sparsen.models.adapters import GROUP_OF, INPUT_GROUPS

    out = {}
    for b in lm.adapter.blocks:
        for names in INPUT_GROUPS.values():
            W = torch.cat([b.linears[n].weight.detach().float() for n in names])
            norm = W.norm(dim=0).clamp_min(1e-12)
            for n in names:
                out[f"layers.{b.index}.{n}"] = norm
    assert len(out) == len(GROUP_OF) * lm.adapter.n_layers
    return out


def calibrate_weighted(lm, sparsity, wins, config, progress):
    """Rotation, then thresholds on |z_i| * ||W'[:, i]|| (W' the rotated, gain-folded readers of z)."""
    work, Q = _rotated_copy(lm, wins, progress)
    sites, achieved, extras = teal.criterion_thresholds(work, sparsity, wins, config, progress,
                                                        scales=group_column_norms(work), tag="rw")
    return sites, achieved, {**extras, "transform": TRANSFORM, "tensors": {"Q": Q, **extras["tensors"]}}


METHOD_WEIGHTED = Method("rotate-wina", "ours: the folded rotation, then weight-aware thresholds |z_i|*||W'[:,i]|| "
                         "(one mask per shared input)", calibrate_weighted, allocations=teal.ALLOCATIONS)


METHOD = Method("rotate", "ours: TEAL thresholds in a folded orthogonal eigenbasis of the residual stream (free)",
                calibrate, allocations=teal.ALLOCATIONS)


def calibrate_topk(lm, sparsity, wins, config, progress):
    """Rotation plus exact per-token top-k: the same share of every input is skipped on any text."""
    _, Q = _rotated_copy(lm, wins, progress)
    sites = {site: {"rule": "topk", "sparsity": sparsity} for site, *_ in lm.adapter.linear_sites()}
    return sites, sparsity, {"transform": TRANSFORM, "tensors": {"Q": Q}}


METHOD_TOPK = Method("rotate-topk", "ours: per-token top-k in the folded eigenbasis of the residual stream (free)",
                     calibrate_topk)
