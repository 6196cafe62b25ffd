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

from sparsen.evaluation.attention import group_results, wilson


def samples_of(path: str) -> list[dict]:
    with open(path) as f:
        res = json.load(f)
    return res["tasks"]["samples"] if "tasks" in res else res["samples"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="attn_eval.json or attn_frontier.json files")
    args = ap.parse_args()
    rows = [s for path in args.files for s in samples_of(path)]
    groups = {(g["length"], g["task"]): g for g in group_results(rows, ["dense"])}
    tasks = sorted({task for _, task in groups})
    print("| length | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---|" * (len(tasks) + 1))
    for length in sorted({length for length, _ in groups}):
        cells, accs = [], []
        for task in tasks:
            g = groups.get((length, task))
            if g is None:
                cells.append("")
                continue
            accs.append(g["accuracy"])
            cells.append(f"{100 * g['accuracy']:.0f} [{100 * g['ci95'][0]:.0f}, {100 * g['ci95'][1]:.0f}] (n {g['n']})")
        pooled = [r["results"]["dense"]["score"] for r in rows if r["length"] == length]
        lo, hi = wilson(sum(pooled), len(pooled))
        cells.append(f"**{100 * sum(accs) / len(accs):.1f}** [{100 * lo:.0f}, {100 * hi:.0f}]")
        print(f"| {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
