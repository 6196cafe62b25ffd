"""Named hook points: where a dictionary (SAE, transcoder) reads or writes a model's activations.

Names follow TransformerLens, which SAELens checkpoints record in ``hook_name``:

    blocks.{i}.hook_resid_pre     the residual stream entering block i            [B, T, hidden]
    blocks.{i}.hook_resid_post    the residual stream leaving block i             [B, T, hidden]
    blocks.{i}.hook_mlp_in        the MLP's input (after its norm)                [B, T, hidden]
    blocks.{i}.hook_mlp_out       what the MLP adds to the residual stream        [B, T, hidden]
    blocks.{i}.attn.hook_z        the input of o: every head's z, concatenated    [B, T, n_heads * head_dim]
    blocks.{i}.attn.hook_result   each head's output in the residual stream,      [B, T, n_heads, hidden]
                                  z_h @ W_O[:, h*head_dim:(h+1)*head_dim].T

``hook_mlp_out`` of an architecture with a norm on the MLP branch (Gemma 3) is that norm's output: what is added.
A hook function receives the activation and returns None (read only) or a tensor of the same shape that replaces it
(splicing a reconstruction in). Only this module touches the modules behind the names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from sparsen.errors import SparsenError

KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_in", "hook_mlp_out", "attn.hook_z", "attn.hook_result")
_NAME = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in KINDS) + r")$")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (everything needed has been read)."""


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str
    d: int
    """the width of one activation vector (for ``attn.hook_result``: per head)"""
    heads: int | None = None
    """``attn.hook_result`` only: the number of heads (its activations are [..., heads, d])"""


def hook_point(adapter, name: str) -> HookPoint:
    """The hook point called ``name`` on this adapter's model; a one-line error names the valid ones."""
    m = _NAME.match(name or "")
    n = adapter.n_layers
    if m is None or int(m.group(1)) >= n:
        raise SparsenError(f"unknown hook '{name}': use blocks.N.KIND with N in 0..{n - 1} and KIND one of "
                           f"{', '.join(KINDS)}")
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "attn.hook_z":
        return HookPoint(name, layer, kind, adapter.n_heads * adapter.head_dim)
    if kind == "attn.hook_result":
        return HookPoint(name, layer, kind, adapter.hidden_size, heads=adapter.n_heads)
    return HookPoint(name, layer, kind, adapter.hidden_size)


def hook_points(adapter) -> list[str]:
    """Every hook point's name, block by block."""
    return [f"blocks.{i}.{k}" for i in range(adapter.n_layers) for k in KINDS]


def _first_arg(args, kwargs, key="hidden_states"):
    return args[0] if args else kwargs[key]


def _with_first_arg(args, kwargs, value, key="hidden_states"):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, key: value}


def attach(adapter, point: HookPoint | str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register ``fn`` at a hook point; returns a handle with ``remove()``."""
    if isinstance(point, str):
        point = hook_point(adapter, point)
    block = adapter.blocks[point.layer]
    kind = point.kind

    def checked(act, new):
        if new is not None and new.shape != act.shape:
            raise SparsenError(f"a replacement at {point.name} has shape {tuple(new.shape)}, not {tuple(act.shape)}")
        return new

    if kind == "hook_resid_pre":
        def pre(mod, args, kwargs):
            h = _first_arg(args, kwargs)
            new = checked(h, fn(h))
            return None if new is None else _with_first_arg(args, kwargs, new.to(h.dtype))
        return block.layer.register_forward_pre_hook(pre, with_kwargs=True)
    if kind == "hook_resid_post":
        def post(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            new = checked(h, fn(h))
            if new is None:
                return None
            return (new.to(h.dtype), *out[1:]) if isinstance(out, tuple) else new.to(h.dtype)
        return block.layer.register_forward_hook(post)
    if kind == "hook_mlp_in":
        def mlp_pre(mod, args, kwargs):
            h = _first_arg(args, kwargs, "x")
            new = checked(h, fn(h))
            return None if new is None else _with_first_arg(args, kwargs, new.to(h.dtype), "x")
        return block.mlp.register_forward_pre_hook(mlp_pre, with_kwargs=True)
    if kind == "hook_mlp_out":
        mod = block.mlp_out_norm if block.mlp_out_norm is not None else block.mlp

        def mlp_post(mod, args, out):
            new = checked(out, fn(out))
            return None if new is None else new.to(out.dtype)
        return mod.register_forward_hook(mlp_post)
    o = block.linears["o"]
    if kind == "attn.hook_z":
        def z_pre(mod, args, kwargs):
            z = _first_arg(args, kwargs, "input")
            new = checked(z, fn(z))
            return None if new is None else _with_first_arg(args, kwargs, new.to(z.dtype), "input")
        return o.register_forward_pre_hook(z_pre, with_kwargs=True)
    # attn.hook_result: computed from o's input; a replacement becomes o's output (the heads' sum, plus o's bias)
    n_heads, hd = adapter.n_heads, adapter.head_dim

    def result_post(mod, args, out):
        z = args[0]
        result = head_results(z, mod.weight, n_heads, hd)
        new = checked(result, fn(result))
        if new is None:
            return None
        y = new.sum(-2)
        return (y if mod.bias is None else y + mod.bias).to(out.dtype)
    return o.register_forward_hook(result_post)


def head_results(z: torch.Tensor, w_o: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[..., n_heads*head_dim] z and o's weight [hidden, n_heads*head_dim] -> [..., n_heads, hidden] per-head outputs."""
    zh = z.reshape(*z.shape[:-1], n_heads, head_dim)
    return torch.einsum("...hd,ohd->...ho", zh, w_o.reshape(w_o.shape[0], n_heads, head_dim))


@torch.no_grad()
def read_activations(adapter, tokens: torch.Tensor, points: list[HookPoint], **kwargs) -> dict[str, torch.Tensor]:
    """One forward of the decoder stack on ``tokens`` [B, T], stopped after the deepest point; returns {name: act}."""
    got: dict[str, torch.Tensor] = {}
    last = max(p.layer for p in points)
    deepest = [p.name for p in points if p.layer == last]
    handles = []

    def reader(name):
        def fn(act):
            got[name] = act.detach()
            if all(n in got for n in deepest) and len(got) == len(points):
                raise StopForward
        return fn

    try:
        for p in points:
            handles.append(attach(adapter, p, reader(p.name)))
        try:
            adapter.trunk(tokens, **kwargs)
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [p.name for p in points if p.name not in got]
    if missing:  # pragma: no cover - every point is on a module the forward runs
        raise SparsenError(f"hook points {missing} were not reached by the forward pass")
    return got
