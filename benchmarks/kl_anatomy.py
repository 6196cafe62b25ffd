"""Where a plan's KL from the dense model comes from, per evaluation corpus (issue "Sparsity that travels"):

    .venv/bin/python benchmarks/kl_anatomy.py PLAN.json [PLAN.json ...] [--windows 4] [--text licences]

Decode protocol (each window's first half dense, the second half sparse and scored). Per plan: mean KL per token;
the share of the KL carried by the worst 1% and 10% of positions; the mean KL on the positions where the dense
model is most and least sure (thirds by its entropy); the sparse model's mean entropy against the dense one's; and
the KL with the sparse logits divided by the one temperature that lowers it most (a plan whose damage is mostly a
sharper or flatter distribution gains much there). Plans are files written by `sparsen calibrate` or
`benchmarks/tune_sweep.py --save`.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from sparsen import Plan, load_model  # sparsen.Plan: the API, which registers the methods' transforms
from sparsen.core.divergence import kl_per_position, kl_sum
from sparsen.data import corpus_windows, eval_corpora
from sparsen.evaluation import scored_range, window_logprobs

TEMPERATURES = np.round(np.arange(0.80, 1.26, 0.05), 2)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def sparse_logprobs(lm, plan, wins) -> tuple[torch.Tensor, float]:
    """The plan's log-probs on every window's scored half, stacked [positions, vocab], and its achieved sparsity."""
    work = lm.copy()
    plan.transform_(work)
    start, stop = scored_range(wins.shape[1], "decode")
    sp = plan.build_sparsifier(work)
    sp.dense_prefix = start
    with sp:
        logp = [window_logprobs(work.model, w, start, stop) for w in wins]
    return torch.cat(logp), sp.achieved()["overall"]


@torch.no_grad()
def anatomy(lm, plan, wins, dense) -> dict:
    logp, achieved = sparse_logprobs(lm, plan, wins)
    d = torch.cat(dense)
    per_pos = kl_per_position(d, logp)
    worst = per_pos.sort(descending=True).values
    n = len(per_pos)
    h = entropy(d)
    thirds = h.sort().indices.chunk(3)
    by_t = {float(t): float(kl_sum(d, F.log_softmax(logp / t, -1))) / n for t in TEMPERATURES}  # log-probs / t: logits / t
    best = min(by_t, key=by_t.get)
    return {"kl": float(per_pos.mean()), "top1%": float(worst[: max(1, n // 100)].sum() / per_pos.sum()),
            "top10%": float(worst[: max(1, n // 10)].sum() / per_pos.sum()),
            "kl_sure": float(per_pos[thirds[0]].mean()), "kl_unsure": float(per_pos[thirds[-1]].mean()),
            "entropy": float(entropy(logp).mean()), "dense_entropy": float(h.mean()),
            "best_t": best, "kl_at_best_t": by_t[best], "achieved": achieved}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--text", default="domains")
    args = ap.parse_args()
    lm = load_model("smollm2")
    plans = {p: Plan.load(p) for p in args.plans}
    print("plan: achieved · KL · worst 1% / 10% of positions' share · KL where dense is surest / least sure third · "
          "entropy (dense) · best temperature: KL")
    for corpus in eval_corpora([args.text]):
        wins = corpus_windows(lm.tokenizer, corpus, 1024, args.windows, bos=lm.window_bos)
        dense = [window_logprobs(lm.model, w, *scored_range(1024, "decode")) for w in wins]
        print(f"\n{corpus} ({args.windows} windows)")
        for name, plan in plans.items():
            a = anatomy(lm, plan, wins, dense)
            print(f"{name}: {a['achieved']:.3f} · {a['kl']:.4f} · {a['top1%']:.2f} / {a['top10%']:.2f} · "
                  f"{a['kl_sure']:.4f} / {a['kl_unsure']:.4f} · {a['entropy']:.3f} ({a['dense_entropy']:.3f}) · "
                  f"T={a['best_t']:.2f}: {a['kl_at_best_t']:.4f}", flush=True)


if __name__ == "__main__":
    main()
