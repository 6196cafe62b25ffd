"""Decode-step time of this checkout's engine kernels against another commit's, alternated in one process.

    .venv/bin/python scripts/kernel_ab.py REV [--plans dense,teal50.json] [--weights gguf] [--rounds 15] [--steps 64]
    .venv/bin/python scripts/kernel_ab.py REV --plans dense,sketch@1/8 --weights fp32 --context 8192 --rounds 5

REV's kernels (src/sparsen/engine/kernels) are built by REV's own setup.py, and REV's engine/quant.py packs
the weights for them (the layouts may differ); the engine's Python is this checkout's, so REV must share its kernel
ABI. A plan is a plan file, 'dense', or an attention spec (e.g. sketch@1/8: calibrated once); --context N prefills
the first N tokens of WikiText-2 test through torch instead of a short prompt (for the attention methods, whose
work grows with the context). Each round builds one engine per (plan, build) and times --steps greedy steps after
8 warm-up steps, the builds' engines taking turns every --chunk steps; the result is the median over rounds of the
per-round ratio (REV's ms / this checkout's ms: > 1 means this one is faster). For kernel changes only: the machine
is shared, so only same-round ratios mean anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sparsen.engine as E
import sparsen.engine.quant as quant_now
from sparsen.core.plan import Plan
from sparsen.data import corpus_windows
from sparsen.methods.attention import attention_plan, parse_attention_spec
from sparsen.models import load_model

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "src/sparsen/engine/kernels"


def build_rev(rev: str, into: Path):
    """(the kernel library, the pack function) of commit ``rev``."""
    tree = into / "tree"  # REV's setup.py builds REV's kernels with REV's flags
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "setup.py", "pyproject.toml", KERNELS],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(into / "build")], cwd=tree,
                   check=True, capture_output=True)
    libs = sorted((into / "build").rglob("_kernels*.so"))
    if not libs:
        raise SystemExit(f"{rev}'s kernels did not build: run its setup.py build_ext in a checkout to see why")
    lib = libs[0]
    quant_py = into / "quant_rev.py"
    quant_py.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/sparsen/engine/quant.py"],
                                        check=True, capture_output=True).stdout)
    spec = importlib.util.spec_from_file_location("quant_rev", quant_py)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quant_rev"] = mod
    spec.loader.exec_module(mod)
    mod.Packed = quant_now.Packed  # the engine checks its own class
    return E.open_kernels(lib), mod.pack


def start(lm, plan, weights: str, ids, steps: int, prefixes: dict | None, name: str):
    """An engine past the prompt and 8 warm-up steps, and its next token. ``prefixes``: None (the engine steps the
    prompt) or {plan name: its torch prefix, computed once}."""
    engine = E.Engine(lm, plan, dtype=weights, threads=2, max_seq=len(ids) + steps + 16)
    if prefixes is None:
        tok = int(np.argmax(engine.prefill(ids)))
    else:
        if name not in prefixes:
            prefixes[name] = engine.torch_prefix(ids)
        tok = int(np.argmax(engine.prefill(ids, via="torch", prefix=prefixes[name])))
    for _ in range(8):
        tok = int(np.argmax(engine.step(tok)))
    return engine, tok


def interleaved_ms(engines: dict, steps: int, chunk: int, flip: bool) -> dict:
    """ms per step of each engine, the engines taking turns at ``chunk`` steps (the first to go alternating), so a
    slow spell of the shared machine falls on all of them alike; ``flip`` (every other round) reverses who starts,
    so neither build always takes over from the other more often."""
    total = dict.fromkeys(engines, 0.0)
    gc.collect()
    gc.disable()
    order = list(engines)[::-1] if flip else list(engines)
    for c in range(0, steps, chunk):
        for b in order if (c // chunk) % 2 == 0 else order[::-1]:
            engine, tok = engines[b]
            t0 = time.perf_counter()
            for _ in range(min(chunk, steps - c)):
                tok = int(np.argmax(engine.step(tok)))
            total[b] += time.perf_counter() - t0
            engines[b] = (engine, tok)
    gc.enable()
    return {b: t / steps * 1e3 for b, t in total.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev")
    p.add_argument("--plans", default="dense", help="comma-separated plan files, attention specs, or 'dense'")
    p.add_argument("--weights", default="gguf")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--chunk", type=int, default=8, help="the builds take turns every CHUNK steps")
    p.add_argument("--context", type=int, default=0, help="prefill this many WikiText-2 test tokens (torch)")
    a = p.parse_args()
    lm = load_model("smollm2")
    if a.context:
        ids = corpus_windows(lm.tokenizer, "wikitext2-test", a.context, 1, bos=lm.window_bos)[0].tolist()
    else:
        ids = lm.tokenizer("The history of the city begins in the early", add_special_tokens=False)["input_ids"]
    prefixes = {} if a.context else None

    def plan_of(name):
        if name == "dense":
            return None
        if "@" in name:
            return attention_plan(lm, parse_attention_spec(name), progress=False)
        return Plan.load(name)

    plans = {name: plan_of(name) for name in a.plans.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        builds = {a.rev: build_rev(a.rev, Path(tmp)), "this checkout": (E.kernels(), quant_now.pack)}
        ms = {(b, name): [] for b in builds for name in plans}
        for r in range(a.rounds):
            for name, plan in plans.items():
                engines = {}
                for b, (lib, pack) in builds.items():  # an engine keeps the kernels it was made with
                    E._LIB, E.pack = lib, pack
                    engines[b] = start(lm, plan, a.weights, ids, a.steps, prefixes, name)
                for b, v in interleaved_ms(engines, a.steps, a.chunk, flip=r % 2 == 1).items():
                    ms[(b, name)].append(v)
                del engines
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{b} {n} {v[-1]:.2f} ms" for (b, n), v in ms.items()),
                  flush=True)
    for name in plans:
        old, new = np.array(ms[(a.rev, name)]), np.array(ms[("this checkout", name)])
        print(f"{name}: {a.rev} {np.median(old):.2f} ms, this checkout {np.median(new):.2f} ms per step (medians); "
              f"per-round speed ratio this / {a.rev}: median {np.median(old / new):.3f}")


if __name__ == "__main__":
    main()
