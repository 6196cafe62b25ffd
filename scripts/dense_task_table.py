"""Dense accuracy per task and length, with 95% Wilson intervals, from attn-eval / attn-frontier result files.

    .venv/bin/python scripts/dense_task_table.py benchmarks/results/attn_eval_1k.json \\
        benchmarks/results/attn_frontier_2k_50.json benchmarks/results/attn_frontier_4k_50.json \\
        benchmarks/results/attn_frontier_8k_50.json

Prints a markdown table: one row per length, one column per task, then the mean over tasks (its interval over the
pooled samples, as the runs' own tables).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from sparsen.evaluation.attention import wilson


def samples_of(path: str) -> list[dict]:
    with open(path) as f:
        res = json.load(f)
    return res["tasks"]["samples"] if "tasks" in res else res["samples"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="attn_eval.json or attn_frontier.json files")
    args = ap.parse_args()
    scores: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in args.files:
        for s in samples_of(path):
            scores[s["length"]][s["task"]].append(s["results"]["dense"]["score"])
    tasks = sorted({t for by_task in scores.values() for t in by_task})
    print("| length | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for length in sorted(scores):
        cells, pooled = [], []
        for t in tasks:
            v = scores[length].get(t, [])
            pooled += v
            lo, hi = wilson(sum(v), len(v)) if v else (float("nan"), float("nan"))
            cells.append(f"{100 * sum(v) / len(v):.0f} [{100 * lo:.0f}, {100 * hi:.0f}] (n {len(v)})" if v else "")
        means = [sum(scores[length][t]) / len(scores[length][t]) for t in tasks if scores[length].get(t)]
        lo, hi = wilson(sum(pooled), len(pooled))
        cells.append(f"**{100 * sum(means) / len(means):.1f}** [{100 * lo:.0f}, {100 * hi:.0f}]")
        print(f"| {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
