"""Write plans with the pre-refactor code and their eval numbers: the regression fixtures of tests/test_api.py.

Run against commit f39fa18 (the last commit before the core/API refactor), from a worktree of it:
    git worktree add /tmp/oldcode f39fa18
    PYTHONPATH=/tmp/oldcode/src .venv/bin/python tests/data/plans_v1/make_fixtures.py tests/data/plans_v1
"""

import json
import sys
from pathlib import Path

import sparsen
from sparsen import load_model
from sparsen.evaluation import evaluate
from sparsen.methods import CalibrationConfig, calibrate

assert "/tmp/oldcode" in sparsen.__file__, sparsen.__file__
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
JOBS = {  # name: (method, sparsity, config overrides)
    "teal": ("teal", 0.5, {}),
    "teal-greedy": ("teal", 0.5, {"allocation": "greedy"}),
    "wina-sensitivity": ("wina", 0.5, {"allocation": "sensitivity"}),
    "cats": ("cats", 0.4, {}),
    "chess": ("chess", 0.5, {}),
    "rsparse": ("rsparse", 0.5, {}),
    "stat-topk": ("stat-topk", 0.5, {}),
    "topk": ("topk", 0.5, {}),
    "rotate": ("rotate", 0.5, {}),
    "rotate-wina-global": ("rotate-wina", 0.5, {"allocation": "global", "segments": 2}),
    "rotate-topk": ("rotate-topk", 0.4, {}),
}
expected = {}
for name, (method, s, over) in JOBS.items():
    lm = load_model("tiny-llama")
    cfg = CalibrationConfig(tokens=2048, ctx=256, **over)
    plan = calibrate(lm, method, s, cfg, progress=False)
    plan.save(out / f"{name}.json")
    fresh = load_model("tiny-llama")
    res = evaluate(fresh, ctx=256, n_windows=4, protocol="decode", sparsifier=plan.sparsifier(fresh), progress=False)
    expected[name] = {"method": method, "sparsity": s, "config": {"tokens": 2048, "ctx": 256, **over},
                      "eval": {"ctx": 256, "windows": 4, "protocol": "decode"},
                      "ppl": res.ppl, "kl": res.kl, "top1_agree": res.top1_agree, "achieved": res.sparsity["overall"],
                      "dense_ppl": res.dense_ppl}
    print(name, expected[name]["ppl"], expected[name]["achieved"], flush=True)
(out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
