"""RMSNorm gains tuned to the sparse model, probed on SmolLM2 across domains (issue "Sparsity that travels"):

    .venv/bin/python benchmarks/norm_tuning.py [--method teal:global] [--steps 200] [--windows 8] [--lora 16]

A plan is calibrated on the mixed calibration text as `sparsen frontier --calib-text mixed-calib` does. A copy of
the model then runs under the plan's hooks (decode protocol: each window's first half dense, the second sparse) and
its RMSNorm gains alone (61 x 576 numbers, folded into the weights at no cost per token) are trained by Adam on the
KL from the dense model's next-token distribution on calibration windows; the masks pass gradients to the inputs
they keep (the thresholds are fixed, so the achieved sparsity moves a little; every ratio is read at equal sparsity).
``--lora R`` trains a rank-R term B A beside every block linear as well (B starts at zero; the term reads the
linear's sparse input, so merged into the weight, W + B A, it costs nothing per token and skips the same columns).

Per evaluation corpus (8 windows of 1,024, decode, never read by calibration): achieved sparsity, perplexity
increase over dense and KL, each against uniform TEAL interpolated at the same achieved sparsity (TEAL at
--sparsity and 0.05 either side, in the same run), for the plan as calibrated and for the tuned copy. The
method itself is any config's ``tune_steps`` (``sparsen/methods/tuning.py``: the same training, the tuned weights
stored in the plan); this probe adds the held-out curve. The dense distributions of the tuning windows are held in
memory in half precision (160 windows take 8 GB); the last ``--holdout`` calibration windows are never tuned on,
and their KL, printed as tuning goes, is the curve to choose steps and learning rates by (the evaluation corpora
are not).
"""

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

from sparsen import calibrate, config_for, load_model
from sparsen.data import corpus_windows, eval_corpora
from sparsen.evaluation import scored_range, window_logprobs
from sparsen.evaluation.frontier import evaluate_grid, parse_method, relative_to_reference
from sparsen.methods.tuning import kl_to_dense, norm_gains


def plan_for(lm, spec: str, sparsity: float, calib: dict):
    name, allocation, segments, fields = parse_method(spec)
    return calibrate(lm, config_for(name, sparsity=sparsity, allocation=allocation, segments=segments, **fields,
                                    **calib), progress=False)


def add_lora(copy, rank: int, seed: int = 0) -> tuple[list[torch.nn.Parameter], list]:
    """A rank-``rank`` term (x A^T) B^T added to every block linear's output, x the input after the plan's mask
    (a forward hook sees the input as the plan's pre-hook returned it). Returns (parameters, handles)."""
    g = torch.Generator().manual_seed(seed)
    params, handles = [], []
    for _, _, _, lin in copy.adapter.linear_sites():
        a = torch.nn.Parameter(torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5)
        b = torch.nn.Parameter(torch.zeros(lin.out_features, rank))
        params += [a, b]
        handles.append(lin.register_forward_hook(lambda m, args, out, a=a, b=b: out + (args[0] @ a.T) @ b.T))
    return params, handles


@torch.no_grad()
def merge_lora(copy, params, handles) -> None:
    """W += B A, and the hooks removed: the tuned copy is then a plain model (thresholds unchanged)."""
    for h in handles:
        h.remove()
    for (_, _, _, lin), a, b in zip(copy.adapter.linear_sites(), params[0::2], params[1::2]):
        lin.weight += b @ a


def tune(copy, plan, wins, dense_logp, steps: int, lr: float, extra=(), extra_lr: float = 1e-4, held=None,
         check_every: int = 0) -> list[float]:
    """Adam on the copy's norm gains (and ``extra`` parameters at ``extra_lr``); returns the KL per step (mean over
    the scored half of one window). ``held`` = (windows, dense log-probs) never trained on: their mean KL is printed
    before the first step, every ``check_every`` steps and after the last."""
    start, stop = scored_range(wins.shape[1], "decode")
    copy.model.requires_grad_(False)
    gains = norm_gains(copy)
    for p in gains:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": gains}] + ([{"params": list(extra), "lr": extra_lr}] if extra else []), lr=lr)
    sp = plan.build_sparsifier(copy)
    sp.dense_prefix = start
    losses = []

    def check(step):
        if held is not None and check_every and (step % check_every == 0 or step == steps):
            with torch.no_grad():
                kl = np.mean([float(kl_to_dense(copy.model(w[None]).logits[0, start:stop], d))
                              for w, d in zip(*held)])
            tqdm.write(f"held-out calibration KL after {step} steps: {kl:.4f}")

    with sp:
        for step in tqdm(range(steps), desc="tune norms"):
            check(step)
            i = step % len(wins)
            loss = kl_to_dense(copy.model(wins[i][None]).logits[0, start:stop], dense_logp[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        check(steps)
    for p in gains:
        p.requires_grad_(False)
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="teal:global")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tune-windows", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--lora", type=int, default=0, help="rank of a tuned term beside every block linear (0: none)")
    ap.add_argument("--lora-lr", type=float, default=1e-4)
    ap.add_argument("--holdout", type=int, default=8, help="last calibration windows kept out of tuning")
    ap.add_argument("--check-every", type=int, default=40, help="steps between held-out KL checks (0: none)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    calib = {"corpus": "mixed-calib", "tokens": args.tokens, "ctx": 1024}
    lm = load_model("smollm2")
    teal = {s: plan_for(lm, "teal", s, calib) for s in (args.sparsity - 0.05, args.sparsity, args.sparsity + 0.05)}
    plan = plan_for(lm, args.method, args.sparsity, calib)
    print(f"calibrated in {time.perf_counter() - t0:.0f} s", flush=True)

    every = corpus_windows(lm.tokenizer, "mixed-calib", 1024, bos=lm.window_bos)
    if args.tune_windows + args.holdout > len(every):
        raise SystemExit(f"mixed-calib has {len(every)} windows: --tune-windows plus --holdout must not exceed it")
    wins, held = every[:args.tune_windows], every[len(every) - args.holdout:]
    scored = scored_range(wins.shape[1], "decode")
    dense_logp = [window_logprobs(lm.model, w, *scored).half() for w in tqdm(wins, desc="dense log-probs")]
    held_logp = [window_logprobs(lm.model, w, *scored).half() for w in held]
    copy = load_model("smollm2")
    plan.transform_(copy)  # a rotated plan's folded weights (nothing for plans without a transform)
    lora = add_lora(copy, args.lora) if args.lora else ([], [])
    losses = tune(copy, plan, wins, dense_logp, args.steps, args.lr, lora[0], args.lora_lr,
                  (held, held_logp) if args.holdout else None, args.check_every)
    if args.lora:
        merge_lora(copy, *lora)
    k = min(16, len(losses))
    print(f"tuning KL, first {k} steps {np.mean(losses[:k]):.4f}, last {k} {np.mean(losses[-k:]):.4f}", flush=True)

    configs = {f"teal@{s:g}": (lm.model, p.build_sparsifier(lm)) for s, p in teal.items()}
    owner = lm
    if plan.transform is not None:
        owner = load_model("smollm2")
        plan.transform_(owner)
    configs["plan"] = (owner.model, plan.build_sparsifier(owner))
    configs["tuned"] = (copy.model, plan.build_sparsifier(copy))
    print(f"\n{args.method} at {args.sparsity}, {args.steps} steps at lr {args.lr}"
          + (f", LoRA rank {args.lora} at lr {args.lora_lr}" if args.lora else "")
          + ": achieved · increase / TEAL's · KL / TEAL's")
    rows = [{"method": "teal", "target": s, "name": f"teal@{s:g}"} for s in teal]
    rows += [{"method": name, "target": args.sparsity, "name": name} for name in ("plan", "tuned")]
    for corpus in eval_corpora(["domains"]):
        record = evaluate_grid(lm, configs, rows, corpus, ("decode",), args.windows, 1024, progress=False)
        cells = []
        for row in record["rows"][len(teal):]:
            inc, kl = relative_to_reference(record, row, "decode")
            cells.append(f"{row['name']} {row['decode']['achieved']:.3f} · "
                         + " · ".join("n/a" if v is None else f"{v:.2f}" for v in (inc, kl)))
        print(f"{corpus}: dense {record['dense']['decode']['ppl']:.2f}; " + "; ".join(cells), flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
