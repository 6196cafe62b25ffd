"""The sweep behind `sparsen experiment random`: the pooled classifier (2,048 windows of 64 bytes, random labels; the
experiment until d53100d) and the language model fitting a label per position (the `tokens-*` variants;
`tokens-text-lr0.0045` and `-s1`, `-s2` train the experiment's configuration) under named training variants,
printing train accuracy, the nonzero share per layer and the dead units at the end. Runs are cached in OUT/runs.

    .venv/bin/python benchmarks/random_labels_lr.py OUT                   # lr 1e-3 and 5e-4, text, seed 0 (~5 min each)
    .venv/bin/python benchmarks/random_labels_lr.py OUT steps8000 wd0.1   # named variants below

BENCHMARKS.md's table: every variant below (`all`), seed 0 unless a variant names another (~2 h 15 min on 2 cores;
cached runs print at once).
"""

import sys
from pathlib import Path

import torch

from sparsen.train.experiments import BATCH, _data, random_label_task, run_cached, setting
from sparsen.train.model import LMConfig
from sparsen.train.trainer import LMTask, TrainConfig, load_trained

BASE = dict(steps=4000, batch=BATCH, lr=5e-4, warmup=50, evals=14, weight_decay=0.0, min_lr_share=0.5)
TOKENS = dict(steps=2000, lr=3e-3, warmup=100, evals=12, min_lr_share=0.1)  # the language model's own schedule
VARIANTS = {  # name: (inputs, training fields changed from BASE)
    "lr0.001": ("text", dict(lr=1e-3)),
    "lr0.0005": ("text", {}),
    "steps8000": ("text", dict(steps=8000, evals=16)),
    "wd0.1": ("text", dict(weight_decay=0.1)),
    "bytes-steps8000": ("random-bytes", dict(steps=8000, evals=16)),
    "lr0.002-warmup500": ("text", dict(lr=2e-3, warmup=500)),
    "cls": ("text", {}),  # model field: a CLS token read out instead of the mean over positions
    # the language model itself (causal, its own loss over every position) fitting a random label (of 10) per
    # position of 256 fixed windows, at its own rate: random labels without a pooled head
    "tokens-text": ("text", TOKENS),
    "tokens-bytes": ("random-bytes", TOKENS),
    "tokens-text-lr0.006": ("text", {**TOKENS, "lr": 6e-3}),
    "tokens-bytes-lr0.006": ("random-bytes", {**TOKENS, "lr": 6e-3}),
    # at the full setting's language-model rate (`experiment emergence --full`)
    "tokens-text-lr0.0045": ("text", {**TOKENS, "lr": 4.5e-3}),
    "tokens-bytes-lr0.0045": ("random-bytes", {**TOKENS, "lr": 4.5e-3}),
    "tokens-text-lr0.0045-s1": ("text", {**TOKENS, "lr": 4.5e-3, "seed": 1}),  # labels and weights of seed 1
    "tokens-text-lr0.0045-s2": ("text", {**TOKENS, "lr": 4.5e-3, "seed": 2}),
    # twice the windows (and labels) to fit
    "tokens-text-lr0.0045-n512": ("text", {**TOKENS, "lr": 4.5e-3}),
    # the default model's exact shape and schedule: 128 windows of 128 bytes, 1,000 steps of 32 x 128
    "tokens-text-ctx128": ("text", {**TOKENS, "lr": 4.5e-3, "steps": 1000}),
}
WINDOWS = {"tokens-text-lr0.0045-n512": 512, "tokens-text-ctx128": 128}  # per-position variants: 256 unless here
CTX = {"tokens-text-ctx128": 128}  # 64 unless here
PER_TOKEN = {name for name in VARIANTS if name.startswith("tokens-")}
MODEL = {"cls": dict(pool="cls")}
LM_CONTROLS = {  # the language model of `experiment emergence` (seed 0 unless said, 1,000 steps) at other rates
    "lm-lr0.0005": dict(lr=5e-4),
    # the classifier's schedule and bytes per step (16 x 128 = 32 x 64)
    "lm-as-classifier": dict(lr=5e-4, steps=4000, warmup=50, min_lr_share=0.5, batch=16),
    "lm-lr0.006": dict(lr=6e-3),  # twice its own rate
    "lm-lr0.006-s1": dict(lr=6e-3, seed=1),
    "lm-lr0.006-s2": dict(lr=6e-3, seed=2),
    "lm-lr0.0045": dict(lr=4.5e-3),
    "lm-lr0.0045-s1": dict(lr=4.5e-3, seed=1),
    "lm-lr0.0045-s2": dict(lr=4.5e-3, seed=2),
}

out = Path(sys.argv[1] if len(sys.argv) > 1 else "random_lr")
names = sys.argv[2:] or ["lr0.001", "lr0.0005"]
if names == ["all"]:
    names = [*VARIANTS, *LM_CONTROLS]
s = setting(True, 1, None, None)
n, ctx, classes, seed = 2048, 64, 10, 0
for name in names:
    if name in LM_CONTROLS:
        fields = {"steps": 1000, "warmup": 100, "evals": 16, "seed": seed, **LM_CONTROLS[name]}
        r = run_cached(out, LMConfig(), TrainConfig(**fields), LMTask(_data(s.text, 128)), False, name)
        f = r["final"]
        print(f"{name}: held-out loss {f['heldout_loss']:.3f}, nonzero per layer (held-out) "
              f"{[round(v, 3) for v in f['nnz_heldout']]}, dead per layer {[round(v, 3) for v in f['dead_heldout']]}; "
              "history " + "; ".join(f"{h['step']}: {[round(v, 2) for v in h['nnz_heldout']]}"
                                     for h in r["history"][-5:]), flush=True)
        continue
    inputs, fields = VARIANTS[name]
    per_token = name in PER_TOKEN
    run_seed = fields.get("seed", seed)
    vctx = CTX.get(name, ctx)
    task = random_label_task(_data(s.text, vctx), inputs, WINDOWS.get(name, 256) if per_token else n, vctx, classes,
                             run_seed, f"{inputs} x random labels", per_token=per_token)
    tcfg = TrainConfig(**{**BASE, **fields, "seed": run_seed})
    tag = f"text-lr{tcfg.lr}" if name.startswith("lr") else name  # the lr runs keep their first cache names
    cfg = LMConfig(ctx=vctx) if per_token else LMConfig(ctx=ctx, classes=classes, **MODEL.get(name, {}))
    r = run_cached(out, cfg, tcfg, task, False, tag)
    f = r["final"]
    if per_token:  # the trainer's sample is 32 windows; every training window here
        with torch.no_grad():
            f = {**f, "train_accuracy": LMTask.accuracy(load_trained(r["folder"])(task.x), task.y)}
    print(f"{name}: train accuracy {f['train_accuracy']:.3f}, nonzero per layer (training inputs) "
          f"{[round(v, 3) for v in f['nnz_train']]}, dead per layer {[round(v, 3) for v in f['dead_heldout']]}; "
          "history (step: nonzero per layer) " +
          "; ".join(f"{h['step']}: {[round(v, 2) for v in h['nnz_train']]}" for h in r["history"][-5:]), flush=True)
