"""How firm the committed ground truth is: the bootstrap `sparsen circuits` now reports (``truth.bootstrap_threshold``),
run on the per-pair patching kept in benchmarks/results/circuits/TASK.json (no model, no patching: a second).

    .venv/bin/python scripts/circuit_truth_bootstrap.py [ioi,greater-than,docstring]

Per task: the thresholded set's size, its 5th-95th percentile over 1,000 resamples of the pairs, the share of
resamples with 5-40 heads, and the heads in the set in 5-95% of resamples.
"""

import json
import sys

import numpy as np

from sparsen.circuits.truth import Patching, bootstrap_threshold


def main(tasks):
    for name in tasks:
        res = json.load(open(f"benchmarks/results/circuits/{name}.json"))
        tr, names = res["truth"], res["heads"]["names"]
        pp = tr["per_pair"]
        patched = Patching(num=np.array(pp["num"], dtype=float), m_clean=np.array(pp["m_clean"]),
                           m_neg=np.array(pp["m_neg"]))
        boot = bootstrap_threshold(patched, tr["threshold"], seed=res["config"]["seed"])
        q = boot["size_quantiles"]
        edge = sorted(((p, names[i]) for i, p in enumerate(boot["p_in_set"]) if 0.05 <= p <= 0.95), reverse=True)
        print(f"{name}: {len(tr['sets']['threshold'])} heads with |effect| >= {tr['threshold']} on {len(patched.m_clean)} "
              f"pairs; bootstrap ({boot['resamples']} resamples) {q['p5']:.0f}-{q['p95']:.0f} heads (median "
              f"{q['p50']:.0f}), 5-40 heads in {boot['size_in_gate']:.1%}; heads in 5-95% of resamples: "
              f"{', '.join(f'{h} {p:.2f}' for p, h in edge) or 'none'}")


if __name__ == "__main__":
    main((sys.argv[1] if len(sys.argv) > 1 else "ioi,greater-than,docstring").split(","))
