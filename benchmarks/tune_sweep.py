"""Tuning settings compared on held-out calibration text only (issue "Sparsity that travels"):

    .venv/bin/python benchmarks/tune_sweep.py [--method SPEC] [--sparsity 0.4] [--settings "80,80+tune_schedule=cosine"]

A plan is calibrated once on the mixed calibration text (as `sparsen frontier --calib-text mixed-calib` does, no
tuning); each setting then tunes a copy of it (`calibrate(..., untuned=plan)`: the method's own tuning step) and is
scored by the KL from the dense model on the mix's last ``--holdout`` windows, which no setting tunes on (decode
protocol: each window's first half dense, the rest sparse). A setting is the number of steps, then `+field=value`
for any of the config's tune_* fields. The evaluation corpora are not read: this is where a setting may be chosen.
"""

import argparse
import time
from pathlib import Path

import torch
from kl_anatomy import sparse_logprobs  # benchmarks/, beside this script

from sparsen import SparsenError, load_model
from sparsen.core.divergence import kl_sum
from sparsen.data import corpus_windows
from sparsen.evaluation import scored_range, window_logprobs
from sparsen.evaluation.frontier import parse_method
from sparsen.methods import calibrate, config_for
from sparsen.methods.config import parse_fields


def held_out_kl(lm, plan, held, dense_logp) -> float:
    logp, _ = sparse_logprobs(lm, plan, held)
    return float(kl_sum(torch.cat(dense_logp), logp)) / len(logp)


def parse_setting(text: str) -> tuple[int, dict]:
    steps, *fields = text.split("+")
    return int(steps), parse_fields(fields, "--settings")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="rotate-wina:global+hold=prompt")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--settings", default="80,80+tune_schedule=cosine")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--save", default=None, metavar="DIR", help="write the untuned and tuned plans here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = load_model("smollm2")
    name, allocation, segments, fields = parse_method(args.method)
    calib = {"corpus": "mixed-calib", "tokens": args.tokens, "ctx": 1024}
    base = dict(sparsity=args.sparsity, allocation=allocation, segments=segments, **fields, **calib)
    every = corpus_windows(lm.tokenizer, "mixed-calib", 1024, bos=lm.window_bos)
    settings = {}  # every setting checked before the first calibration, not after an hour of tuning
    for text in args.settings.split(","):
        steps, tune = parse_setting(text)
        if steps + args.holdout > len(every):
            raise SystemExit(f"{text}: {steps} steps would tune on held-out windows ({len(every)} in the mix)")
        try:
            settings[text] = config_for(name, **base, tune_steps=steps, **tune)
        except SparsenError as e:
            raise SystemExit(f"{text}: {e}") from None
    plan0 = calibrate(lm, config_for(name, **base), progress=False)
    held = every[len(every) - args.holdout:]
    dense_logp = [window_logprobs(lm.model, w, *scored_range(1024, "decode")) for w in held]
    print(f"{args.method} at {args.sparsity}: calibrated in {time.perf_counter() - t0:.0f} s; held-out KL on the "
          f"mix's last {args.holdout} of {len(every)} windows", flush=True)
    print(f"untuned: {held_out_kl(lm, plan0, held, dense_logp):.4f}", flush=True)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        plan0.save(Path(args.save) / "untuned.json")
    for text, config in settings.items():
        t1 = time.perf_counter()
        plan = calibrate(lm, config, progress=False, untuned=plan0)
        print(f"{text}: {held_out_kl(lm, plan, held, dense_logp):.4f} ({time.perf_counter() - t1:.0f} s)", flush=True)
        if args.save:
            plan.save(Path(args.save) / f"tuned_{text.replace('+', '_').replace('=', '-')}.json")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
