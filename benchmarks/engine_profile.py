"""Where a decoded token's time goes, by kernel function: perf's samples of the engine decoding greedy tokens.

    .venv/bin/python benchmarks/engine_profile.py WEIGHTS [PLAN.json] [--steps N]

runs itself under `perf record` (Debian's linux-perf; greedy steps, as `sparsen bench` times them), then prints each
kernel function's share of the samples taken in the kernels and in libgomp (the threads waiting at barriers), the
model's loading and Python left out. A profile, not a benchmark: shares, no rates.
"""

import argparse
import os
import subprocess
import sys
import tempfile


def decode(weights: str, plan: str | None, steps: int) -> None:
    import numpy as np

    from sparsen import load_model
    from sparsen.core.plan import Plan
    from sparsen.engine import Engine

    lm = load_model("smollm2")
    engine = Engine(lm, Plan.load(plan) if plan else None, dtype=weights, max_seq=steps + 80)
    ids = lm.tokenizer("The history of the city begins", add_special_tokens=False)["input_ids"]
    engine.greedy_steps(int(np.argmax(engine.prefill(ids))), steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", choices=("gguf", "bf16", "fp32"))
    p.add_argument("plan", nargs="?", default=None)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return decode(a.weights, a.plan, a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        cmd = [sys.executable, __file__, a.weights, *([a.plan] if a.plan else []), "--steps", str(a.steps), "--child"]
        subprocess.run(["perf", "record", "-q", "-F", "4000", "-o", data, "--", *cmd], check=True,
                       stdout=subprocess.DEVNULL)
        out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol", "--stdio"],
                             check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and ("_kernels" in parts[1] or "libgomp" in parts[1]):
            name = "libgomp (barriers, waiting)" if "libgomp" in parts[1] else parts[3]
            rows[name] = rows.get(name, 0.0) + float(parts[0][:-1])
    total = sum(rows.values())
    print(f"{a.weights} weights, plan {a.plan or 'none (dense)'}, {a.steps} greedy steps: share of the samples in the "
          "kernels and libgomp")
    for name, v in sorted(rows.items(), key=lambda kv: -kv[1]):
        if v / total >= 0.005:
            print(f"  {name:<30}{v / total:6.1%}")


if __name__ == "__main__":
    main()
