"""Milliseconds per engine decode step after a long prompt, one engine per attention spec, for profiling.

The prompt (the first --context tokens of WikiText-2 test) is prefilled through torch, then --steps greedy steps
are timed with Python's collector off. --wait-for-perf writes --ready FILE before the timed steps, so a profiler
attaches to the stepping alone:

    .venv/bin/python scripts/decode_step_time.py --spec sketch@1/8 --steps 75 --wait-for-perf &
    while [ ! -f /tmp/decode_ready ]; do sleep 0.5; done
    perf record -F 4000 -p $(pgrep -f decode_step_time.py) -o perf.data; perf report -i perf.data --sort dso,symbol
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

from sparsen.data import corpus_windows
from sparsen.engine import Engine
from sparsen.methods.attention import attention_plan, parse_attention_spec
from sparsen.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--spec", default="dense", help="comma-separated attention specs, or 'dense'")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--kv-dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--weights", default="fp32", choices=["fp32", "bf16", "gguf"])
    ap.add_argument("--wait-for-perf", action="store_true", help="write --ready before the timed steps")
    ap.add_argument("--ready", default="/tmp/decode_ready")
    args = ap.parse_args()
    lm = load_model(args.model)
    ids = corpus_windows(lm.tokenizer, "wikitext2-test", args.context, 1, bos=lm.window_bos)[0].tolist()
    for spec in args.spec.split(","):
        plan = None if spec == "dense" else attention_plan(lm, parse_attention_spec(spec), progress=False)
        engine = Engine(lm, plan, max_seq=len(ids) + args.steps + 1, threads=2, kv_dtype=args.kv_dtype,
                        dtype=args.weights)
        tok = int(engine.prefill(ids, via="torch").argmax())
        gc.collect()
        gc.disable()
        if args.wait_for_perf:
            Path(args.ready).write_text("ready")
        t0 = time.perf_counter()
        engine.greedy_steps(tok, args.steps)
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        gc.enable()
        print(f"{spec}: {ms:.2f} ms/token ({args.context} context, {args.weights} weights, {args.kv_dtype} KV)", flush=True)
    if args.wait_for_perf:
        os._exit(0)  # no interpreter teardown (its collection of the torch objects) inside the profile


if __name__ == "__main__":
    main()
