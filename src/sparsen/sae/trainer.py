"""The CPU trainer: Adam on an activation cache's shuffled batches, seeded, resumable, with dead-latent tracking.

One step: the architecture's ``training_output`` (its loss), backward, for a unit-norm decoder the gradient along
W_dec's rows removed, gradient norm clipped, Adam at the scheduled rate, W_dec's rows renormalised. A latent is
dead once it has not fired for ``dead_tokens`` tokens (counted in tokens, not steps, so the batch size does not
change what "dead" means); AuxK reads that mask.

``OUT/checkpoint.safetensors`` holds everything a resumed run needs (parameters, Adam's moments, the dead
counters, the step; written atomically); ``OUT/cfg.json`` + ``OUT/sae_weights.safetensors`` is the dictionary in
SAELens's layout, rewritten at each checkpoint and at the end.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsen.core.config import check, config_json, strict_config
from sparsen.errors import SparsenError
from sparsen.io import save_safetensors, write_json

LR_SCHEDULES = ("constant", "linear", "cosine")


@strict_config
class TrainConfig:
    tokens: int = 2_000_000
    """training tokens (batches are drawn epoch after epoch if the cache holds fewer)"""
    batch: int = 4096
    """tokens per step"""
    lr: float = 5e-4
    """Adam's learning rate after warm-up"""
    lr_warmup_tokens: int = 0
    """tokens over which the rate ramps linearly from 0"""
    lr_schedule: str = "linear"
    """after warm-up: constant, or decay to 0 over the last ``lr_decay_share`` of the run (linear or cosine)"""
    lr_decay_share: float = 0.2
    adam_betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    """maximum gradient norm (0: no clipping)"""
    dead_tokens: int = 1_000_000
    """a latent that has not fired for this many tokens is dead (AuxK trains it; the report counts it)"""
    seed: int = 0
    """initialisation and batch order"""
    checkpoint_tokens: int = 500_000
    """write a checkpoint every this many tokens (and at the end)"""
    log_tokens: int = 65_536
    """record the running loss, FVU, L0 and dead fraction every this many tokens"""

    def __post_init__(self):
        check(self.tokens > 0 and self.batch > 0, "tokens and batch must be > 0")
        check(self.lr > 0, "lr must be > 0")
        check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        check(0 <= self.lr_decay_share <= 1, "lr_decay_share must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip must be >= 0")
        check(self.dead_tokens > 0, "dead_tokens must be > 0")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.batch)

    def lr_at(self, step: int) -> float:
        tokens = step * self.batch
        if self.lr_warmup_tokens and tokens < self.lr_warmup_tokens:
            return self.lr * (tokens + self.batch) / self.lr_warmup_tokens
        if self.lr_schedule == "constant" or self.lr_decay_share == 0:
            return self.lr
        start = self.steps * (1 - self.lr_decay_share)
        if step < start:
            return self.lr
        u = (step - start) / max(1.0, self.steps - start)
        return self.lr * ((1 - u) if self.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * u)))

    def to_json(self) -> dict:
        return config_json(self)


def _configs_json(sae, tcfg: TrainConfig) -> dict:
    from sparsen.sae.formats import config_json
    return {"sae": config_json(sae.cfg), "train": tcfg.to_json()}


def train(sae, cache, tcfg: TrainConfig, out, resume: bool = False, progress: bool = True) -> dict:
    """Train ``sae`` (a SparseCoder, its config naming the hooks) on ``cache`` (an ActivationCache); returns the
    summary (also in OUT/train.json)."""
    from sparsen.sae.formats import save_saelens

    cfg = sae.cfg
    hook_in, hook_out = cfg.hook_name, cfg.hook_name_out or None
    if cache.width(hook_in) != cfg.d_in:
        raise SparsenError(f"the cache's '{hook_in}' is {cache.width(hook_in)} wide but the dictionary's d_in is "
                           f"{cfg.d_in}: give d_in = {cache.width(hook_in)}")
    if hook_out and cache.width(hook_out) != cfg.out_width:
        raise SparsenError(f"the cache's '{hook_out}' is {cache.width(hook_out)} wide but the dictionary's d_out is "
                           f"{cfg.out_width}")
    out = Path(out)
    ckpt = out / "checkpoint.safetensors"
    if ckpt.exists() and not resume:
        raise SparsenError(f"'{out}' already holds a training run: pass --resume to continue it or another --out")
    params = [p for p in sae.parameters()]
    opt = torch.optim.Adam(params, lr=tcfg.lr, betas=tuple(tcfg.adam_betas))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    step, history, seconds = 0, [], 0.0
    meta_cfg = _configs_json(sae, tcfg)
    if resume and ckpt.exists():
        step, history, seconds = _load_checkpoint(ckpt, sae, opt, since_fired, meta_cfg)
    torch.manual_seed(tcfg.seed)
    stream = cache.batches(hook_in, tcfg.batch, seed=tcfg.seed, hook_out=hook_out, skip=step)
    if step == 0:  # the start sees the first batch (a transcoder's: enough batches for a token per latent)
        first, rows, limit = [], 0, min(cfg.d_sae, cache.tokens) if cfg.is_transcoder else 1
        for b in cache.batches(hook_in, tcfg.batch, seed=tcfg.seed, hook_out=hook_out):
            first.append(b if hook_out else (b, b))
            rows += first[-1][0].shape[0]
            if rows >= limit:
                break
        x0, y0 = (torch.cat([b[i] for b in first]) for i in (0, 1))
        sae.initialize(x0, y0, torch.Generator().manual_seed(tcfg.seed))
    bar = tqdm(total=tcfg.steps, initial=step, desc=f"train {cfg.architecture}", unit="step", disable=not progress)
    run = {"loss": 0.0, "fvu": 0.0, "l0": 0.0, "n": 0}
    next_ckpt = (step * tcfg.batch // tcfg.checkpoint_tokens + 1) * tcfg.checkpoint_tokens
    next_log = (step * tcfg.batch // tcfg.log_tokens + 1) * tcfg.log_tokens
    t0 = time.perf_counter()
    while step < tcfg.steps:
        b = next(stream)
        x, y = b if hook_out else (b, b)
        dead = since_fired >= tcfg.dead_tokens
        o = sae.training_output(x, y, dead)
        opt.zero_grad(set_to_none=True)
        o.loss.backward()
        if sae.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = tcfg.lr_at(step)
        opt.step()
        if sae.unit_norm_decoder:
            sae.normalize_decoder()
        sae.after_step(o)
        since_fired += x.shape[0]
        since_fired[o.active] = 0
        step += 1
        run["loss"] += float(o.loss.detach())
        run["fvu"] += float(o.fvu)
        run["l0"] += float(o.l0)
        run["n"] += 1
        bar.update(1)
        tokens = step * tcfg.batch
        if tokens >= next_log or step == tcfg.steps:
            n = run.pop("n")
            rec = {"tokens": tokens, **{k: v / n for k, v in run.items()},
                   "dead": float((since_fired >= tcfg.dead_tokens).float().mean())}
            history.append(rec)
            bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead']:.3f}")
            run = {"loss": 0.0, "fvu": 0.0, "l0": 0.0, "n": 0}
            next_log += tcfg.log_tokens
        if tokens >= next_ckpt or step == tcfg.steps:
            elapsed = seconds + time.perf_counter() - t0
            _save_checkpoint(ckpt, sae, opt, since_fired, step, history, elapsed, meta_cfg)
            save_saelens(sae, out)
            next_ckpt += tcfg.checkpoint_tokens
    bar.close()
    seconds += time.perf_counter() - t0
    summary = {"architecture": cfg.architecture, "hook": hook_in, "hook_out": hook_out, "d_in": cfg.d_in,
               "d_sae": cfg.d_sae, "steps": step, "tokens": step * tcfg.batch, "seconds": seconds,
               "tokens_per_second": step * tcfg.batch / max(seconds, 1e-9),
               "dead_fraction": float((since_fired >= tcfg.dead_tokens).float().mean()),
               "final": history[-1] if history else None, "history": history, "config": meta_cfg,
               "threads": torch.get_num_threads()}
    write_json(out / "train.json", summary)
    return summary


def _save_checkpoint(path, sae, opt, since_fired, step, history, seconds, meta_cfg) -> None:
    tensors = {f"param.{n}": p.detach() for n, p in sae.named_parameters()}
    tensors.update({f"buffer.{n}": b for n, b in sae.named_buffers()})
    names = {id(p): n for n, p in sae.named_parameters()}
    for p, st in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"adam.{names[id(p)]}.{key}"] = st[key]
        tensors[f"adam.{names[id(p)]}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    tensors["since_fired"] = since_fired
    meta = {"step": str(step), "seconds": repr(seconds), "history": json.dumps(history), "config": json.dumps(meta_cfg)}
    save_safetensors(path, tensors, metadata=meta)


def _load_checkpoint(path, sae, opt, since_fired, meta_cfg):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if json.loads(meta["config"]) != json.loads(json.dumps(meta_cfg)):
        raise SparsenError(f"checkpoint '{path}' was trained with other settings: resume with the same ones, or pass "
                           "another --out")
    t = load_file(path)
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(t[f"param.{n}"])
        for n, b in sae.named_buffers():
            b.copy_(t[f"buffer.{n}"])
    names = dict(sae.named_parameters())
    for n, p in names.items():
        if f"adam.{n}.exp_avg" in t:
            opt.state[p] = {"step": torch.tensor(float(t[f"adam.{n}.step"][0])),
                            "exp_avg": t[f"adam.{n}.exp_avg"].clone(), "exp_avg_sq": t[f"adam.{n}.exp_avg_sq"].clone()}
    since_fired.copy_(t["since_fired"])
    return int(meta["step"]), json.loads(meta["history"]), float(meta["seconds"])
