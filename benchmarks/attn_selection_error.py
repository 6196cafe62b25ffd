"""How well each decode-time key selector picks keys, one layer at a time, without error propagation.

For task-suite samples, one dense forward captures every full-attention layer's q, k, v (after RoPE); then, for
the sparse positions (the trailing question and the answer prefix), each method's own ``keep()`` chooses keys as
it would when decoding, and this prints, averaged over samples, layers, query heads and positions:
- recall: the share of the exact attention probability the chosen keys hold;
- out_err: ||o_sparse - o_dense|| / ||o_dense|| of the attention output (softmax renormalised over the chosen keys);
- reads: the density of keys read including the estimate's vectors.
A fast proxy (minutes) for choosing a method's design before the task suite (hours); it measures one layer's
selection given dense inputs, not what a sparse model generates.

    python benchmarks/attn_selection_error.py --length 2048 --samples 3 --density 1/8 \\
        --methods "oracle-topk,quest,double-sparsity,sketch,sketch+basis=pca-k,sketch+rank=16"
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AttentionInterface

import sparsen
from sparsen.core import attention as A
from sparsen.evaluation.attn_frontier import build_plans, grid_specs
from sparsen.evaluation.tasks import generate_suite, prompt_tokens

CAPTURE = "sparsen-capture-qkv"


def capture(lm, ids) -> dict[int, tuple]:
    """Dense forward of ids; {layer: (q [heads, n, d], k, v [n_kv, n, d])}, fp32."""
    out = {}

    def fwd(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out[module.layer_idx] = (query[0].float(), key[0].float(), value[0].float())
        return A._dense(module, query, key, value, attention_mask, scaling, dropout, kw)

    AttentionInterface.register(CAPTURE, fwd)
    prev = lm.adapter.attention_implementation
    lm.adapter.attention_implementation = CAPTURE
    try:
        with torch.no_grad():
            lm.model(torch.tensor([ids]), logits_to_keep=1)
    finally:
        lm.adapter.attention_implementation = prev
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=3, help="samples per task")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--density", default="1/8")
    ap.add_argument("--methods", default="oracle-topk,sink-window,quest,double-sparsity,sketch")
    args = ap.parse_args()
    num, _, den = args.density.partition("/")
    density = float(num) / float(den) if den else float(num)
    lm = sparsen.load_model(args.model)
    plans = build_plans(lm, grid_specs([m for m in args.methods.split(",") if m.strip()], [density]))
    selectors = {label: plan.build_sparsifier(lm).attention_rules for label, plan in plans.items()}
    scale = lm.adapter.attn_scale
    totals = {label: [0.0, 0.0, 0.0, 0] for label in plans}
    per_layer: dict[str, dict[int, list]] = {label: {} for label in plans}
    suite = generate_suite(lm.tokenizer, lengths=[args.length], n=args.samples, seed=args.seed)
    for s in suite:
        ids, split = prompt_tokens(lm.tokenizer, s)
        qkv = capture(lm, ids)
        n = len(ids)
        for layer, (qf, k, v) in sorted(qkv.items()):
            n_kv, d = k.shape[0], k.shape[2]
            q = qf[:, split:].reshape(n_kv, -1, n - split, d)
            qpos = torch.arange(split, n)
            causal = torch.arange(n)[None, :] <= qpos[:, None]
            scores = (torch.einsum("hgmd,hkd->hgmk", q, k) * scale).masked_fill(~causal, -math.inf)
            probs = torch.softmax(scores, -1)
            dense = torch.einsum("hgmk,hkd->hgmd", probs, v)
            for label, rules in selectors.items():
                sel = rules.get(f"layers.{layer}.attn")
                if sel is None:  # a dense layer
                    keep = causal[None, None].expand_as(scores)
                    est = 0.0
                else:
                    sel.reset()
                    if sel.needs_prefix_mass:  # H2O: the mass of the dense prompt before the sparse positions
                        pre = torch.softmax((torch.einsum("hgmd,hkd->hgmk", qf[:, :split].reshape(n_kv, -1, split, d),
                                                          k[:, :split]) * scale).masked_fill(
                            torch.ones(split, split, dtype=torch.bool).triu(1), -math.inf), -1)
                        sel.observe_prefix(pre.sum(2).sum(1) if sel.shared else pre.sum(2).flatten(0, 1))
                    keep = sel.keep(q, k, qpos, scores).expand_as(scores) & causal
                    est = float(sel.estimate_reads(qpos + 1).sum()) * n_kv
                kept = probs * keep
                recall = kept.sum(-1)
                out = torch.einsum("hgmk,hkd->hgmd", kept / recall[..., None].clamp_min(1e-30), v)
                err = ((out - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-9)).mean()
                reads = (2 * keep.any(1).sum() + est) / (2 * causal.sum() * n_kv)
                t = totals[label]
                t[0] += float(recall.mean())
                t[1] += float(err)
                t[2] += float(reads)
                t[3] += 1
                per_layer[label].setdefault(layer, []).append(float(err))
        print(f"{s.id}: {n} tokens, {n - split} sparse positions", flush=True)
    print(f"\n{lm.spec}, {len(suite)} samples of {args.length} tokens, density {args.density}; mean over samples, layers, "
          "query heads and sparse positions")
    print("| method | recall | out_err | reads | out_err in layers 0-5 |\n|---|---|---|---|---|")
    for label, (rec, err, reads, c) in totals.items():
        first = " ".join(f"{sum(v) / len(v):.2f}" for _, v in sorted(per_layer[label].items())[:6])
        print(f"| {label} | {rec / c:.3f} | {err / c:.3f} | {reads / c:.3f} | {first} |")


if __name__ == "__main__":
    main()
