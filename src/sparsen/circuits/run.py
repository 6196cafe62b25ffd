"""One task's circuit pipeline: behaviour gates, ground truth by patching, codes over seeds, AUCs, runtimes.

Stages (each timed):
  prompts      seeded pairs from ``tasks.build_task``
  behaviour    the model on positives and negatives: accuracy (M > 0) and mean M; positives the model gets wrong
               are dropped with their negatives (the method's positives are prompts the model solves)
  outputs      every head's pooled output (``mode``) on the kept positives and negatives
  truth        per-head patching of the first ``pairs`` kept pairs, both sets, halves; the mean-ablation check on
               every kept positive
  attribution  attribution patching of the same pairs (baseline)
  codes        per seed: the shared SAE, the codes, node, flip, tv and pair scores
  auc          ROC AUC of every score against the ground-truth sets, and a label-permutation null
Everything returned is JSON-able.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from sparsen.circuits.codes import CODE_SCORES, code_run, default_lambda
from sparsen.circuits.heads import OUTPUT_MODES, Heads
from sparsen.circuits.tasks import TASKS, Task, build_task, check_task
from sparsen.circuits.truth import (
    attribution_patching,
    bootstrap_threshold,
    cover_set,
    halves,
    jaccard,
    mean_ablation,
    mean_difference,
    patch_heads,
    template_means,
    threshold_set,
)
from sparsen.errors import SparsenError

ACCURACY_GATE = {"ioi": 0.75, "greater-than": 0.9, "docstring": 0.9}
NEG_SLACK = {"logit_diff": 1.0, "logit_vs_max": 1.0, "prob_diff": 0.05}
"""negatives pass when their mean M <= chance + this, and their accuracy <= chance accuracy + 0.1 (sampling slack)"""


@dataclass
class CircuitConfig:
    task: str
    prompts: int = 100
    """prompt pairs generated (positives and negatives each)"""
    pairs: int = 96
    """kept pairs patched for the ground truth (and attribution patching); with fewer, which heads pass the threshold
    depends on which pairs were drawn (the bootstrap in the report says how much)"""
    seeds: int = 10
    seed: int = 0
    """the prompts' seed; SAE seeds are seed .. seed + seeds - 1"""
    sae_prompts: int = 10
    codebook: int = 200
    l1: float | None = None
    """the SAE's L1 weight (default: the paper's, 0.02; 0.05 for docstring)"""
    steps: int = 500
    lr: float = 1e-3
    mode: str = "mean"
    """head outputs for the codes: position mean (the paper), last position, or "tail": the mean over the positions
    from the first one where a pair's prompts differ (the ones before are the same in both)"""
    threshold: float = 0.03
    cover: float = 0.8
    permutations: int = 1000
    max_rows: int = 96
    """prompt rows per forward"""
    keep_correct: bool = True

    def __post_init__(self):
        check_task(self.task)
        for name in ("prompts", "pairs", "seeds", "sae_prompts", "codebook", "steps", "max_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SparsenError(f"{name} must be a positive integer, not {v!r}")
        if self.pairs < 2:
            raise SparsenError("pairs must be at least 2 (two disjoint halves are compared)")
        if self.mode not in OUTPUT_MODES:
            raise SparsenError(f"mode must be 'mean', 'last' or 'tail', not {self.mode!r}")
        if self.l1 is None:
            self.l1 = default_lambda(self.task)
        if not self.l1 >= 0:
            raise SparsenError(f"l1 must be >= 0, not {self.l1!r}")


# --- ROC AUC and its null ---------------------------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties given their average rank."""
    x = np.asarray(x, dtype=float)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts  # 0-based first rank of each distinct value
    return (start + (counts + 1) / 2.0)[inv]


def roc_auc(scores, labels) -> float:
    """ROC AUC by the Mann-Whitney rank formula, ties averaged (sklearn's value); NaN when a class is empty."""
    labels = np.asarray(labels, dtype=bool)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = average_ranks(scores)
    return float((r[labels].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def permutation_null(score_rows: np.ndarray, labels, permutations: int = 1000, seed: int = 0) -> np.ndarray:
    """The mean AUC over rows of ``score_rows`` [S, n] (one row per seed) for ``permutations`` random permutations of
    the labels over heads: [permutations]."""
    score_rows = np.atleast_2d(np.asarray(score_rows, dtype=float))
    labels = np.asarray(labels, dtype=bool)
    n1, n = int(labels.sum()), labels.size
    n0 = n - n1
    if n1 == 0 or n0 == 0:
        return np.full(permutations, np.nan)
    ranks = np.stack([average_ranks(s) for s in score_rows])  # [S, n]
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(labels) for _ in range(permutations)]).astype(float)  # [P, n]
    sums = perm @ ranks.T  # [P, S]
    return ((sums - n1 * (n1 + 1) / 2.0) / (n1 * n0)).mean(1)


def _auc_block(score_rows: np.ndarray, labels, permutations: int, seed: int) -> dict:
    per = [roc_auc(s, labels) for s in np.atleast_2d(score_rows)]
    null = permutation_null(score_rows, labels, permutations, seed)
    mean = float(np.mean(per))
    q95 = float(np.quantile(null, 0.95)) if not np.isnan(null).all() else float("nan")
    return {"mean": mean, "std": float(np.std(per)), "per_seed": per, "null_mean": float(np.nanmean(null)),
            "null_95": q95, "above_null": bool(mean > q95), "p_value": float((1 + (null >= mean).sum()) / (1 + len(null)))}


# --- the pipeline -------------------------------------------------------------------------------------------------------
def _bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="row")


def _behaviour(heads: Heads, task: Task) -> dict:
    mp = task.metric(heads.logits(task.pos_ids)).numpy()
    mn = task.metric(heads.logits(task.neg_ids)).numpy()
    return {"m_pos": mp, "m_neg": mn, "pos_accuracy": float((mp > 0).mean()), "pos_metric": float(mp.mean()),
            "neg_accuracy": float((mn > 0).mean()), "neg_metric": float(mn.mean())}


def _f(x):
    """A float for JSON (NaN as None)."""
    x = float(x)
    return None if math.isnan(x) else x


def run_circuits(lm, config: CircuitConfig, progress: bool = True, task: Task | None = None) -> dict:
    """The whole pipeline for one task on a loaded model; ``task`` overrides the generated prompts (tests)."""
    cfg = config
    heads = Heads(lm, max_rows=cfg.max_rows)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - t
        t = now

    torch_threads = torch.get_num_threads()
    if task is None:
        task = build_task(cfg.task, lm.tokenizer, cfg.prompts, cfg.seed, model=lm.spec)
    lap("prompts")

    beh = _behaviour(heads, task)
    gate_acc = ACCURACY_GATE.get(task.name, 0.0)
    neg_ok = (beh["neg_metric"] <= task.chance + NEG_SLACK[task.kind]
              and beh["neg_accuracy"] <= task.chance_accuracy + 0.1)
    kept = [i for i in range(len(task)) if beh["m_pos"][i] > 0] if cfg.keep_correct else list(range(len(task)))
    if len(kept) < 4:
        raise SparsenError(f"task '{task.name}': the model solves only {len(kept)} of {len(task)} positives; "
                           "nothing to find a circuit for")
    work = task.subset(kept)
    lap("behaviour")

    bar = _bar(progress, 2 * len(work), f"{task.name}: head outputs")
    starts = work.first_differences()
    out_pos = heads.outputs(work.pos_ids, cfg.mode, bar, starts)
    out_neg = heads.outputs(work.neg_ids, cfg.mode, bar, starts)
    bar.close()
    lap("outputs")
    mdiff = mean_difference(out_pos, out_neg)
    lap("mean_difference")

    pairs = work.subset(range(min(cfg.pairs, len(work))))
    bar = _bar(progress, len(pairs) * heads.n, f"{task.name}: patching {heads.n} heads x {len(pairs)} pairs")
    patched = patch_heads(heads, pairs, progress=bar)
    bar.close()
    lap("truth_patching")
    effect = patched.effect()
    sets = {"threshold": threshold_set(effect, cfg.threshold), "cover": cover_set(effect, cfg.cover)}
    h1, h2 = halves(len(pairs))
    e1, e2 = patched.effect(h1), patched.effect(h2)
    half_sets = {"threshold": (threshold_set(e1, cfg.threshold), threshold_set(e2, cfg.threshold)),
                 "cover": (cover_set(e1, cfg.cover), cover_set(e2, cfg.cover))}
    boot = bootstrap_threshold(patched, cfg.threshold, seed=cfg.seed)
    means = template_means(heads, work)
    ablation = mean_ablation(heads, work, means, sets)  # every kept positive: the patched pairs and held-out ones
    lap("truth_ablation")

    attr_num = attribution_patching(heads, pairs)
    attr = attr_num.mean(0) / float((patched.m_clean - patched.m_neg).mean())
    lap("attribution")

    runs = []
    bar = _bar(progress, cfg.seeds, f"{task.name}: SAE codes")
    for s in range(cfg.seeds):
        runs.append(code_run(out_pos, out_neg, seed=cfg.seed + s, d_sae=cfg.codebook, l1=cfg.l1, steps=cfg.steps,
                             lr=cfg.lr, train_prompts=cfg.sae_prompts))
        bar.update(1)
    bar.close()
    lap("codes")

    per_seed = {name: np.stack([r[name] for r in runs]) for name in CODE_SCORES}
    ranked = {**per_seed, "mean_difference": mdiff[None], "attribution": np.abs(attr)[None]}  # rows: seeds
    auc = {}
    for set_name, members in sets.items():
        labels = np.zeros(heads.n, dtype=bool)
        labels[members] = True
        auc[set_name] = {name: _auc_block(rows, labels, cfg.permutations, cfg.seed) for name, rows in ranked.items()}
    lap("auc")

    sae_stage = [r["seconds"]["train"] + r["seconds"]["codes_and_node"] for r in runs]
    n_gt = len(sets["threshold"])
    main_auc = auc["threshold"]
    acceptance = {
        "positives_accuracy": {"value": beh["pos_accuracy"], "gate": f">= {gate_acc}", "pass": beh["pos_accuracy"] >= gate_acc},
        "negatives_at_chance": {"value": {"metric": beh["neg_metric"], "accuracy": beh["neg_accuracy"]},
                                "gate": f"mean M <= {task.chance} + {NEG_SLACK[task.kind]} and accuracy <= "
                                        f"{task.chance_accuracy} + 0.1", "pass": bool(neg_ok)},
        "gt_size": {"value": n_gt, "gate": "5..40", "pass": 5 <= n_gt <= 40},
        "gt_retains_metric": {"value": ablation["threshold"]["retained"], "gate": ">= 0.5",
                              "pass": ablation["threshold"]["retained"] >= 0.5},
        "gt_halves_jaccard": {"value": jaccard(*half_sets["threshold"]), "gate": ">= 0.6",
                              "pass": jaccard(*half_sets["threshold"]) >= 0.6},
        "node_auc": {"value": main_auc["node"]["mean"], "gate": ">= 0.65 (>= 0.75 on two tasks)",
                     "pass": main_auc["node"]["mean"] >= 0.65},
        "node_auc_above_null": {"value": main_auc["node"]["null_95"], "pass": main_auc["node"]["above_null"]},
        "node_auc_above_mean_difference": {"value": main_auc["mean_difference"]["mean"],
                                           "pass": main_auc["node"]["mean"] > main_auc["mean_difference"]["mean"]},
        "sae_stage_seconds": {"value": max(sae_stage), "gate": "< 60 per seed (max over seeds)", "pass": max(sae_stage) < 60},
    }
    names = heads.names()

    def named(ids):
        return [names[i] for i in ids]

    result = {
        "task": task.name,
        "model": lm.spec,
        "config": asdict(cfg),
        "torch_threads": torch_threads,
        "heads": {"n_layers": heads.n_layers, "n_heads": heads.n_heads, "names": names},
        "examples": {"positive": task.pos_text[:3], "negative": task.neg_text[:3]},
        "behaviour": {
            "prompts": len(task), "kept": len(kept), "pairs_patched": len(pairs),
            "positives": {"accuracy": beh["pos_accuracy"], "metric": beh["pos_metric"]},
            "negatives": {"accuracy": beh["neg_accuracy"], "metric": beh["neg_metric"]},
            "chance": {"metric": task.chance, "accuracy": task.chance_accuracy},
        },
        "truth": {
            "m_clean": float(patched.m_clean.mean()), "m_neg": float(patched.m_neg.mean()),
            "effect": [_f(e) for e in effect],
            "effect_pairwise": [_f(e) for e in patched.effect_pairwise()],
            "per_pair": {"num": patched.num.tolist(), "m_clean": patched.m_clean.tolist(), "m_neg": patched.m_neg.tolist()},
            "threshold": cfg.threshold, "cover": cfg.cover,
            "sets": {k: named(v) for k, v in sets.items()},
            "halves": {k: {"a": named(a), "b": named(b), "jaccard": jaccard(a, b)} for k, (a, b) in half_sets.items()},
            "mean_ablation": ablation,
            "bootstrap": bootstrap_record(boot, names),
            "effect_sum": float(np.nansum(effect)), "effect_abs_sum": float(np.nansum(np.abs(effect))),
        },
        "scores": {**{name: rows.tolist() for name, rows in per_seed.items()}, "mean_difference": mdiff.tolist(),
                   "attribution": attr.tolist()},
        "sae": [{"seed": r["seed"], "fvu": r["fvu"], "l0": r["l0"], "codes_used": r["codes_used"], "seconds": r["seconds"]}
                for r in runs],
        "auc": auc,
        "acceptance": acceptance,
        "runtime_seconds": {**seconds, "sae_stage_per_seed_mean": float(np.mean(sae_stage)),
                            "sae_stage_per_seed_max": float(np.max(sae_stage))},
    }
    return _jsonable(result)


def bootstrap_record(boot: dict, names: list[str]) -> dict:
    """``bootstrap_threshold``'s result as a run records it: each head's share by name, heads never in left out."""
    return {**{k: v for k, v in boot.items() if k != "p_in_set"},
            "p_in_set": {names[i]: float(q) for i, q in enumerate(boot["p_in_set"]) if q > 0}}


def bootstrap_line(bs: dict, pairs: int, threshold: float) -> str:
    """One line on a ``bootstrap_record``: the set's size over the resamples and the heads at its edge."""
    q = bs["size_quantiles"]
    edge = sorted(((p, h) for h, p in bs["p_in_set"].items() if 0.05 <= p <= 0.95), reverse=True)
    return (f"bootstrap over the {pairs} pairs ({bs['resamples']} resamples): the |effect| >= {threshold} set has "
            f"{q['p5']:.0f}-{q['p95']:.0f} heads (5th-95th percentile, median {q['p50']:.0f}), 5-40 heads in "
            f"{bs['size_in_gate']:.1%} of resamples; heads in it in 5-95% of resamples: "
            f"{', '.join(f'{h} ({p:.2f})' for p, h in edge) or 'none'}")


def _jsonable(x):
    """NaN and infinities as None, numpy scalars as Python numbers, tuples as lists."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    return x


def summary_markdown(res: dict) -> str:
    """A short markdown summary of one task's result."""
    b, tr, acc = res["behaviour"], res["truth"], res["acceptance"]
    lines = [f"# Circuits: {res['task']} on {res['model']}", "",
             f"Prompts {b['prompts']} pairs ({b['kept']} kept: positives the model solves), {b['pairs_patched']} pairs patched, "
             f"{res['config']['seeds']} SAE seeds.", "",
             "| | accuracy (M > 0) | mean M |", "|---|---|---|",
             f"| positives | {b['positives']['accuracy']:.3f} | {b['positives']['metric']:.3f} |",
             f"| negatives | {b['negatives']['accuracy']:.3f} | {b['negatives']['metric']:.3f} |",
             f"| chance | {b['chance']['accuracy']:.3f} | {b['chance']['metric']:.3f} |", "",
             "## Ground truth (per-head activation patching)", ""]
    for k in ("threshold", "cover"):
        ab = tr["mean_ablation"][k]
        label = (f"|effect| >= {tr['threshold']}" if k == "threshold"
                 else f"smallest set covering {tr['cover']:.0%} of sum |effect|")
        lines.append(f"- {label}: {len(tr['sets'][k])} heads, halves Jaccard {tr['halves'][k]['jaccard']:.2f}, "
                     f"kept alone (rest mean-ablated) retain {ab['retained']:.2f} of M_clean "
                     f"({ab['retained_vs_ablated']:.2f} of the gap to all-ablated): {', '.join(tr['sets'][k])}")
    if tr.get("bootstrap"):
        lines.append("- " + bootstrap_line(tr["bootstrap"], b["pairs_patched"], tr["threshold"]))
    lines += ["", "## ROC AUC against the ground truth (mean over seeds; permutation-null 95th percentile)", "",
              "| score | vs threshold set | null 95% | vs cover set | null 95% |", "|---|---|---|---|---|"]
    for s in res["auc"]["threshold"]:
        a, c = res["auc"]["threshold"][s], res["auc"]["cover"][s]
        lines.append(f"| {s} | {a['mean']:.3f} ± {a['std']:.3f} | {a['null_95']:.3f} | {c['mean']:.3f} | {c['null_95']:.3f} |")
    lines += ["", "## Acceptance", "", "| check | value | gate | pass |", "|---|---|---|---|"]
    for k, v in acc.items():
        val = v["value"]
        val = ", ".join(f"{kk} {vv:.3f}" for kk, vv in val.items()) if isinstance(val, dict) else \
            (f"{val:.3f}" if isinstance(val, float) else str(val))
        lines.append(f"| {k} | {val} | {v.get('gate', '')} | {'yes' if v['pass'] else 'NO'} |")
    rt = res["runtime_seconds"]
    lines += ["", "## Runtime (s)", "", " | ".join(f"{k} {v:.1f}" for k, v in rt.items()), ""]
    return "\n".join(lines)


__all__ = ["TASKS", "CircuitConfig", "average_ranks", "permutation_null", "roc_auc", "run_circuits", "summary_markdown"]
