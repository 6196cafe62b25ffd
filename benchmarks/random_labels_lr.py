"""The learning rate of `sparsen experiment random`, chosen by this sweep: the text variant's classifier (seed 0,
2,048 windows of 64 bytes, 4,000 steps) at lr 1e-3 and 5e-4, printing train accuracy (the trainer's sample), the
nonzero share per layer and the dead units at the end. Runs are cached in OUT/runs.

    .venv/bin/python benchmarks/random_labels_lr.py OUT      # ~5 min per rate on 2 cores
"""

import sys
from pathlib import Path

import torch

from sparsen.train.experiments import BATCH, _data, run_cached, setting
from sparsen.train.model import LMConfig
from sparsen.train.trainer import ClassifyTask, TrainConfig

out = Path(sys.argv[1] if len(sys.argv) > 1 else "random_lr")
s = setting(True, 1, None, None)
n, ctx, classes, seed = 2048, 64, 10, 0
data = _data(s.text, ctx)
g = torch.Generator().manual_seed(1000 + seed)  # as the experiment draws them
x_all = torch.cat([data.batch(0, n, seed)[:, :ctx], data.heldout(256)[:, :ctx]])
y_all = torch.randint(classes, (n + 256,), generator=g)
task = ClassifyTask(x_all[:n], y_all[:n], x_all[n:], y_all[n:], "text x random labels")
for lr in (1e-3, 5e-4):
    tcfg = TrainConfig(steps=4000, batch=BATCH, lr=lr, warmup=50, seed=seed, evals=14, weight_decay=0.0,
                       min_lr_share=0.5)
    f = run_cached(out, LMConfig(ctx=ctx, classes=classes), tcfg, task, False, f"text-lr{lr}")["final"]
    print(f"lr {lr:g}: train accuracy {f['train_accuracy']:.3f}, nonzero per layer "
          f"{[round(v, 3) for v in f['nnz_train']]}, dead per layer {[round(v, 3) for v in f['dead_heldout']]}")
