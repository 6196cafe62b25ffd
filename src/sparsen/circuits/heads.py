"""Attention heads as circuit nodes: their outputs, and interventions on their z, through the ``attn.hook_z`` hook.

Head h of layer l has z_h = z[..., h*hd:(h+1)*hd] (the input of o) and output r_h = z_h @ W_O[:, h*hd:(h+1)*hd].T in
the residual stream (``hookpoints.head_results``). Heads are numbered layer-major: node = layer * n_heads + head.

Prompts of a batch are right-padded: a causal model's real positions never attend to the padding after them, so the
activations and last-position logits of each prompt are those of the prompt alone; pooled outputs mask the padding.

An intervention that changes layers >= l only (patching or ablating heads of layer l and later) reruns the batch
from layer l: the clean run's inputs to every layer are recorded once (``Recorded``) and the rerun starts from
them, so a head of layer l costs the layers l..L-1 instead of the whole model (about half on average).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from sparsen.models.hookpoints import StopForward, attach, head_results, hook_point, read_activations

OUTPUT_MODES = ("mean", "last", "tail")
"""how ``Heads.outputs`` pools a head's output over a prompt's positions"""


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


def _repeat(x, batch: int, k: int):
    """A recorded layer argument for a batch repeated k times: tensors with the batch as their first dimension
    (dim >= 2) are repeated; others (rotary tables of batch 1, cache positions, flags) are shared as they are."""
    if k == 1:
        return x
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() >= 2 and x.shape[0] == batch and batch > 1 else x
    if isinstance(x, tuple):
        return tuple(_repeat(v, batch, k) for v in x)
    if isinstance(x, list):
        return [_repeat(v, batch, k) for v in x]
    return x


class Recorded:
    """A clean forward of a batch with every decoder layer's call (its input and keyword arguments) recorded."""

    def __init__(self, heads: Heads, ids: torch.Tensor, lengths: torch.Tensor):
        self.ids, self.lengths, self.batch = ids, lengths, ids.shape[0]
        self.calls: dict[int, tuple] = {}
        handles = []
        for i, b in enumerate(heads.adapter.blocks):
            def grab(mod, args, kwargs, i=i):
                self.calls[i] = (args, kwargs)

            handles.append(b.layer.register_forward_pre_hook(grab, with_kwargs=True, prepend=True))
        try:
            with torch.no_grad():
                h = heads.blocks_output(ids)
        finally:
            for hd in handles:
                hd.remove()
        self.logits = heads.last_logits(h, lengths)


class Heads:
    """The attention heads of a loaded model (``sparsen.load_model``)."""

    def __init__(self, lm, max_rows: int = 96):
        self.lm, self.adapter = lm, lm.adapter
        ad = self.adapter
        self.n_layers, self.n_heads, self.head_dim = ad.n_layers, ad.n_heads, ad.head_dim
        self.n = self.n_layers * self.n_heads
        self.max_rows = max_rows
        self.points = [hook_point(ad, f"blocks.{i}.attn.hook_z") for i in range(self.n_layers)]
        tok = lm.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    # --- naming ------------------------------------------------------------------------------------------------------
    def name(self, node: int) -> str:
        return f"L{node // self.n_heads}H{node % self.n_heads}"

    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.n)]

    def cols(self, node: int) -> slice:
        h = node % self.n_heads
        return slice(h * self.head_dim, (h + 1) * self.head_dim)

    def w_o(self, layer: int) -> torch.Tensor:
        return self.adapter.blocks[layer].linears["o"].weight.detach()

    # --- running -----------------------------------------------------------------------------------------------------
    def last_logits(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] at each prompt's last real position from the last block's output [B, T, hidden] (the
        adapter's head: final norm, lm_head and whatever else the architecture does there)."""
        last = h[torch.arange(h.shape[0]), lengths.to(h.device) - 1]
        return self.adapter.head(last)

    def blocks_output(self, ids: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, T, hidden] (before the final norm) of a whole forward."""
        got = {}

        def grab(mod, args, out):
            got["h"] = _layer_out(out)

        handle = self.adapter.blocks[-1].layer.register_forward_hook(grab)
        try:
            self.adapter.trunk(ids)
        finally:
            handle.remove()
        return got["h"]

    @contextmanager
    def editing(self, edits: dict[int, Callable[[torch.Tensor], torch.Tensor | None]]):
        """Hooks replacing each edited layer's z by ``edits[layer](z)`` while the block runs."""
        handles = [attach(self.adapter, self.points[layer], fn) for layer, fn in edits.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, edits=None) -> torch.Tensor:
        """Last-position logits [B, V] of a whole forward, with the z edits given."""
        with self.editing(edits or {}):
            return self.last_logits(self.blocks_output(ids), lengths)

    def resume(self, rec: Recorded, start: int, k: int = 1, edits=None) -> torch.Tensor:
        """Last-position logits [k * B, V] of the recorded batch repeated k times (row j*B + b is prompt b), rerun
        from layer ``start`` with the z edits given (which must touch layers >= start only)."""
        assert not edits or min(edits) >= start
        args, kwargs = rec.calls[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        h = hidden.repeat(k, 1, 1) if k > 1 else hidden
        with self.editing(edits or {}):
            for i in range(start, self.n_layers):
                a, kw = rec.calls[i]
                kw = {key: _repeat(v, rec.batch, k) for key, v in kw.items() if key != "hidden_states"}
                rest = tuple(_repeat(v, rec.batch, k) for v in a[1:])
                h = _layer_out(self.adapter.blocks[i].layer(h, *rest, **kw))
        return self.last_logits(h, rec.lengths.repeat(k))

    # --- reading -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def z(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's z [B, T, n_heads * head_dim] on a batch."""
        got = read_activations(self.adapter, ids, [self.points[i] for i in range(self.n_layers)])
        return [got[self.points[i].name].clone() for i in range(self.n_layers)]

    @torch.no_grad()
    def outputs(self, seqs: list[list[int]], mode: str = "mean", progress=None, starts=None) -> torch.Tensor:
        """Every head's output r_h in the residual stream, [N, n_layers * n_heads, hidden]: the mean over each prompt's
        positions (``mode="mean"``, as O'Neill & Bui), at its last position (``"last"``), or the mean over its
        positions from ``starts[i]`` on (``"tail"``: for a pair, from the first token where its prompts differ)."""
        from sparsen.circuits.tasks import pad_batch

        if mode not in OUTPUT_MODES:
            raise ValueError(f"mode must be 'mean', 'last' or 'tail', not {mode!r}")
        if mode == "tail" and (starts is None or len(starts) != len(seqs)
                               or any(not 0 <= a < len(q) for a, q in zip(starts, seqs))):
            raise ValueError("mode 'tail' needs one start per prompt, each before the prompt's end")
        out = torch.empty(len(seqs), self.n, self.adapter.hidden_size)
        for s in range(0, len(seqs), self.max_rows):
            ids, lengths = pad_batch(seqs[s: s + self.max_rows], self.pad_id)
            at = torch.arange(ids.shape[1])[None]
            keep = at < lengths[:, None]
            if mode == "tail":
                keep &= at >= torch.as_tensor(starts[s: s + self.max_rows])[:, None]
            mask = keep.float()
            got = {}

            def reader(i):
                def fn(z):
                    if mode != "last":
                        pooled = (z * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                    else:
                        pooled = z[torch.arange(z.shape[0]), lengths - 1]
                    got[i] = head_results(pooled.float(), self.w_o(i).float(), self.n_heads, self.head_dim)
                    if i == self.n_layers - 1:
                        raise StopForward
                return fn

            with self.editing({i: reader(i) for i in range(self.n_layers)}):
                try:
                    self.adapter.trunk(ids)
                except StopForward:
                    pass
            out[s: s + len(ids)] = torch.cat([got[i] for i in range(self.n_layers)], 1)
            if progress is not None:
                progress.update(len(ids))
        return out

    @torch.no_grad()
    def logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Last-position logits [N, V] of prompts, in batches of ``max_rows``."""
        from sparsen.circuits.tasks import pad_batch

        outs = []
        for s in range(0, len(seqs), self.max_rows):
            ids, lengths = pad_batch(seqs[s: s + self.max_rows], self.pad_id)
            outs.append(self.forward(ids, lengths))
        return torch.cat(outs)

    # --- interventions -----------------------------------------------------------------------------------------------
    def patch_edits(self, nodes: list[int], source: list[torch.Tensor], batch: int) -> dict[int, Callable]:
        """Edits for a batch repeated len(nodes) times: in block j (rows j*batch..), node nodes[j]'s z at every position
        is replaced by ``source[layer]`` (the paired prompts' z, [batch, T, n_heads*head_dim])."""
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for j, node in enumerate(nodes):
            by_layer.setdefault(node // self.n_heads, []).append((j, node))

        def make(layer, items):
            def fn(z):
                z = z.clone()
                src = source[layer].to(z.dtype)
                for j, node in items:
                    c = self.cols(node)
                    z[j * batch:(j + 1) * batch, :, c] = src[:, : z.shape[1], c]
                return z
            return fn

        return {layer: make(layer, items) for layer, items in by_layer.items()}

    def ablate_edits(self, means: list[torch.Tensor], keep: set[int] | None = None) -> dict[int, Callable]:
        """Edits replacing the z of every head not in ``keep`` by its mean: ``means[layer]`` is [T, n_heads*head_dim]
        (per position, for any batch) or [B, T, n_heads*head_dim] (per row of the batch)."""
        keep = keep or set()
        edits = {}
        for layer in range(self.n_layers):
            cols = [self.cols(layer * self.n_heads + h) for h in range(self.n_heads)
                    if layer * self.n_heads + h not in keep]
            if not cols:
                continue

            def fn(z, layer=layer, cols=cols):
                z = z.clone()
                m = means[layer].to(z.dtype)
                m = m[None, : z.shape[1]] if m.dim() == 2 else m[:, : z.shape[1]]
                for c in cols:
                    z[:, :, c] = m[:, :, c]
                return z
            edits[layer] = fn
        return edits

    @torch.no_grad()
    def mean_z(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Per layer, the mean z over prompts at each position [T_max, n_heads*head_dim] (a position averages the prompts
        long enough to have it): the mean-ablation value."""
        from sparsen.circuits.tasks import pad_batch

        sums, counts = None, None
        for s in range(0, len(seqs), self.max_rows):
            chunk = seqs[s: s + self.max_rows]
            ids, lengths = pad_batch(chunk, self.pad_id)
            zs = self.z(ids)
            mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float()
            part = [(z.float() * mask[..., None]).sum(0) for z in zs]
            c = mask.sum(0)
            if sums is None:
                sums, counts = part, c
            else:
                t = max(sums[0].shape[0], part[0].shape[0])
                sums = [_pad_rows(a, t) + _pad_rows(b, t) for a, b in zip(sums, part)]
                counts = _pad_rows(counts[:, None], t)[:, 0] + _pad_rows(c[:, None], t)[:, 0]
        return [a / counts.clamp_min(1)[:, None] for a in sums]


def _pad_rows(x: torch.Tensor, t: int) -> torch.Tensor:
    if x.shape[0] >= t:
        return x
    return torch.cat([x, x.new_zeros(t - x.shape[0], *x.shape[1:])])
