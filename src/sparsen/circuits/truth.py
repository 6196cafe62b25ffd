"""Ground truth on the model itself: which heads carry a task, by per-head activation patching (noising).

For each head h and each pair p, the positive is rerun with h's z at every position taken from its paired negative:

    num[p, h] = M_clean[p] - M_patched[p, h]          (what the head's clean activation contributes)
    effect_h  = sum_p num[p, h] / sum_p (M_clean[p] - M_neg[p])

the pair-averaged effect normalised by the pair-averaged total (a ratio of means: a pair whose positive and
negative happen to score alike would make its own ratio explode; the mean of per-pair ratios is kept beside it as
``effect_pairwise``). The per-pair numerators are kept, so disjoint halves of the pairs give their own sets.

Sets: the heads with |effect| >= 0.03, and the smallest set whose |effect| covers 80% of the total sum |effect|;
a bootstrap over the pairs says how firmly each head is in the first (a head near the threshold is in or out by
which pairs were drawn).
Check: keeping only a set's heads, every other head mean-ablated (its z replaced by the positives' mean z at each
position, the mean taken over the prompts of the same template so that positions align), should keep >= 50% of
M_clean. Baselines: attribution patching (one forward and backward: num estimated
by -(z_neg - z_pos) . dM/dz_h summed over positions and dimensions) and the mean-difference of head outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsen.circuits.heads import Heads, Recorded
from sparsen.circuits.tasks import Task, pad_batch


@dataclass
class Patching:
    num: np.ndarray
    """[P, n_nodes]: M_clean - M_patched per pair and head (NaN for heads not patched)"""
    m_clean: np.ndarray
    """[P]"""
    m_neg: np.ndarray
    """[P] the negatives scored with their positives' answers"""

    def effect(self, rows=None) -> np.ndarray:
        rows = slice(None) if rows is None else rows
        return self.num[rows].mean(0) / float((self.m_clean[rows] - self.m_neg[rows]).mean())

    def effect_pairwise(self, rows=None) -> np.ndarray:
        rows = slice(None) if rows is None else rows
        return (self.num[rows] / (self.m_clean[rows] - self.m_neg[rows])[:, None]).mean(0)


def _pair_chunks(n: int, max_rows: int):
    for s in range(0, n, max_rows):
        yield list(range(s, min(n, s + max_rows)))


@torch.no_grad()
def patch_heads(heads: Heads, task: Task, nodes=None, progress=None) -> Patching:
    """Per-head activation patching of every pair of ``task`` (all heads, or ``nodes``). A forward holds at most
    ``heads.max_rows`` prompt rows: the pairs of a chunk, repeated once per head patched in that forward."""
    nodes = sorted(range(heads.n) if nodes is None else nodes)
    p_all = len(task)
    num = np.full((p_all, heads.n), np.nan)
    m_clean, m_neg = np.empty(p_all), np.empty(p_all)
    for rows in _pair_chunks(p_all, heads.max_rows):
        sub = task.subset(rows)
        ids, lengths = pad_batch(sub.pos_ids, heads.pad_id)
        ids_neg, _ = pad_batch(sub.neg_ids, heads.pad_id)
        rec = Recorded(heads, ids, lengths)
        z_neg = heads.z(ids_neg)
        mc = sub.metric(rec.logits)
        m_clean[rows] = mc.numpy()
        m_neg[rows] = sub.metric(heads.forward(ids_neg, lengths)).numpy()
        b = len(rows)
        k = max(1, heads.max_rows // b)
        for s in range(0, len(nodes), k):
            group = nodes[s: s + k]
            start = group[0] // heads.n_heads
            logits = heads.resume(rec, start, len(group), heads.patch_edits(group, z_neg, b))
            mp = sub.metric(logits, torch.arange(b).repeat(len(group))).reshape(len(group), b)
            num[rows[0]: rows[-1] + 1, group] = (mc[None] - mp).T.numpy()
            if progress is not None:
                progress.update(len(group) * b)
    return Patching(num, m_clean, m_neg)


def threshold_set(effect: np.ndarray, threshold: float = 0.03) -> list[int]:
    """Heads with |effect| >= threshold, in head order."""
    return [int(i) for i in np.flatnonzero(np.abs(np.nan_to_num(effect)) >= threshold)]


def cover_set(effect: np.ndarray, fraction: float = 0.8) -> list[int]:
    """The smallest set of heads whose |effect| sums to at least ``fraction`` of the total sum |effect|, in head order."""
    a = np.abs(np.nan_to_num(effect))
    total = a.sum()
    if total <= 0:
        return []
    order = np.argsort(-a, kind="stable")
    csum = np.cumsum(a[order])
    k = int(np.searchsorted(csum, fraction * total - 1e-12 * total) + 1)
    return sorted(int(i) for i in order[:k])


def bootstrap_threshold(patched: Patching, threshold: float = 0.03, n: int = 1000, seed: int = 0) -> dict:
    """How much the thresholded set owes to which pairs were drawn: ``n`` resamples of the pairs with replacement,
    each giving its own effect and set. Returns the set size's distribution (quantiles 5/50/95 and the share of
    resamples in the 5-40 gate) and each head's share of resamples that put it in the set ([n_nodes])."""
    rng = np.random.default_rng(seed)
    p = len(patched.m_clean)
    num = np.nan_to_num(patched.num)
    draws = rng.integers(0, p, (n, p))
    weight = np.zeros((n, p))  # how often each pair is drawn, per resample
    np.add.at(weight, (np.arange(n)[:, None], draws), 1.0 / p)
    effect = (weight @ num) / (weight @ (patched.m_clean - patched.m_neg))[:, None]  # [n, n_nodes]
    member = np.abs(effect) >= threshold
    sizes = member.sum(1)
    return {"resamples": n, "size_quantiles": {f"p{q}": float(np.quantile(sizes, q / 100)) for q in (5, 50, 95)},
            "size_in_gate": float(((sizes >= 5) & (sizes <= 40)).mean()), "p_in_set": member.mean(0)}


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def halves(p: int) -> tuple[list[int], list[int]]:
    """Two disjoint halves of p pairs: even and odd indices (the generator's order is already random)."""
    return list(range(0, p, 2)), list(range(1, p, 2))


@torch.no_grad()
def template_means(heads: Heads, task: Task) -> dict[int, list[torch.Tensor]]:
    """The mean-ablation values: per template (``task.groups``), every layer's mean z over the task's positives of that
    template at each position [T, n_heads*head_dim] (prompts of one template align position by position)."""
    by: dict[int, list[int]] = {}
    for i in range(len(task)):
        by.setdefault(task.group_of(i), []).append(i)
    return {g: heads.mean_z([task.pos_ids[i] for i in rows]) for g, rows in by.items()}


def _row_means(means: dict[int, list[torch.Tensor]], sub: Task, t: int) -> list[torch.Tensor]:
    """Per layer, [B, t, d]: each row's template means (zero past a template's length: only padding is there)."""
    out = []
    for layer in range(len(next(iter(means.values())))):
        rows = []
        for i in range(len(sub)):
            m = means[sub.group_of(i)][layer][:t]
            rows.append(torch.cat([m, m.new_zeros(t - m.shape[0], m.shape[1])]) if m.shape[0] < t else m)
        out.append(torch.stack(rows))
    return out


@torch.no_grad()
def mean_ablation(heads: Heads, task: Task, means: dict[int, list[torch.Tensor]], keep_sets: dict[str, list[int]]) -> dict:
    """M on the task's positives with every head outside a kept set mean-ablated (``means``: ``template_means``), per
    set; also with nothing kept. Returns {"m_clean", "m_all_ablated", name: {"m", "retained", "retained_vs_ablated"}}."""
    def run(keep):
        out = []
        for rows in _pair_chunks(len(task), heads.max_rows):
            sub = task.subset(rows)
            ids, lengths = pad_batch(sub.pos_ids, heads.pad_id)
            edits = {} if keep is None else heads.ablate_edits(_row_means(means, sub, ids.shape[1]), set(keep))
            out.append(sub.metric(heads.forward(ids, lengths, edits)))
        return float(torch.cat(out).mean())

    clean = run(None)
    none = run([])
    res = {"m_clean": clean, "m_all_ablated": none}
    for name, keep in keep_sets.items():
        m = run(keep)
        res[name] = {"heads": len(keep), "m": m, "retained": m / clean if clean else float("nan"),
                     "retained_vs_ablated": (m - none) / (clean - none) if clean != none else float("nan")}
    return res


def attribution_patching(heads: Heads, task: Task) -> np.ndarray:
    """Attribution patching: [P, n_nodes] first-order estimates of num = M_clean - M_patched, from one forward and
    backward of the positives (dM/dz at every layer) and the negatives' z."""
    out = np.empty((len(task), heads.n))
    for rows in _pair_chunks(len(task), heads.max_rows):
        sub = task.subset(rows)
        ids, lengths = pad_batch(sub.pos_ids, heads.pad_id)
        ids_neg, _ = pad_batch(sub.neg_ids, heads.pad_id)
        z_neg = heads.z(ids_neg)
        leaves, z_pos = {}, {}

        def tap(layer):
            def fn(z):
                z_pos[layer] = z.detach()
                leaves[layer] = torch.zeros_like(z, requires_grad=True)
                return z + leaves[layer]
            return fn

        with torch.enable_grad():
            logits = heads.forward(ids, lengths, {i: tap(i) for i in range(heads.n_layers)})
            sub.metric(logits).sum().backward()
        b = len(rows)
        for layer in range(heads.n_layers):
            g = leaves[layer].grad
            d = (z_neg[layer].float() - z_pos[layer].float()) * g.float()
            change = d.reshape(b, d.shape[1], heads.n_heads, heads.head_dim).sum((1, 3))  # ~ M_patched - M_clean
            out[rows[0]: rows[-1] + 1, layer * heads.n_heads:(layer + 1) * heads.n_heads] = (-change).numpy()
    return out


def mean_difference(outputs_pos: torch.Tensor, outputs_neg: torch.Tensor) -> np.ndarray:
    """||mean r_h(positives) - mean r_h(negatives)|| per head, from [N, n_nodes, d] outputs."""
    return (outputs_pos.float().mean(0) - outputs_neg.float().mean(0)).norm(dim=-1).numpy()
