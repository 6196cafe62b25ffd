"""Discrete-code scores that keep more than "codes seen only on positives", against the ground truth committed in
benchmarks/results/circuits/TASK.json (no patching; the head outputs recomputed):

    .venv/bin/python scripts/circuit_code_scores.py ioi,greater-than,docstring

Per task, the mean over the 10 seeds' SAEs (the paper's L1, and 3x it) of the node AUC of:
  node, null node, null flip: as `sparsen circuits` and scripts/circuit_code_variants.py;
  tv: the total-variation distance between a head's code frequencies on positives and on negatives (the paper's
      count of positive-only codes, with the frequencies kept);
  magN node / flip / tv: the same on codes that also carry the argmax latent's activation, binned N per octave (a
      code that sees how much a head writes, which the mean-difference baseline uses and argmax codes drop).
About 5 min per task on 2 cores.
"""

import sys

import numpy as np
import torch
from circuit_code_variants import committed_task  # this directory is on the path when a script in it runs

from sparsen.circuits.codes import default_lambda, flip_scores, node_scores, train_code_sae, tv_scores
from sparsen.circuits.run import roc_auc
from sparsen.models import load_model

OCTAVES = 16  # magnitude bins span 2^-8 .. 2^8


@torch.no_grad()
def argmax_and_value(sae, scale, outputs):
    n, h, d = outputs.shape
    f = sae.encode(outputs.reshape(-1, d).float() / scale)
    v, c = f.max(-1)
    return c.numpy().reshape(n, h), v.numpy().reshape(n, h)


def magnitude_codes(c, v, d_sae, per_octave):
    """(argmax latent or null, activation bin) as one int; a row with no active latent is null with its own bin."""
    bins = OCTAVES * per_octave
    b = np.clip(np.floor(np.log2(np.maximum(v, 1e-30)) * per_octave) + bins // 2, 0, bins - 1)
    b = np.where(v > 0, b, bins).astype(np.int64)
    return np.where(v > 0, c, d_sae) * (bins + 1) + b, (d_sae + 1) * (bins + 1)


def main(tasks):
    lm = load_model("smollm2")
    for name in tasks:
        cfg, labels, op, on = committed_task(lm, name)
        aucs = {}
        both = torch.cat([op, on])
        for s in range(cfg.seeds):  # code_run's draw of the training prompts
            pick = torch.randperm(len(both), generator=torch.Generator().manual_seed(10_000 + cfg.seed + s))
            train = both[pick[:cfg.sae_prompts]].reshape(-1, both.shape[-1])
            for l1x in (1, 3):
                sae, scale = train_code_sae(train, d_sae=cfg.codebook, l1=default_lambda(name) * l1x, seed=cfg.seed + s)
                (cp, vp), (cn, vn) = argmax_and_value(sae, scale, op), argmax_and_value(sae, scale, on)
                k = cfg.codebook
                np_, nn_ = np.where(vp > 0, cp, k), np.where(vn > 0, cn, k)
                scores = {"node": node_scores(cp, cn, k), "null node": node_scores(np_, nn_, k + 1),
                          "null flip": flip_scores(np_, nn_), "tv": tv_scores(cp, cn, k)}
                for per_octave in (2, 4):
                    (mp, km), (mn, _) = (magnitude_codes(cp, vp, k, per_octave), magnitude_codes(cn, vn, k, per_octave))
                    scores.update({f"mag{per_octave} node": node_scores(mp, mn, km),
                                   f"mag{per_octave} flip": flip_scores(mp, mn),
                                   f"mag{per_octave} tv": tv_scores(mp, mn, km)})
                for key, sc in scores.items():
                    aucs.setdefault((l1x, key), []).append(roc_auc(sc, labels))
        for (l1x, key), v in aucs.items():
            print(name, f"L1 x{l1x}", key, round(float(np.mean(v)), 3), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["ioi", "greater-than", "docstring"])
