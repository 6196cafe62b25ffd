"""`sparsen profile`: where a model is sparse ("lazy neurons"), per layer.

Measured inputs per block (q/k/v share one input, gate/up share one):
- ``attn_in``: input of q, k, v (post-attention-RMSNorm hidden state);
- ``o_in``: input of o (concatenated head outputs);
- ``mlp_in``: input of gate and up (post-MLP-RMSNorm hidden state);
- ``gate_act``: silu(gate(x)), what CATS thresholds;
- ``down_in``: input of down, the MLP intermediate silu(gate(x)) * up(x).
Attention: per head, the share of causal keys needed to cover 90% / 95% of the attention mass.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.data import CALIB_CORPUS, corpus_windows
from sparsen.measure.stats import ActivationStats, attention_coverage

SITES = ("attn_in", "o_in", "mlp_in", "gate_act", "down_in")
SITE_LABELS = {
    "attn_in": "q/k/v input",
    "o_in": "o input",
    "mlp_in": "gate/up input",
    "gate_act": "silu(gate)",
    "down_in": "down input (MLP intermediate)",
}
COVER_FRACTIONS = (0.9, 0.95)


@torch.no_grad()
def run_profile(lm, corpus: str = CALIB_CORPUS, tokens: int = 8192, ctx: int = 1024, attention: bool = True,
                progress: bool = True) -> dict:
    """Profile activations and attention of ``lm`` on ``tokens`` calibration tokens (windows of ``ctx``)."""
    if tokens < ctx:
        ctx = tokens
    n_windows = tokens // ctx
    wins = corpus_windows(lm.tokenizer, corpus, ctx, n_windows)
    ad = lm.adapter
    dims = {"attn_in": ad.hidden_size, "o_in": ad.blocks[0].linears["o"].in_features, "mlp_in": ad.hidden_size,
            "gate_act": ad.intermediate_size, "down_in": ad.intermediate_size}
    stats = [{s: ActivationStats(dims[s]) for s in SITES} for _ in ad.blocks]
    heads = lm.config.num_attention_heads
    cover_sum = torch.zeros(ad.n_layers, heads, len(COVER_FRACTIONS))

    handles = []
    for b in ad.blocks:
        st = stats[b.index]

        def pre(site, st=st):
            return lambda mod, args: st[site].update(args[0])

        handles.append(b.linears["q"].register_forward_pre_hook(pre("attn_in")))
        handles.append(b.linears["o"].register_forward_pre_hook(pre("o_in")))
        handles.append(b.linears["gate"].register_forward_pre_hook(pre("mlp_in")))
        handles.append(b.linears["down"].register_forward_pre_hook(pre("down_in")))
        handles.append(b.linears["gate"].register_forward_hook(lambda mod, a, out, st=st: st["gate_act"].update(F.silu(out))))

    prev_impl = lm.config._attn_implementation
    if attention:
        lm.model.set_attn_implementation("eager")  # attention probabilities are only materialised by eager
    t0 = time.perf_counter()
    try:
        for w in tqdm(wins, desc="profile", unit="win", disable=not progress, leave=False):
            out = lm.model(w[None], output_attentions=attention)
            if attention:
                for i, a in enumerate(out.attentions):
                    cover_sum[i] += attention_coverage(a, COVER_FRACTIONS, min_keys=min(64, ctx))
    finally:
        for h in handles:
            h.remove()
        if attention:
            lm.model.set_attn_implementation(prev_impl)

    layers = []
    for i in range(ad.n_layers):
        entry = {"layer": i, "sites": {s: stats[i][s].result() for s in SITES}}
        if attention:
            cov = cover_sum[i] / len(wins)
            entry["attention"] = {f"cover{int(f * 100)}": cov[:, j].tolist() for j, f in enumerate(COVER_FRACTIONS)}
        layers.append(entry)
    return {
        "model": lm.spec,
        "fingerprint": lm.fingerprint,
        "corpus": corpus,
        "tokens": int(wins.numel()),
        "ctx": ctx,
        "windows": len(wins),
        "seconds": time.perf_counter() - t0,
        "site_labels": SITE_LABELS,
        "summary": summarize(layers),
        "layers": layers,
    }


def summarize(layers: list[dict]) -> dict:
    """Mean over layers of the headline statistics, per site (and attention)."""
    out = {}
    for s in SITES:
        rows = [lay["sites"][s] for lay in layers]
        out[s] = {
            "l2_share_90": sum(r["l2_share"]["0.9"] for r in rows) / len(rows),
            "l2_share_95": sum(r["l2_share"]["0.95"] for r in rows) / len(rows),
            "l2_share_99": sum(r["l2_share"]["0.99"] for r in rows) / len(rows),
            "below_0.1rms": sum(r["below_rel_rms"]["0.1"] for r in rows) / len(rows),
            "kurtosis_median": sorted(r["kurtosis"] for r in rows)[len(rows) // 2],
        }
    if "attention" in layers[0]:
        for key in layers[0]["attention"]:
            vals = [v for lay in layers for v in lay["attention"][key]]
            out.setdefault("attention", {})[key] = sum(vals) / len(vals)
    return out


def format_table(profile: dict) -> str:
    s = profile["summary"]
    head = f"{'input':<32}{'90% L2':>8}{'95% L2':>8}{'99% L2':>8}{'<0.1rms':>9}{'kurt':>8}"
    lines = [f"Lazy-neuron profile of {profile['model']} on {profile['tokens']} tokens of {profile['corpus']} "
             "(mean over layers; 'N% L2' = share of entries needed to keep N% of each token's L2 mass):", head]
    for site in SITES:
        r = s[site]
        lines.append(f"{SITE_LABELS[site]:<32}{r['l2_share_90']:>8.3f}{r['l2_share_95']:>8.3f}{r['l2_share_99']:>8.3f}"
                     f"{r['below_0.1rms']:>9.3f}{r['kurtosis_median']:>8.1f}")
    if "attention" in s:
        a = s["attention"]
        lines.append(f"attention: share of causal keys covering 90% / 95% of the mass (mean over heads, layers): "
                     f"{a['cover90']:.3f} / {a['cover95']:.3f}")
    return "\n".join(lines)
