"""Would reordering each Q4 block's 32 input rows let a sparse product skip cache lines? Per-channel activity of a
threshold plan's masks, measured on real tokens.

    .venv/bin/python benchmarks/mask_line_locality.py PLAN.json [--tokens 1024]

The engine's Q4 codes are stored per block of 32 inputs, a 64-byte line per row and tile, rows in input order, and the
hardware fetches lines in adjacent pairs. A row order within each block (the quantization keeps its blocks, so only
the 32 rows of a block may move) sorted by how often each channel is active would gather the active rows when
activity is skewed. For q, o, gate and down of every layer, the masks of WikiText-2 validation tokens (the first half
ranks the channels, the second half is scored), in file order and sorted: the share of a block's rows up to its
last active one (what a read of each block's prefix would fetch) and of row pairs with an active row (what the
adjacent-line prefetch fetches). Prints the means over layers.
"""

import argparse

import numpy as np
import torch

from sparsen import load_model
from sparsen.core.plan import Plan
from sparsen.data import corpus_windows

LINEARS = {"q": "self_attn.q_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"}
BLOCK = 32


def fetched(masks: np.ndarray, perm: np.ndarray) -> tuple[float, float]:
    """(share of rows up to each block's last active row, share of row pairs holding an active row) of masks [T, n]
    with the rows in order perm."""
    t, n = masks.shape
    m = masks[:, perm].reshape(t, n // BLOCK, BLOCK)
    prefix = np.where(m.any(2), BLOCK - np.argmax(m[:, :, ::-1], axis=2), 0).mean() / BLOCK
    pairs = m.reshape(t, n // BLOCK, BLOCK // 2, 2).any(3).mean()
    return float(prefix), float(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plan")
    p.add_argument("--tokens", type=int, default=1024)
    a = p.parse_args()
    lm = load_model("smollm2")
    sites = Plan.load(a.plan).sites
    if not all(isinstance(r.get("threshold"), float) for r in sites.values()):
        raise SystemExit(f"{a.plan}: every site needs one scalar threshold (a teal plan from `sparsen calibrate`)")
    masks: dict[str, list] = {}

    def hook(site):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            masks.setdefault(site, []).append((x.abs() > sites[site]["threshold"]).numpy())
        return record

    for i, layer in enumerate(lm.model.model.layers):
        for name, path in LINEARS.items():
            layer.get_submodule(path).register_forward_pre_hook(hook(f"layers.{i}.{name}"))
    ids = corpus_windows(lm.tokenizer, "wikitext2-valid", a.tokens, 1)
    with torch.no_grad():
        lm.model(ids)
    rows: dict[str, list] = {}
    for site, ms in masks.items():
        m = np.concatenate(ms)
        fit, score = m[: len(m) // 2], m[len(m) // 2:]
        rate = fit.mean(0)
        n = m.shape[1]
        by_rate = np.concatenate([b + np.argsort(-rate[b:b + BLOCK], kind="stable") for b in range(0, n, BLOCK)])
        rows.setdefault(site.split(".")[-1], []).append(
            (score.mean(), *fetched(score, np.arange(n)), *fetched(score, by_rate)))
    print(f"plan {a.plan}, {a.tokens} tokens of WikiText-2 validation (half rank, half scored); means over layers")
    print("linear  density | file order: prefix, pairs | sorted by activity: prefix, pairs")
    for name, r in rows.items():
        d, fp, fq, sp, sq = np.mean(r, axis=0)
        print(f"{name:6s}  {d:.3f}   | {fp:.3f}, {fq:.3f}              | {sp:.3f}, {sq:.3f}")


if __name__ == "__main__":
    main()
