"""Node and flip AUC of the code SAE under a stronger L1 and a null code (a head whose latents are all zero on a
prompt gets a code of its own instead of latent 0), against the ground truth committed in
benchmarks/results/circuits/TASK.json (no patching: the head outputs are recomputed, ~1 min per task).

    .venv/bin/python scripts/circuit_code_variants.py ioi,greater-than,docstring [3:null,10:null]

(the optional second argument: the variants to run, L1 multiple and "null" or "argmax"; default the four in VARIANTS,
~3-5 min each per task on 2 cores).

Asks whether a code that can say "this head is quiet" sees the output magnitude the mean-difference baseline uses.
Each line: task, variant, node AUC and flip AUC (means of 10 seeds), the share of (prompt, head) rows coded null.
"""

import json
import sys

import numpy as np
import torch

from sparsen.circuits.codes import default_lambda, flip_scores, node_scores, train_code_sae
from sparsen.circuits.heads import Heads
from sparsen.circuits.run import CircuitConfig, _behaviour, roc_auc
from sparsen.circuits.tasks import build_task
from sparsen.circuits.truth import mean_difference
from sparsen.models import load_model

VARIANTS = [dict(l1_times=1, null=False), dict(l1_times=1, null=True), dict(l1_times=3, null=True),
            dict(l1_times=10, null=True)]


@torch.no_grad()
def codes(sae, scale, x, null):
    n, h, d = x.shape
    f = sae.encode(x.reshape(-1, d).float() / scale)
    c = f.argmax(-1)
    quiet = f.max(-1).values <= 0
    if null:
        c = torch.where(quiet, torch.full_like(c, f.shape[1]), c)
    return c.numpy().reshape(n, h), float(quiet.float().mean())


def main(tasks, variants=VARIANTS):
    lm = load_model("smollm2")
    for name in tasks:
        cfg = CircuitConfig(task=name)
        res = json.load(open(f"benchmarks/results/circuits/{name}.json"))
        names = res["heads"]["names"]
        labels = np.zeros(len(names), bool)
        labels[[names.index(n) for n in res["truth"]["sets"]["threshold"]]] = True
        heads = Heads(lm, max_rows=cfg.max_rows)
        task = build_task(name, lm.tokenizer, cfg.prompts, cfg.seed, model=lm.spec)
        beh = _behaviour(heads, task)
        work = task.subset([i for i in range(len(task)) if beh["m_pos"][i] > 0])
        op, on = heads.outputs(work.pos_ids, cfg.mode, None), heads.outputs(work.neg_ids, cfg.mode, None)
        print(name, "ground truth", int(labels.sum()), "heads; mean-difference AUC",
              round(roc_auc(mean_difference(op, on), labels), 3), flush=True)
        both = torch.cat([op, on])
        for v in variants:
            node, flip, quiet = [], [], []
            for seed in range(cfg.seeds):  # the seeds and training prompts of code_run
                g = torch.Generator().manual_seed(10_000 + seed)
                pick = torch.randperm(len(both), generator=g)[:cfg.sae_prompts]
                sae, scale = train_code_sae(both[pick].reshape(-1, both.shape[-1]),
                                            l1=default_lambda(name) * v["l1_times"], seed=seed)
                cp, qp = codes(sae, scale, op, v["null"])
                cn, qn = codes(sae, scale, on, v["null"])
                node.append(roc_auc(node_scores(cp, cn, cfg.codebook + 1), labels))
                flip.append(roc_auc(flip_scores(cp, cn), labels))
                quiet.append((qp + qn) / 2)
            print(name, v, "node", round(np.mean(node), 3), "flip", round(np.mean(flip), 3), "null share",
                  round(np.mean(quiet), 3), flush=True)


if __name__ == "__main__":
    chosen = VARIANTS
    if len(sys.argv) > 2:
        chosen = [dict(l1_times=float(m), null=kind == "null")
                  for m, kind in (v.split(":") for v in sys.argv[2].split(","))]
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["ioi", "greater-than", "docstring"], chosen)
