"""How firm the committed ground truth is: the bootstrap `sparsen circuits` now reports (``truth.bootstrap_threshold``),
run on the per-pair patching kept in benchmarks/results/circuits/TASK.json (no model, no patching: a second).

    .venv/bin/python scripts/circuit_truth_bootstrap.py [ioi,greater-than,docstring]

Per task: the thresholded set's size, its 5th-95th percentile over 1,000 resamples of the pairs, the share of
resamples with 5-40 heads, and the heads in the set in 5-95% of resamples.
"""

import json
import sys

import numpy as np

from sparsen.circuits.run import bootstrap_line, bootstrap_record
from sparsen.circuits.truth import Patching, bootstrap_threshold


def main(tasks):
    for name in tasks:
        res = json.load(open(f"benchmarks/results/circuits/{name}.json"))
        tr, pp = res["truth"], res["truth"]["per_pair"]
        patched = Patching(num=np.array(pp["num"], dtype=float), m_clean=np.array(pp["m_clean"]),
                           m_neg=np.array(pp["m_neg"]))
        boot = bootstrap_record(bootstrap_threshold(patched, tr["threshold"], seed=res["config"]["seed"]),
                                res["heads"]["names"])
        print(f"{name}: {len(tr['sets']['threshold'])} heads with |effect| >= {tr['threshold']}; "
              f"{bootstrap_line(boot, len(patched.m_clean), tr['threshold'])}")


if __name__ == "__main__":
    main((sys.argv[1] if len(sys.argv) > 1 else "ioi,greater-than,docstring").split(","))
