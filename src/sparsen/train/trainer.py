"""The CPU trainer for small models: AdamW, warm-up then cosine, seeded, resumable to bit-identical weights, with the
MLPs' activation sparsity measured at log-spaced steps from initialisation on.

A task supplies batches and the held-out set: ``LMTask`` (next-token prediction on a TokenData, optionally with a
share of the targets replaced by random tokens: noisy labels) or ``ClassifyTask`` (fixed sequences and labels, read
epoch after epoch). ``OUT/checkpoint.safetensors`` holds the model, Adam's moments, the step and the history;
``OUT/config.json`` the model and training configs (a resume with other configs is refused); ``OUT/model.safetensors``
the final weights; ``OUT/train.json`` the summary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.core.config import check, config_json, strict_config
from sparsen.errors import SparsenError
from sparsen.io import save_safetensors, write_json
from sparsen.nn import chunk_sparsity
from sparsen.train.model import LMConfig, TinyLM


@strict_config
class TrainConfig:
    steps: int = 1000
    batch: int = 32
    """sequences per step"""
    lr: float = 3e-3
    warmup: int = 100
    """steps of linear warm-up; then cosine decay to ``min_lr_share`` of lr"""
    min_lr_share: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    """initialisation, batch order and label noise"""
    label_noise: float = 0.0
    """language models: the share of targets replaced by uniform random tokens (noisy labels)"""
    evals: int = 20
    """measurements at log-spaced steps (step 0, the initialisation, included; the last step always)"""
    eval_windows: int = 32
    """held-out windows each measurement reads (loss and activation sparsity)"""
    checkpoint_every: int = 500
    threads: int = 0
    """torch threads (0: every core)"""

    def __post_init__(self):
        check(self.steps > 0 and self.batch > 0, "steps and batch must be > 0")
        check(self.lr > 0 and self.warmup >= 0, "lr must be > 0 and warmup >= 0")
        check(0 <= self.label_noise < 1, "label_noise must be in [0, 1)")
        check(self.evals >= 2 and self.eval_windows > 0, "evals must be >= 2 and eval_windows > 0")
        check(self.checkpoint_every > 0 and self.threads >= 0, "checkpoint_every must be > 0 and threads >= 0")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        u = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_share + (1 - self.min_lr_share) * 0.5 * (1 + math.cos(math.pi * min(u, 1.0))))

    def eval_steps(self) -> list[int]:
        """0, then log-spaced to ``steps`` (after that many updates)."""
        pts = {0, self.steps} | {int(round(self.steps ** (i / (self.evals - 1)))) for i in range(self.evals - 1)}
        return sorted(pts)

    def to_json(self) -> dict:
        return config_json(self)


class LMTask:
    """Next-token prediction on ``data`` (a TokenData)."""
    kind = "lm"

    def __init__(self, data):
        self.data = data

    def check(self, tcfg: TrainConfig, model=None) -> None:
        self.data.check_steps(tcfg.steps, tcfg.batch)
        if model is not None and model.cfg.vocab < self.data.vocab_size:
            raise SparsenError(f"the model's vocab is {model.cfg.vocab} but the data's is {self.data.vocab_size}: "
                               f"give vocab={self.data.vocab_size}")

    def batch(self, step: int, tcfg: TrainConfig):
        w = self.data.batch(step, tcfg.batch, tcfg.seed)
        x, y = w[:, :-1], w[:, 1:]
        if tcfg.label_noise:
            g = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + step + 1)
            flip = torch.rand(y.shape, generator=g) < tcfg.label_noise
            y = torch.where(flip, torch.randint(self.vocab, y.shape, generator=g), y)
        return x, y

    @property
    def vocab(self) -> int:
        return self.data.vocab_size

    def heldout(self, n: int):
        w = self.data.heldout(n)
        return w[:, :-1], w[:, 1:]

    def identity(self) -> dict:
        share = {} if self.data.heldout_share == 0.05 else {"heldout_share": self.data.heldout_share}
        return {"task": "lm", "data": self.data.name, "fingerprint": self.data.fingerprint, **share}

    @staticmethod
    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @staticmethod
    def accuracy(logits, y) -> float:
        """Top-1 accuracy (logits [..., classes], labels [...]): both tasks'."""
        return float((logits.argmax(-1) == y).float().mean())


class ClassifyTask:
    """Fixed sequences ``x`` [n, T] with labels ``y`` [n] (a classifier's, one per sequence) or [n, T] (one per
    position, for a language model: its loss over every position), read epoch after epoch in seeded orders; the
    held-out sequences are apart."""
    kind = "classify"

    def __init__(self, x, y, x_held, y_held, name: str):
        self.x, self.y, self.x_held, self.y_held, self.name = x, y, x_held, y_held, name

    def check(self, tcfg: TrainConfig, model=None) -> None:
        check(tcfg.batch <= len(self.x), f"batch {tcfg.batch} is larger than the {len(self.x)} training sequences")

    def batch(self, step: int, tcfg: TrainConfig):
        per_epoch = len(self.x) // tcfg.batch
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(tcfg.seed * 7919 + epoch))
        idx = order[i * tcfg.batch:(i + 1) * tcfg.batch]
        return self.x[idx], self.y[idx]

    def heldout(self, n: int):
        return self.x_held[:n], self.y_held[:n]

    def train_sample(self, n: int):
        return self.x[:n], self.y[:n]

    def identity(self) -> dict:
        h = torch.cat([self.x.flatten(), self.y.flatten()]).numpy().tobytes()
        return {"task": "classify", "data": self.name, "fingerprint": hashlib.sha256(h).hexdigest()[:16]}

    @staticmethod
    def loss(logits, y):
        return F.cross_entropy(logits, y) if y.dim() == 1 else LMTask.loss(logits, y)

    accuracy = staticmethod(LMTask.accuracy)


@torch.no_grad()
def activation_stats(model: TinyLM, x: torch.Tensor) -> dict:
    """Per layer, over the tokens of ``x``: the mean share of nonzero hidden units per token (``nnz``), which units
    fired at least once (``fired``, bool [d]) and the nonzero masks (``active``, [B, T, d]), plus the logits."""
    rows, handles = {}, []
    for i, m in enumerate(model.hidden_modules()):
        def hook(mod, args, out, i=i):
            rows[i] = out.detach().reshape(-1, out.shape[-1]) != 0
        handles.append(m.register_forward_hook(hook))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if rows and rows[0].shape[0] == x.shape[0] * x.shape[1]:  # a token dimension (not a classifier's pooled rows)
        for i in rows:
            rows[i] = rows[i].view(x.shape[0], x.shape[1], -1)
    nnz = [float(rows[i].float().mean()) for i in range(len(rows))]
    fired = [rows[i].reshape(-1, rows[i].shape[-1]).any(0) for i in range(len(rows))]
    return {"nnz": nnz, "fired": fired, "logits": logits, "active": rows}


def measure(model: TinyLM, task, x_train, y_train, tcfg: TrainConfig) -> dict:
    """Held-out loss and accuracy; per layer nnz on held-out and on the training batch, dead units (never active on the
    held-out windows) and BlockFFN's chunk-level sparsity over 8 consecutive tokens (held-out)."""
    was = model.training
    model.eval()
    xh, yh = task.heldout(tcfg.eval_windows)
    held = activation_stats(model, xh)
    loads = model.expert_loads()
    train = activation_stats(model, x_train[: tcfg.eval_windows])
    model.train(was)
    return ({"experts_heldout": loads} if loads else {}) | {"heldout_loss": float(task.loss(held["logits"], yh)),
            "heldout_accuracy": task.accuracy(held["logits"], yh),
            "train_loss": float(task.loss(train["logits"], y_train[: tcfg.eval_windows])),
            "train_accuracy": task.accuracy(train["logits"], y_train[: tcfg.eval_windows]),
            "nnz_heldout": held["nnz"], "nnz_train": train["nnz"],
            "dead_heldout": [float(1 - f.float().mean()) for f in held["fired"]],
            "chunk_sparsity_8_heldout": [chunk_sparsity(a, 8) if a.dim() == 3 and a.shape[1] >= 8 else None
                                         for a in held["active"].values()]}


def _configs(model: TinyLM, task, tcfg: TrainConfig) -> dict:
    return {"model": model.cfg.to_json(), "train": tcfg.to_json(), "data": task.identity()}


def _save_checkpoint(path: Path, model, opt, step: int, history: list, seconds: float, configs: dict) -> None:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = v.detach().clone().reshape(-1) if v.dim() == 0 else v.detach().clone()
    meta = {"step": str(step), "history": json.dumps(history), "seconds": repr(seconds), "configs": json.dumps(configs)}
    save_safetensors(path, tensors, meta)


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k} is {va!r} there, {vb!r} here"
    return ""


def _load_checkpoint(path: Path, model, opt, configs: dict):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        stored = json.loads(meta["configs"])
        ignore = {"checkpoint_every", "threads"}
        diff = _first_difference({**stored, "train": {k: v for k, v in stored["train"].items() if k not in ignore}},
                                 {**configs, "train": {k: v for k, v in configs["train"].items() if k not in ignore}})
        if diff:
            raise SparsenError(f"'{path.parent}' holds a run of another config ({diff}): use another --out, or the same "
                               "settings to resume")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = opt.state_dict()
    per = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            per.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    state["state"] = per
    opt.load_state_dict(state)
    return int(meta["step"]), json.loads(meta["history"]), float(meta["seconds"])


def optimizer(model: TinyLM, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) at tcfg.lr, weight decay on the matrices but the embedding."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.95))


def train(model: TinyLM, task, tcfg: TrainConfig, out=None, resume: bool = False, progress: bool = True,
          desc: str = "train", stop_at: int | None = None) -> dict:
    """Train ``model`` on ``task``; returns the summary (written to OUT/train.json when ``out`` is given). The model
    must be freshly built with ``torch.manual_seed(tcfg.seed)`` (``build_model`` does it) for runs to be seeded.
    ``stop_at``: checkpoint after that step and return (a later ``resume`` continues the same run). A resume is
    bit-identical on the same torch build and thread count (CPU reductions may split differently across threads)."""
    task.check(tcfg, model)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    out = Path(out) if out is not None else None
    ckpt = out / "checkpoint.safetensors" if out else None
    if ckpt is not None and ckpt.exists() and not resume:
        raise SparsenError(f"'{out}' already holds a training run: pass --resume to continue it, or another --out")
    opt = optimizer(model, tcfg)
    configs = _configs(model, task, tcfg)
    step, history, seconds = 0, [], 0.0
    if ckpt is not None and resume and ckpt.exists():
        step, history, seconds = _load_checkpoint(ckpt, model, opt, configs)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", configs)
    evals = set(tcfg.eval_steps())
    tokens_per_step = tcfg.batch * (model.cfg.ctx if task.kind == "lm" else task.x.shape[1])
    bar = tqdm(total=tcfg.steps, initial=step, desc=desc, unit="step", disable=not progress)
    model.train()
    t0 = time.perf_counter()
    if step == 0 and not history:
        x, y = task.batch(0, tcfg)
        history.append({"step": 0, "tokens": 0, **measure(model, task, x, y, tcfg)})
    end = min(stop_at, tcfg.steps) if stop_at else tcfg.steps
    while step < end:
        x, y = task.batch(step, tcfg)
        for g in opt.param_groups:
            g["lr"] = tcfg.lr_at(step)
        logits = model(x)
        loss = task.loss(logits, y) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step in evals:
            elapsed = seconds + time.perf_counter() - t0
            history.append({"step": step, "tokens": step * tokens_per_step, "seconds": round(elapsed, 2),
                            **measure(model, task, x, y, tcfg)})
            h = history[-1]
            bar.set_postfix(loss=f"{h['heldout_loss']:.3f}", nnz=f"{sum(h['nnz_heldout']) / len(h['nnz_heldout']):.3f}",
                            tok_s=f"{step * tokens_per_step / max(elapsed, 1e-9):.0f}")
        if ckpt is not None and (step % tcfg.checkpoint_every == 0 or step == end):
            _save_checkpoint(ckpt, model, opt, step, history, seconds + time.perf_counter() - t0, configs)
    bar.close()
    seconds += time.perf_counter() - t0
    if step < tcfg.steps:
        return {"configs": configs, "steps": step, "stopped": True, "history": history}
    trained_tokens = tcfg.steps * tokens_per_step
    summary = {"configs": configs, "params": model.n_params(), "steps": tcfg.steps, "tokens": trained_tokens,
               "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
               "tokens_per_second": round(trained_tokens / max(seconds, 1e-9)), "history": history,
               "final": history[-1]}
    if out:
        save_safetensors(out / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()},
                         {"config": json.dumps(model.cfg.to_json())})
        write_json(out / "train.json", summary)
    return summary


def build_model(cfg: LMConfig, seed: int) -> TinyLM:
    """A TinyLM initialised from ``seed``."""
    torch.manual_seed(seed)
    return TinyLM(cfg)


def load_trained(folder) -> TinyLM:
    """The model a finished run wrote to ``folder``."""
    from safetensors import safe_open

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise SparsenError(f"no model.safetensors in '{folder}': train first (sparsen train --out {folder})")
    with safe_open(str(path), "pt") as f:
        cfg = LMConfig.from_json(json.loads(f.metadata()["config"]))
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = TinyLM(cfg)
    model.load_state_dict(state)
    return model.eval()


def default_threads() -> int:
    return os.cpu_count() or 1
