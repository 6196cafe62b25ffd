"""How much of the normalized residual stream's energy does per-token top-k drop, in which basis?

Collects the q/k/v and gate/up inputs of SmolLM2 layers 5-9 (one segment of `rotate-wina`) on the
decode positions of 6 calibration windows, fits bases on two thirds of the rows and reports, on the
held-out third, the share of energy dropped when each row's 50% smallest coordinates are zeroed:
standard basis, eigenbasis of the second moment (PCA), and PCA refined by `topk_procrustes`.

    .venv/bin/python benchmarks/basis_energy.py
"""

import torch

from sparsen import load_model
from sparsen.data import CALIB_CORPUS, corpus_windows
from sparsen.methods.rotation import fold_norm_gains, topk_procrustes

torch.manual_seed(0)
lm = load_model("smollm2")
fold_norm_gains(lm)
wins = corpus_windows(lm.tokenizer, CALIB_CORPUS, 1024, 6)
rows, hooks = [], []
for layer in range(5, 10):
    for name in ("q", "gate"):
        hooks.append(lm.adapter.blocks[layer].linears[name].register_forward_pre_hook(
            lambda m, a: rows.append(a[0][0, 512:].double())))
with torch.no_grad():
    for w in wins:
        lm.model(w[None])
for h in hooks:
    h.remove()
X = torch.cat(rows)
perm = torch.randperm(len(X))
train, test = X[perm[: len(X) * 2 // 3]], X[perm[len(X) * 2 // 3:]]


def dropped(x, Q, share=0.5):
    z = x @ Q
    small = z.abs().topk(int(share * z.shape[1]), dim=1, largest=False).values
    return (small.pow(2).sum() / z.pow(2).sum()).item()


pca = torch.linalg.eigh(train.T @ train)[1].flip(-1)
refined = topk_procrustes(train, pca, keep=0.5)
print(f"{len(train)} fitting rows, {len(test)} held-out rows of layers 5-9; energy dropped by per-token top-k at 50%:")
for name, Q in (("standard basis", torch.eye(X.shape[1], dtype=torch.float64)), ("PCA", pca),
                ("PCA refined (top-k Procrustes)", refined)):
    print(f"  {name:<32} held-out {dropped(test, Q):.4%}   fitting rows {dropped(train, Q):.4%}")
