"""Three changes to TEAL's magnitude thresholds, probed on SmolLM2 across domains (issue "Sparsity that travels"):

    .venv/bin/python benchmarks/threshold_variants.py [--variants wina,fisher,centre,gain] [--windows 6] [--ctx 512]

Every variant keeps x_i where a per-channel criterion exceeds its threshold, set per linear at a quantile of the
criterion over the calibration windows (one pass, dense activations, every linear at the same level):
  plain   |x_i|: TEAL;
  wina    |x_i| * ||W[:, i]||: WINA;
  fisher  |x_i| * sqrt(E[g_i^2]), g the gradient of the calibration text's loss with respect to that linear's own
          input: the expected loss a dropped input costs to first order, instead of its output norm;
  centre  |x_i - c_i| with c the channel's calibration median, a dropped input replaced by c_i instead of 0 (the
          mode-centring of SCAP, Chua et al. 2024: y = W sparse(x - c) + W c, a constant added to the output);
  relative  |x_i| / rms(x), the token's root-mean-square over the linear's inputs: thresholds that move with each
          token's scale (one of the issue's candidates; stat-topk assumes a Gaussian instead of calibrating);
  gain    plain, each linear's output scaled by the least-squares gain <y, y_s> / <y_s, y_s> of its sparse output
          y_s against the dense y on the calibration inputs (foldable into W: would undo a systematic shrink).
Per evaluation corpus (windows the calibration never reads; every position sparse, the `full` protocol): perplexity,
KL to the dense model per token and the achieved sparsity. TEAL at two levels gives the line the others are read
against at equal sparsity. A probe, not a method: thresholds are not re-set on sparse activations as `calibrate` does.
"""

import argparse
import math

import torch

from sparsen import load_model
from sparsen.data import corpus_windows

VARIANTS = ("wina", "fisher", "centre", "relative", "gain")  # each at level 0.5, beside TEAL ("plain") at 0.45 and 0.5
LEVELS = (0.45, 0.5)


def sample(v: torch.Tensor, n: int = 3_000_000) -> torch.Tensor:
    v = v.flatten()
    return v[torch.randperm(v.numel())[:n]] if v.numel() > n else v


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


@torch.no_grad()
def scores(lm, wins, dense) -> tuple[float, float]:
    """Perplexity of ``wins`` under the model as hooked now, and its KL per token to the ``dense`` log-probabilities."""
    nll = kl = n = 0.0
    for w, d in zip(wins, dense):
        lp = lm.model(w[None]).logits[0].float().log_softmax(-1)
        nll += -float(lp[:-1].gather(1, w[1:, None]).sum())
        kl += float((d.exp() * (d - lp)).sum(-1)[:-1].sum())
        n += len(w) - 1
    return math.exp(nll / n), kl / n


def input_grad_rms(lm, mods, wins) -> dict:
    """sqrt(mean over tokens of (dL/dx_i)^2) per linear and input channel, x that linear's own input."""
    zs, g2, n = {}, {s: 0.0 for s in mods}, 0

    def pre(s, args):
        zs[s] = torch.zeros_like(args[0], requires_grad=True)  # a per-linear copy of the shared input
        return (args[0] + zs[s],)

    hs = [m.register_forward_pre_hook(lambda _, a, s=s: pre(s, a)) for s, m in mods.items()]
    lm.model.requires_grad_(False)
    for w in wins:
        logits = lm.model(w[None]).logits[0].float()
        torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").backward()
        for s, z in zs.items():
            g2[s] = g2[s] + z.grad.reshape(-1, z.shape[-1]).pow(2).sum(0)
        n += len(w) - 1
    for h in hs:
        h.remove()
    return {s: (g2[s] / n).sqrt() for s in mods}


@torch.no_grad()
def linear_inputs(lm, mods, wins) -> dict:
    store = {s: [] for s in mods}
    hs = [m.register_forward_pre_hook(lambda _, a, s=s: store[s].append(a[0].reshape(-1, a[0].shape[-1])))
          for s, m in mods.items()]
    for w in wins:
        lm.adapter.trunk(w[None])
    for h in hs:
        h.remove()
    return {s: torch.cat(v) for s, v in store.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=6, help="evaluation windows per corpus")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--corpora", default="wikitext2-test,python-docs,python-code,licences")
    p.add_argument("--variants", default="wina,fisher,centre,gain", help=f"comma-separated, of {', '.join(VARIANTS)}")
    a = p.parse_args()
    chosen = a.variants.split(",")
    if not set(chosen) <= set(VARIANTS):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    runs = [("plain", LEVELS[0]), ("plain", LEVELS[1])] + [(v, LEVELS[1]) for v in chosen]
    torch.manual_seed(0)
    lm = load_model("smollm2")
    tok = lm.tokenizer
    mods = {s: m for s, _, _, m in lm.adapter.linear_sites()}
    grad = input_grad_rms(lm, mods, corpus_windows(tok, a.calib, a.ctx, 4)) if "fisher" in chosen else None
    xs = linear_inputs(lm, mods, corpus_windows(tok, a.calib, a.ctx, 8))
    cfg = {}
    with torch.no_grad():
        for s in list(xs):
            x, W = xs.pop(s), mods[s].weight.float()
            med = x.median(0).values
            scales = {"plain": torch.ones(x.shape[1]), "wina": W.norm(dim=0).clamp_min(1e-12),
                      **({"fisher": (grad[s] / grad[s].mean()).clamp_min(1e-12)} if grad else {})}
            c = {k: {lvl: sample(x.abs() * sc).quantile(lvl) / sc for lvl in LEVELS} for k, sc in scales.items()}
            c["centre"] = {lvl: sample((x - med).abs()).quantile(lvl).expand(x.shape[1]) for lvl in LEVELS}
            if "relative" in chosen:  # only when asked: its sample would move the random draws of the others
                c["relative"] = {lvl: sample(x.abs() / rms(x)).quantile(lvl) for lvl in LEVELS}
            c["gain"] = c["plain"]
            y, ys = x @ W.T, (x * (x.abs() > c["plain"][0.5])) @ W.T
            cfg[s] = {"t": c, "median": med, "gain": float((y * ys).sum() / (ys * ys).sum())}
    gains = torch.tensor([v["gain"] for v in cfg.values()])
    print(f"calibration {a.calib}; gain over the linears: median {gains.median():.4f}, "
          f"range {gains.min():.4f}-{gains.max():.4f}", flush=True)

    state = {"variant": None, "level": None, "dropped": 0, "n": 0}

    def pre(s, args):
        v = state["variant"]
        if v is None:
            return None
        x, t = args[0], cfg[s]["t"][v][state["level"]]
        if v == "centre":
            keep = (x - cfg[s]["median"]).abs() > t
            out = torch.where(keep, x, cfg[s]["median"])
        elif v == "relative":
            keep = x.abs() > t * rms(x)
            out = x * keep
        else:
            keep = x.abs() > t
            out = x * keep
        state["dropped"] += int((~keep).sum())
        state["n"] += keep.numel()
        return (out,)

    def post(s, y):
        return y * cfg[s]["gain"] if state["variant"] == "gain" else None

    for s, m in mods.items():
        m.register_forward_pre_hook(lambda _, args, s=s: pre(s, args))
        m.register_forward_hook(lambda _, args, y, s=s: post(s, y))

    for corpus in a.corpora.split(","):
        wins = corpus_windows(tok, corpus, a.ctx, a.windows)
        state["variant"] = None
        with torch.no_grad():
            dense = [lm.model(w[None]).logits[0].float().log_softmax(-1) for w in wins]
        ppl0, _ = scores(lm, wins, dense)
        print(f"{corpus}: dense perplexity {ppl0:.3f}", flush=True)
        rows = {}
        for v, lvl in runs:
            state.update(variant=v, level=lvl, dropped=0, n=0)
            ppl, kl = scores(lm, wins, dense)
            rows[v, lvl] = (ppl, kl, state["dropped"] / state["n"])
            state["variant"] = None
        (p0, k0, s0), (p1, k1, s1) = rows["plain", 0.45], rows["plain", 0.5]
        for (v, lvl), (ppl, kl, sp) in rows.items():
            f = (sp - s0) / (s1 - s0)  # TEAL at this sparsity: log-perplexity and KL interpolated
            teal_inc = math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0))) - ppl0
            teal_kl = k0 + f * (k1 - k0)
            print(f"  {v:6s} level {lvl}: sparsity {sp:.3f}  perplexity {ppl:.3f}  KL {kl:.4f}  "
                  f"increase / TEAL's {(ppl - ppl0) / teal_inc:.2f}  KL / TEAL's {kl / teal_kl:.2f}", flush=True)


if __name__ == "__main__":
    main()
