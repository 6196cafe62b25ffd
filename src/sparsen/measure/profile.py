"""`sparsen profile`: where a model is sparse ("lazy neurons"), per layer.

Measured inputs per block (q/k/v share one input, gate/up share one):
- ``attn_in``: input of q, k, v (post-attention-RMSNorm hidden state);
- ``o_in``: input of o (concatenated head outputs);
- ``mlp_in``: input of gate and up (post-MLP-RMSNorm hidden state);
- ``gate_act``: act(gate(x)) (SiLU for Llama, tanh-GELU for Gemma), what CATS thresholds;
- ``down_in``: input of down, the MLP intermediate act(gate(x)) * up(x).
Attention: per head, the share of causal keys needed to cover 90% / 95% of the attention mass.
Sensitivity: each input group alone, in every layer, made 50% / 70% sparse by exact per-token top-k
(no calibration): KL to the dense model and perplexity on the first windows. Input statistics alone
mislead for the residual stream, whose few massive channels act like an offset attention ignores.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.core.divergence import kl_sum
from sparsen.core.hooks import Sparsifier
from sparsen.core.rules import TopKRule
from sparsen.data import CALIB_CORPUS, corpus_windows
from sparsen.measure.stats import ActivationStats, attention_coverage
from sparsen.models.adapters import INPUT_GROUPS

SITES = ("attn_in", "o_in", "mlp_in", "gate_act", "down_in")
SITE_LABELS = {
    "attn_in": "q/k/v input",
    "o_in": "o input",
    "mlp_in": "gate/up input",
    "gate_act": "act(gate)",
    "down_in": "down input (MLP intermediate)",
}
COVER_FRACTIONS = (0.9, 0.95)
SENSITIVITY_SPARSITIES = (0.5, 0.7)


@torch.no_grad()
def group_sensitivity(lm, wins: torch.Tensor, sparsities=SENSITIVITY_SPARSITIES, progress: bool = True) -> dict:
    """KL(dense || sparse) per token and perplexity when one input group alone is top-k sparsified."""
    dense = [F.log_softmax(lm.model(w[None]).logits[0, :-1].float(), -1) for w in wins]
    targets = [w[1:] for w in wins]

    def nll(logps):
        return sum(-lp.gather(1, t[:, None]).sum().item() for lp, t in zip(logps, targets)) / sum(map(len, targets))

    out = {"windows": len(wins), "ctx": int(wins.shape[1]), "dense_ppl": float(torch.tensor(nll(dense)).exp()),
           "groups": {}}
    jobs = [(g, s) for g in INPUT_GROUPS for s in sparsities]
    for group, sp in tqdm(jobs, desc="sensitivity", disable=not progress, leave=False):
        rules = {site: TopKRule(sp) for site, _, name, _ in lm.adapter.linear_sites() if name in INPUT_GROUPS[group]}
        with Sparsifier(lm.adapter, rules):
            sparse = [F.log_softmax(lm.model(w[None]).logits[0, :-1].float(), -1) for w in wins]
        kl = sum(kl_sum(d, s).item() for d, s in zip(dense, sparse)) / sum(map(len, targets))
        out["groups"].setdefault(group, {})[str(sp)] = {"kl": kl, "ppl": float(torch.tensor(nll(sparse)).exp())}
    return out


@torch.no_grad()
def run_profile(lm, corpus: str = CALIB_CORPUS, tokens: int = 8192, ctx: int = 1024, attention: bool = True,
                sensitivity_windows: int = 2, progress: bool = True) -> dict:
    """Profile activations and attention of ``lm`` on ``tokens`` calibration tokens (windows of ``ctx``)."""
    if tokens < ctx:
        ctx = tokens
    n_windows = tokens // ctx
    wins = corpus_windows(lm.tokenizer, corpus, ctx, n_windows, bos=lm.window_bos)
    ad = lm.adapter
    dims = {"attn_in": ad.hidden_size, "o_in": ad.blocks[0].linears["o"].in_features, "mlp_in": ad.hidden_size,
            "gate_act": ad.intermediate_size, "down_in": ad.intermediate_size}
    stats = [{s: ActivationStats(dims[s]) for s in SITES} for _ in ad.blocks]
    heads = ad.n_heads
    cover_sum = torch.zeros(ad.n_layers, heads, len(COVER_FRACTIONS))

    handles = []
    for b in ad.blocks:
        st = stats[b.index]

        def pre(site, weight, st=st):
            return lambda mod, args: st[site].update(args[0], weight)

        # the output error of a shared input is measured through all the linears that read it
        qkv = torch.cat([b.linears[n].weight for n in ("q", "k", "v")])
        gate_up = torch.cat([b.linears[n].weight for n in ("gate", "up")])
        handles.append(b.linears["q"].register_forward_pre_hook(pre("attn_in", qkv)))
        handles.append(b.linears["o"].register_forward_pre_hook(pre("o_in", b.linears["o"].weight)))
        handles.append(b.linears["gate"].register_forward_pre_hook(pre("mlp_in", gate_up)))
        handles.append(b.linears["down"].register_forward_pre_hook(pre("down_in", b.linears["down"].weight)))
        handles.append(b.linears["gate"].register_forward_hook(
            lambda mod, a, out, st=st: st["gate_act"].update(ad.activation(out))))

    prev_impl = lm.config._attn_implementation
    if attention:
        lm.model.set_attn_implementation("eager")  # attention probabilities are only materialised by eager
    t0 = time.perf_counter()
    try:
        for w in tqdm(wins, desc="profile", unit="win", disable=not progress, leave=False):
            out = lm.model(w[None], output_attentions=attention)
            if attention:
                for i, a in enumerate(out.attentions):
                    cover_sum[i] += attention_coverage(a, COVER_FRACTIONS, min_keys=min(64, ctx), max_rows=128)
    finally:
        for h in handles:
            h.remove()
        if attention:
            lm.model.set_attn_implementation(prev_impl)

    sens = group_sensitivity(lm, wins[:sensitivity_windows], progress=progress) if sensitivity_windows else None
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
        "sensitivity": sens,
        "layers": layers,
    }


def summarize(layers: list[dict]) -> dict:
    """Mean over layers of the headline statistics, per site (and attention)."""
    out = {}
    for s in SITES:
        rows = [lay["sites"][s] for lay in layers]
        out[s] = {
            **({"out_err_50": sum(r["out_err"]["0.5"] for r in rows) / len(rows),
                "out_err_70": sum(r["out_err"]["0.7"] for r in rows) / len(rows)} if "out_err" in rows[0] else {}),
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
    head = f"{'input':<32}{'err@50%':>9}{'err@70%':>9}{'90% L2':>8}{'95% L2':>8}{'99% L2':>8}{'<0.1rms':>9}{'kurt':>8}"
    lines = [f"Lazy-neuron profile of {profile['model']} on {profile['tokens']} tokens of {profile['corpus']} "
             "(mean over layers).",
             "err@S = relative output error of the linear(s) reading the input when the S smallest-|x| entries of",
             "each token are zeroed (lower = more compressible); 'N% L2' = share of entries holding N% of a",
             "token's L2 mass; '<0.1rms' = share of entries below 0.1 x the token's RMS; kurt = median kurtosis.",
             head]
    for site in SITES:
        r = s[site]
        errs = (f"{r['out_err_50']:>9.3f}{r['out_err_70']:>9.3f}" if "out_err_50" in r else f"{'-':>9}{'-':>9}")
        lines.append(f"{SITE_LABELS[site]:<32}{errs}{r['l2_share_90']:>8.3f}{r['l2_share_95']:>8.3f}"
                     f"{r['l2_share_99']:>8.3f}{r['below_0.1rms']:>9.3f}{r['kurtosis_median']:>8.1f}")
    sens = profile.get("sensitivity")
    if sens:
        sps = list(next(iter(sens["groups"].values())))
        lines.append("")
        lines.append(f"Sensitivity: one input group alone made sparse in every layer (exact per-token top-k), "
                     f"{sens['windows']} window(s) of {sens['ctx']}; dense ppl {sens['dense_ppl']:.2f}")
        lines.append(f"{'input':<32}" + "".join(f"{'KL@' + str(int(float(s) * 100)) + '%':>10}{'ppl':>8}" for s in sps))
        for group, row in sens["groups"].items():
            lines.append(f"{SITE_LABELS[group]:<32}" + "".join(f"{row[s]['kl']:>10.4f}{row[s]['ppl']:>8.2f}" for s in sps))
    if "attention" in s:
        a = s["attention"]
        lines.append(f"attention: share of causal keys covering 90% / 95% of the mass (mean over heads, layers): "
                     f"{a['cover90']:.3f} / {a['cover95']:.3f}")
    return "\n".join(lines)
