"""Routing experiments with top-k mixtures of experts on the small transformer: each writes NAME.json, NAME.md and
NAME.png to OUT, runs cached in OUT/runs as the Lazy Neuron experiments' are (shared across these experiments).

The base MoE: 8 gated SiLU experts of width 128, top-2, renormalised, dropless, load-balancing loss 0.01; the dense
model with the same *active* MLP parameters is a gated SiLU MLP of width 256 (k x 128), the one with the same *total*
parameters of width 1024.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsen.train.experiments import BATCH, Setting, _data, _fmt, _mean_ci, _plt, _write, run_cached
from sparsen.train.model import LMConfig
from sparsen.train.trainer import LMTask, TrainConfig

SMALL = Setting("wikitext2-valid", steps=150, seeds=(0,))
FULL = Setting("/usr/share/doc/python3.11/html", steps=400, seeds=(0, 1, 2))
BASE = dict(mlp="moe", experts=8, k=2, d_ff=128, activation="silu", moe_aux=0.01)
ROUTING_EXPERIMENTS = ("moe-vs-dense", "balance", "capacity", "experts-per-token", "gates")


def _setting(full: bool, seeds: int | None, steps: int | None, text: str | None) -> Setting:
    s = FULL if full else SMALL
    return Setting(text or s.text, steps or s.steps, tuple(range(seeds)) if seeds else s.seeds)


def _tag(model: dict) -> str:
    if model.get("mlp") != "moe":
        return f"dense-gated-dff{model['d_ff']}"
    parts = [f"moe-e{model['experts']}-k{model['k']}-dff{model['d_ff']}", f"aux{model.get('moe_aux', 0)}"]
    if model.get("capacity_factor") is not None:
        parts.append(f"cap{model['capacity_factor']}")
    if model.get("gate", "softmax") != "softmax":
        parts.append(model["gate"])
    if model.get("temperature", 1.0) != 1.0:
        parts.append(f"t{model['temperature']}")
    if model.get("moe_z"):
        parts.append(f"z{model['moe_z']}")
    return "-".join(parts)


def _runs(out: Path, s: Setting, progress: bool, model: dict) -> list[dict]:
    data = _data(s.text, 128)
    cfg = LMConfig(**model)
    return [run_cached(out, cfg, TrainConfig(steps=s.steps, batch=BATCH, seed=seed, warmup=min(100, s.steps // 10),
                                             evals=12), LMTask(data), progress, f"{_tag(model)}-s{seed}")
            for seed in s.seeds]


def _summary(runs: list[dict], model: dict) -> dict:
    final = [r["final"] for r in runs]
    out = {"heldout_loss": _mean_ci([f["heldout_loss"] for f in final]), "params": runs[0]["params"],
           "heldout_loss_by_seed": [f["heldout_loss"] for f in final],
           "tokens_per_second": [r["tokens_per_second"] for r in runs],
           "curve": [{"tokens": h["tokens"], "loss": _mean_ci([r["history"][i]["heldout_loss"] for r in runs])}
                     for i, h in enumerate(runs[0]["history"])]}
    if model.get("mlp") == "moe":
        loads = [torch.tensor([layer["load"] for layer in f["experts_heldout"]]) for f in final]  # [layers, E] per seed
        out["max_load_over_mean"] = _mean_ci([float((x.max(1).values * x.shape[1]).mean()) for x in loads])
        out["dropped"] = _mean_ci([sum(layer["dropped"] for layer in f["experts_heldout"]) / len(f["experts_heldout"])
                                   for f in final])
        out["load_history"] = [[h["experts_heldout"] for h in r["history"]] for r in runs]
        out["steps"] = [h["step"] for h in runs[0]["history"]]
    return out


def _table(rows: dict, title: str, extra: list[str]) -> str:
    md = [title, "", "| run | held-out loss | each seed | parameters | max expert load / mean | dropped | tokens/s |",
          "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        load = _fmt(*r["max_load_over_mean"], digits=2) if "max_load_over_mean" in r else "-"
        dropped = _fmt(*r["dropped"]) if "dropped" in r else "-"
        seeds = ", ".join(f"{v:.3f}" for v in r["heldout_loss_by_seed"])
        md.append(f"| {name} | {_fmt(*r['heldout_loss'])} | {seeds} | {r['params']:,} | {load} | {dropped} | "
                  f"{', '.join(str(t) for t in r['tokens_per_second'])} |")
    return "\n".join(md + [""] + extra) + "\n"


def _curves_figure(rows: dict, title: str):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in rows.items():
        pts = [c for c in r["curve"] if c["tokens"] > 0]
        ax.plot([c["tokens"] for c in pts], [c["loss"][0] for c in pts], marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _compare(out, full, seeds, steps, text, progress, name: str, arms: dict, title: str, extra=None, fig=None) -> dict:
    out = Path(out)
    s = _setting(full, seeds, steps, text)
    rows = {arm: _summary(_runs(out, s, progress, model), model) for arm, model in arms.items()}
    result = {"setting": s.__dict__, "arms": arms, "rows": rows}
    head = f"# {title} ({len(s.seeds)} seed(s), {s.steps} steps x {BATCH} x 128 bytes of {s.text}); mean ± 95% interval"
    _write(out, name, result, _table(rows, head, extra(rows) if extra else []),
           fig(rows) if fig else _curves_figure(rows, title))
    return result


def moe_vs_dense(out, full=False, seeds=None, steps=None, text=None, progress=True) -> dict:
    """Top-2 of 8 experts against dense gated MLPs with the same active and the same total MLP parameters."""
    arms = {"dense, equal active (d_ff 256)": dict(mlp="dense", gated=True, activation="silu", d_ff=256),
            "moe top-2 of 8 (128 each)": BASE,
            "dense, equal total (d_ff 1024)": dict(mlp="dense", gated=True, activation="silu", d_ff=1024)}
    return _compare(out, full, seeds, steps, text, progress, "moe-vs-dense", arms, "Top-k MoE vs dense")


def _load_figure(rows: dict):
    plt = _plt()
    names = [n for n in rows if "load_history" in rows[n]]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        r = rows[name]
        hist = r["load_history"][0]  # seed 0: per step, per layer {"load": [E]}
        share = torch.tensor([[layer["load"] for layer in h] for h in hist]).mean(1)  # [steps, E], mean over layers
        for e in range(share.shape[1]):
            ax.plot([s_ + 1 for s_ in r["steps"]], share[:, e] * 100, lw=1)
        ax.axhline(100 / share.shape[1], color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step + 1")
    axes[0][0].set_ylabel("% of assignments per expert (mean of layers)")
    return fig


def balance(out, full=False, seeds=None, steps=None, text=None, progress=True) -> dict:
    """Per-expert token share over training, with the load-balancing loss off and its coefficient swept."""
    arms = {f"aux {c}": {**BASE, "moe_aux": c} for c in (0.0, 0.001, 0.01, 0.1)}
    return _compare(out, full, seeds, steps, text, progress, "balance", arms, "Load balance against the auxiliary "
                    "loss's coefficient", fig=_load_figure)


def capacity(out, full=False, seeds=None, steps=None, text=None, progress=True) -> dict:
    """Capacity factor (token dropping, overflow through the residual) against dropless routing."""
    arms = {"dropless": BASE} | {f"capacity {c}": {**BASE, "capacity_factor": c} for c in (0.5, 1.0, 1.25)}
    return _compare(out, full, seeds, steps, text, progress, "capacity", arms, "Capacity factor vs dropless")


def experts_per_token(out, full=False, seeds=None, steps=None, text=None, progress=True) -> dict:
    """Top-1 vs top-2 vs top-4 of 8 experts (active parameters grow with k)."""
    arms = {f"top-{k}": {**BASE, "k": k} for k in (1, 2, 4)}
    return _compare(out, full, seeds, steps, text, progress, "experts-per-token", arms, "Experts per token")


def gates(out, full=False, seeds=None, steps=None, text=None, progress=True) -> dict:
    """Softmax gates at temperatures 0.5, 1 and 2 against softmax(tanh(logits)) (an activation before the softmax)."""
    arms = {f"softmax, temperature {t}": ({**BASE, "temperature": t} if t != 1.0 else BASE) for t in (0.5, 1.0, 2.0)}
    arms["tanh before softmax"] = {**BASE, "gate": "activation"}
    return _compare(out, full, seeds, steps, text, progress, "gates", arms, "Gates: temperature vs activation")


RUNNERS = {"moe-vs-dense": moe_vs_dense, "balance": balance, "capacity": capacity, "experts-per-token": experts_per_token,
           "gates": gates}
