"""A residual-stream basis fitted on each prompt at run time, decode protocol (issue "Sparsity that travels"):

    .venv/bin/python benchmarks/basis_from_prompt.py [--windows 6] [--ctx 1024] [--level 0.5] [--shrink 0,0.5]
        [--segments 1,4] [--values] [--levels-from PLAN]

Each window's first half is the prompt (computed dense), the second half is scored with every linear sparse, as
`sparsen eval --protocol decode` does. The rotated variants compute what `rotate` folds into the weights (norm gains
folded, the residual stream in an orthogonal basis Q per run of layers, the readers q/k/v and gate/up thresholded on
Q^T of their gain-free input): free, apart from the d x d change of basis between runs, charged against the
sparsity as `calibrate` charges it. Q is the eigenbasis of the second moment of the q and gate inputs of the run's
layers on the window's own prompt (the rows the dense prefill computes), shrunk toward WikiText-2 validation's by
the --shrink weight; the engine would refold its weights per prompt. Every linear's threshold (o and down by plain
magnitude) is the level's quantile on the prompt's dense inputs. Beside it, in the same run: WikiText-2
validation's basis with the same prompt-held thresholds (`rotate+hold=prompt`), TEAL with prompt-held thresholds,
and TEAL with WikiText-2 validation's thresholds at six levels, the line every ratio is read against at the same
achieved (parameter-weighted) sparsity, interpolated. One pass on dense activations, every linear at the same
level unless --levels-from names a plan: a probe, not a method.
"""

import argparse
import json
import math

import numpy as np
import torch

from sparsen import load_model
from sparsen.data import corpus_windows
from sparsen.methods.rotation import segment_of, segment_starts

READERS = {"q": "attn", "k": "attn", "v": "attn", "gate": "mlp", "up": "mlp"}
TEAL_LEVELS = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def sample(v: torch.Tensor, n: int = 2_000_000) -> torch.Tensor:
    v = v.flatten()
    return v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:n]] if v.numel() > n else v


def moments(rows: dict, n_layers: int, segments: int) -> list[torch.Tensor]:
    """Per run of layers, the second moment of the gain-free q and gate inputs in ``rows[(layer, kind)]``."""
    starts = segment_starts(n_layers, segments) + [n_layers]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        xs = [rows[(layer, kind)] for layer in range(a, b) for kind in ("attn", "mlp")]
        out.append(sum(x.T.double() @ x.double() for x in xs) / sum(len(x) for x in xs))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--level", type=float, default=0.5)
    p.add_argument("--shrink", default="0,0.5", help="weights of the calibration moment in the prompt's bases")
    p.add_argument("--segments", default="1,4", help="runs of layers, one basis each")
    p.add_argument("--corpora", default="wikitext2-test,python-docs,python-code,licences")
    p.add_argument("--values", action="store_true",
                   help="the prompt variants also turn each value head into its prompt eigenbasis (o's input; free)")
    p.add_argument("--levels-from", help="a plan whose per-linear targets replace --level in the prompt-held variants")
    a = p.parse_args()
    site_level = {}
    if a.levels_from:
        site_level = {s: v["target"] for s, v in json.load(open(a.levels_from))["sites"].items()}
    torch.manual_seed(0)
    lm = load_model("smollm2")
    ad, tok = lm.adapter, lm.tokenizer
    L, d = ad.n_layers, ad.hidden_size
    mods = {s: m for s, _, _, m in ad.linear_sites()}
    params = {s: m.weight.numel() for s, m in mods.items()}
    total = sum(params.values())
    gain = {}
    for b in ad.blocks:
        for name, kind in READERS.items():
            gain[f"layers.{b.index}.{name}"] = ad.norm_gain(b.attn_norm if kind == "attn" else b.mlp_norm).float()
    n_q, n_kv = ad.n_heads, ad.n_kv_heads
    hd, rep = ad.head_dim, n_q // n_kv
    P = a.ctx // 2
    state = {"mode": None, "rows": {}, "dropped": 0.0}

    def pre(s, args):
        mode, x = state["mode"], args[0]
        layer, name = int(s.split(".")[1]), s.split(".")[-1]
        kind = READERS.get(name)
        if mode == "capture":  # the rows the dense prefill computes: gain-free reader inputs, raw o/down inputs
            if name in ("q", "gate"):
                state["rows"][(layer, kind)] = x[0, :P] / gain[s]
            elif kind is None:
                state["rows"][s] = x[0, :P]
            return None
        if mode is None:
            return None
        Q, t = mode["Q"][layer] if kind and "Q" in mode else None, mode["t"][s]
        Qo = mode["Qo"][layer] if name == "o" and "Qo" in mode else None
        xs = x[0, P:]
        if Qo is not None:  # per query head, its value head's basis
            z = torch.einsum("thi,hij->thj", xs.view(-1, n_q, hd), Qo.repeat_interleave(rep, 0)).reshape(xs.shape)
        else:
            z = xs / gain[s] @ Q if Q is not None else xs
        keep = z.abs() > t
        z = z * keep
        out = x.clone()
        if Qo is not None:
            z = torch.einsum("thj,hij->thi", z.view(-1, n_q, hd), Qo.repeat_interleave(rep, 0)).reshape(xs.shape)
            out[0, P:] = z
        else:
            out[0, P:] = (z @ Q.T) * gain[s] if Q is not None else z
        state["dropped"] += float((~keep).sum()) / keep.shape[0] / keep.shape[1] * params[s]
        return (out,)

    for s, m in mods.items():
        m.register_forward_pre_hook(lambda _, args, s=s: pre(s, args))

    # WikiText-2 validation: TEAL's thresholds per linear at every level, and the moments the bases shrink toward
    cal_inputs = {s: [] for s in mods}
    state["mode"] = "capture"
    for w in corpus_windows(tok, "wikitext2-valid", a.ctx, 8):  # their first halves, as for the prompts
        with torch.no_grad():
            ad.trunk(w[None])
        for key, v in state["rows"].items():
            cal_inputs.setdefault(key, []).append(v)
        state["rows"] = {}
    teal_t = {}
    for s in mods:
        if READERS.get(s.split(".")[-1]) is None:
            x = torch.cat(cal_inputs[s])
        else:  # thresholds on the model's own inputs (gain included), as TEAL reads them
            x = torch.cat(cal_inputs[(int(s.split(".")[1]), READERS[s.split(".")[-1]])]) * gain[s]
        teal_t[s] = dict(zip(TEAL_LEVELS, sample(x.abs()).quantile(torch.tensor(TEAL_LEVELS))))
    cal_rows = {k: torch.cat(v) for k, v in cal_inputs.items() if isinstance(k, tuple)}
    segments = [int(v) for v in a.segments.split(",")]
    cal_moment = {S: moments(cal_rows, L, S) for S in segments + [1]}
    del cal_inputs, cal_rows

    def level(s):
        return site_level.get(s, a.level)

    def value_bases() -> list[torch.Tensor]:
        """Per layer and value head, the eigenbasis of its query heads' outputs on the prompt [n_kv, hd, hd]."""
        out = []
        for layer in range(L):
            x = state["rows"][f"layers.{layer}.o"].view(-1, n_kv, rep, hd).double()
            out.append(torch.linalg.eigh(torch.einsum("tgri,tgrj->gij", x, x))[1].float())
        return out

    def fitted(Qs: list[torch.Tensor], S: int, Qo=None) -> dict:
        """Per layer its run's basis; per linear the level's quantile of its prompt input (rotated for readers)."""
        seg = segment_of(L, segment_starts(L, S))
        Q = [Qs[seg[i]].float() for i in range(L)]
        t = {}
        for s in mods:
            layer, name = int(s.split(".")[1]), s.split(".")[-1]
            x = state["rows"][(layer, READERS[name])] @ Q[layer] if name in READERS else state["rows"][s]
            if name == "o" and Qo is not None:
                x = torch.einsum("thi,hij->thj", x.view(-1, n_q, hd), Qo[layer].repeat_interleave(rep, 0))
            t[s] = x.abs().quantile(level(s))
        return {"Q": Q, "t": t, "charge": (S - 1) * d * d / total, **({"Qo": Qo} if Qo is not None else {})}

    shrinks = [float(v) for v in a.shrink.split(",")]
    names = ["teal-prompt", "wiki-basis"] + [f"prompt S={S} shrink={w}" for S in segments for w in shrinks]
    wiki_Q = torch.linalg.eigh(cal_moment[1][0])[1]
    for corpus in a.corpora.split(","):
        wins = corpus_windows(tok, corpus, a.ctx, a.windows)
        runs = [f"teal {lvl}" for lvl in TEAL_LEVELS] + names
        tally = {r: [0.0, 0.0, 0.0] for r in runs}  # nll, kl, effective sparsity summed over windows
        dense_nll = n_scored = 0.0
        for w in wins:
            targets = w[P + 1:]
            with torch.no_grad():
                state.update(mode="capture", rows={})
                dl = lm.model(w[None]).logits[0, P:-1].float().log_softmax(-1)
                dense_nll += -float(dl.gather(1, targets[:, None]).sum())
                n_scored += len(targets)
                modes = {f"teal {lvl}": {"t": {s: teal_t[s][lvl] for s in mods}, "charge": 0.0} for lvl in TEAL_LEVELS}
                modes["teal-prompt"] = {"t": {s: state["rows"][(int(s.split(".")[1]), READERS[s.split(".")[-1]])]
                                              .mul(gain[s]).abs().quantile(level(s)) if s.split(".")[-1] in READERS
                                              else state["rows"][s].abs().quantile(level(s)) for s in mods},
                                        "charge": 0.0}
                modes["wiki-basis"] = fitted([wiki_Q], 1)
                Qo = value_bases() if a.values else None
                for S in segments:
                    prompt_m = moments(state["rows"], L, S)
                    for wt in shrinks:
                        Qs = [torch.linalg.eigh((1 - wt) * pm + wt * cm)[1] for pm, cm in zip(prompt_m, cal_moment[S])]
                        modes[f"prompt S={S} shrink={wt}"] = fitted(Qs, S, Qo)
                for r in runs:
                    state.update(mode=modes[r], dropped=0.0)
                    lp = lm.model(w[None]).logits[0, P:-1].float().log_softmax(-1)
                    state["mode"] = None
                    tl = tally[r]
                    tl[0] += -float(lp.gather(1, targets[:, None]).sum())
                    tl[1] += float((dl.exp() * (dl - lp)).sum())
                    tl[2] += state["dropped"] / total - modes[r]["charge"]
        ppl0 = math.exp(dense_nll / n_scored)
        res = {r: (math.exp(t[0] / n_scored), t[1] / n_scored, t[2] / len(wins)) for r, t in tally.items()}
        teal = [res[f"teal {lvl}"] for lvl in TEAL_LEVELS]
        sp_t = [r[2] for r in teal]
        print(f"{corpus}: dense perplexity {ppl0:.3f} ({len(wins)} windows of {a.ctx}, second half scored)")
        print("  TEAL (WikiText-2 validation thresholds): "
              + ", ".join(f"{s:.3f}: {q:.3f} (KL {k:.4f})" for q, k, s in teal))
        for r in names:
            ppl, kl, sp = res[r]
            inc = math.exp(np.interp(sp, sp_t, [math.log(v[0]) for v in teal])) - ppl0
            kl_t = float(np.interp(sp, sp_t, [v[1] for v in teal]))
            out = "" if sp_t[0] <= sp <= sp_t[-1] else " (outside TEAL's range)"
            print(f"  {r}: sparsity {sp:.3f}, perplexity {ppl:.3f}, KL {kl:.4f}, increase / TEAL's "
                  f"{(ppl - ppl0) / inc:.2f}, KL / TEAL's {kl / kl_t:.2f}{out}", flush=True)


if __name__ == "__main__":
    main()
