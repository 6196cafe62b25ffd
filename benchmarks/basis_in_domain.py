"""How much a basis fitted to the text being run buys, per domain (issue "Sparsity that travels"):

    .venv/bin/python benchmarks/basis_in_domain.py [--windows 6] [--ctx 512]

For every block linear that reads the residual stream (q, k, v, gate, up: each layer's two normed inputs) the
input is turned into the eigenbasis of its second moment, thresholded there by magnitude and turned back (what
folding the basis into the weights computes); o and down keep TEAL's thresholds. Every linear at the same level,
one pass on dense activations. The basis and thresholds come either from WikiText-2 validation (as `calibrate`
reads) or from 8 windows of the evaluated corpus itself that follow its 6 scored windows (an in-domain fit: what a
basis fitted on a user's own text could reach). Per corpus: perplexity increase and KL against TEAL (thresholds
from WikiText-2 validation, at four levels) interpolated at the same sparsity; a rotated basis undershoots its level
off the text it was fitted on, hence TEAL's low levels.
"""

import argparse
import math

import numpy as np
import torch
from threshold_variants import linear_inputs, scores  # this directory is on the path when a script in it runs

from sparsen import load_model
from sparsen.data import corpus_windows

RESIDUAL_READERS = ("q", "k", "v", "gate", "up")


def sample(v: torch.Tensor, n: int = 3_000_000) -> torch.Tensor:
    v = v.flatten()
    return v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:n]] if v.numel() > n else v


@torch.no_grad()
def fit(lm, mods, wins, levels) -> dict:
    """Per linear: TEAL's thresholds, and for residual readers a basis R with thresholds on |x R|."""
    xs = linear_inputs(lm, mods, wins)
    out = {}
    for s in list(xs):
        x = xs.pop(s)
        c = {"teal": {lvl: sample(x.abs()).quantile(lvl) for lvl in levels}}
        if s.split(".")[-1] in RESIDUAL_READERS:
            R = torch.linalg.eigh(x.T @ x / len(x)).eigenvectors
            c["R"] = R
            c["rotated"] = {lvl: sample((x @ R).abs()).quantile(lvl) for lvl in levels}
        out[s] = c
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--corpora", default="wikitext2-test,python-docs,python-code,licences")
    a = p.parse_args()
    lm = load_model("smollm2")
    tok = lm.tokenizer
    mods = {s: m for s, _, _, m in lm.adapter.linear_sites()}
    levels = (0.35, 0.4, 0.45, 0.5)
    state = {"cfg": None, "variant": None, "level": None, "dropped": 0, "n": 0}

    def pre(s, args):
        if state["variant"] is None:
            return None
        x, c, lvl = args[0], state["cfg"][s], state["level"]
        if state["variant"] == "rotated" and "R" in c:
            z = x @ c["R"]
            keep = z.abs() > c["rotated"][lvl]
            out = (z * keep) @ c["R"].T
        else:
            keep = x.abs() > c["teal"][lvl]
            out = x * keep
        state["dropped"] += int((~keep).sum())
        state["n"] += keep.numel()
        return (out,)

    for s, m in mods.items():
        m.register_forward_pre_hook(lambda _, args, s=s: pre(s, args))

    wiki = fit(lm, mods, corpus_windows(tok, "wikitext2-valid", a.ctx, 8), levels)
    for corpus in a.corpora.split(","):
        allw = corpus_windows(tok, corpus, a.ctx, a.windows + 8)
        wins = allw[:a.windows]
        own = fit(lm, mods, allw[a.windows:], levels)
        state["variant"] = None
        with torch.no_grad():
            dense = [lm.model(w[None]).logits[0].float().log_softmax(-1) for w in wins]
        ppl0, _ = scores(lm, wins, dense)
        print(f"{corpus}: dense perplexity {ppl0:.3f}", flush=True)
        def run(cfg, variant, level):
            state.update(cfg=cfg, variant=variant, level=level, dropped=0, n=0)
            ppl, kl = scores(lm, wins, dense)
            state["variant"] = None
            return ppl, kl, state["dropped"] / state["n"]

        teal = [run(wiki, "teal", lvl) for lvl in levels]
        sp_t = [t[2] for t in teal]
        print("  TEAL: " + ", ".join(f"{s:.3f}: {p:.3f} (KL {k:.4f})" for p, k, s in teal), flush=True)
        for source, cfg in (("wikitext2-valid", wiki), (f"{corpus} (in-domain)", own)):
            ppl, kl, sp = run(cfg, "rotated", 0.5)
            teal_inc = math.exp(np.interp(sp, sp_t, [math.log(t[0]) for t in teal])) - ppl0
            teal_kl = float(np.interp(sp, sp_t, [t[1] for t in teal]))
            inside = "" if sp_t[0] <= sp <= sp_t[-1] else " (outside TEAL's range: read as a bound)"
            print(f"  rotated, fitted on {source}: sparsity {sp:.3f}, perplexity {ppl:.3f}, KL {kl:.4f}, increase / "
                  f"TEAL's {(ppl - ppl0) / teal_inc:.2f}, KL / TEAL's {kl / teal_kl:.2f}{inside}", flush=True)


if __name__ == "__main__":
    main()
