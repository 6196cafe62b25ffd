"""Node and flip AUC of the code SAE under a stronger L1 and a null code (a head whose latents are all zero on a
prompt gets a code of its own instead of latent 0), against the ground truth committed in
benchmarks/results/circuits/TASK.json (no patching: the head outputs are recomputed, ~1 min per task).

    .venv/bin/python scripts/circuit_code_variants.py ioi,greater-than,docstring [3:null,10:null,3:null:centre]
        [--mode tail] [--codebook 400] [--train-prompts 40]

(the optional second argument: the variants to run, L1 multiple and "null" or "argmax", and ":centre" to code each
head's outputs less its own mean over all prompts; default the four in VARIANTS, ~3-5 min each per task on 2 cores;
--mode: the head outputs the codes and the baseline read, as `sparsen circuits --mode`; --codebook: the SAE's
latents, default the paper's 200; --train-prompts: the prompts the SAE is trained on, default the paper's 10).

Asks whether a code that can say "this head is quiet" sees the output magnitude the mean-difference baseline uses.
Each line: task, variant, node AUC, flip AUC and tv AUC (means of 10 seeds), the share of (prompt, head) rows coded
null, and the SAE's mean L0 and FVU on its training rows.
"""

import argparse
import json

import numpy as np
import torch

from sparsen.circuits.codes import code_run, default_lambda
from sparsen.circuits.heads import OUTPUT_MODES, Heads
from sparsen.circuits.run import CircuitConfig, _behaviour, roc_auc
from sparsen.circuits.tasks import build_task
from sparsen.circuits.truth import mean_difference
from sparsen.models import load_model

VARIANTS = [dict(l1_times=1, null=False), dict(l1_times=1, null=True), dict(l1_times=3, null=True),
            dict(l1_times=10, null=True)]


def committed_task(lm, name, mode="mean"):
    """The task's default config, its committed ground truth as labels over heads, and the head outputs of the
    positives the model solves and of their negatives (as `sparsen circuits` computes them); prints the baseline."""
    cfg = CircuitConfig(task=name)
    res = json.load(open(f"benchmarks/results/circuits/{name}.json"))
    names = res["heads"]["names"]
    labels = np.zeros(len(names), bool)
    labels[[names.index(n) for n in res["truth"]["sets"]["threshold"]]] = True
    heads = Heads(lm, max_rows=cfg.max_rows)
    task = build_task(name, lm.tokenizer, cfg.prompts, cfg.seed, model=lm.spec)
    beh = _behaviour(heads, task)
    work = task.subset([i for i in range(len(task)) if beh["m_pos"][i] > 0])
    starts = work.first_differences()
    op, on = heads.outputs(work.pos_ids, mode, None, starts), heads.outputs(work.neg_ids, mode, None, starts)
    print(name if mode == "mean" else f"{name} (mode {mode})", "ground truth", int(labels.sum()), "heads; mean-difference AUC",
          round(roc_auc(mean_difference(op, on), labels), 3), flush=True)
    return cfg, labels, op, on


def centred(op, on):
    """Each head's outputs less that head's mean over every prompt, positives and negatives alike (no labels)."""
    mean = torch.cat([op, on]).float().mean(0, keepdim=True)
    return op.float() - mean, on.float() - mean


def main(tasks, variants=VARIANTS, mode="mean", codebook=None, train_prompts=None):
    lm = load_model("smollm2")
    for name in tasks:
        cfg, labels, op, on = committed_task(lm, name, mode)
        book = codebook or cfg.codebook
        for v in variants:
            xp, xn = centred(op, on) if v.get("centre") else (op, on)
            runs = [code_run(xp, xn, seed=cfg.seed + s, d_sae=book, l1=default_lambda(name) * v["l1_times"],
                             train_prompts=train_prompts or cfg.sae_prompts, null_code=v["null"])
                    for s in range(cfg.seeds)]
            node = [roc_auc(r["node"], labels) for r in runs]
            flip = [roc_auc(r["flip"], labels) for r in runs]
            tv = [roc_auc(r["tv"], labels) for r in runs]
            quiet = [np.mean(np.concatenate([r["codes_pos"], r["codes_neg"]]) == book) for r in runs]
            print(name, v, *([f"codebook {book}"] if codebook else []),
                  *([f"train prompts {train_prompts}"] if train_prompts else []), "node", round(np.mean(node), 3), "flip",
                  round(np.mean(flip), 3), "tv", round(np.mean(tv), 3), "null share", round(np.mean(quiet), 3),
                  "train L0", round(np.mean([r["l0"] for r in runs]), 2), "FVU", round(np.mean([r["fvu"] for r in runs]), 3),
                  flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", nargs="?", default="ioi,greater-than,docstring")
    ap.add_argument("variants", nargs="?", default=None)
    ap.add_argument("--mode", default="mean", choices=OUTPUT_MODES)
    ap.add_argument("--codebook", type=int, default=None)
    ap.add_argument("--train-prompts", type=int, default=None)
    args = ap.parse_args()
    chosen = VARIANTS
    if args.variants:
        chosen = [dict(l1_times=float(m), null=kind == "null", **({"centre": True} if rest == ["centre"] else {}))
                  for m, kind, *rest in (v.split(":") for v in args.variants.split(","))]
    main(args.tasks.split(","), chosen, args.mode, args.codebook, args.train_prompts)
