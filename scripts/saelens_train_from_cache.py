"""Train a SAELens TopK SAE on cached activations, without a language model.

Runs ONLY in the peer venv (torch 2.13.0 CPU + sae-lens), not in the project's
own environment:

    /work/venv-peers-sae/bin/python scripts/saelens_train_from_cache.py \\
        --cache DIR --key NAME --k 32 --width 4096 --batch 4096 \\
        --steps 1000 --lr 3e-4 --seed 0 --out OUTDIR [--threads N]

Input: ``DIR/shard_*.safetensors`` (natural sort order), each holding one 2-D
tensor under ``--key`` of shape [n_tokens, d_in] (any float dtype; cast to
float32).  Shards are streamed in order and batches of ``--batch`` rows are cut
across shard boundaries; after the last shard it starts over (``epochs`` in the
output is rows served / rows in the cache).  Rows are not shuffled: shuffle the cache beforehand, or
pass ``--shuffle`` to permute rows within each shard with ``--seed``.

Training uses SAELens's own model-free entry point: ``SAETrainer`` from
``sae_lens.training.sae_trainer`` with a ``data_provider`` iterator of
activation tensors (the same path as ``sae_lens.synthetic.training.train_toy_sae``),
and a ``TopKTrainingSAE`` with the library defaults unless overridden
(rescale_acts_by_decoder_norm=True, decoder_init_norm=0.1, W_enc = W_dec.T at
init, b_enc = b_dec = 0, aux_loss_coefficient=1.0, apply_b_dec_to_input=True,
Adam(0.9, 0.999), grad-norm clipping at 1.0, constant LR).

Timing covers only ``trainer.fit()`` (the training loop, including reading
batches from the memory-mapped shards; the time spent inside the data provider
is also reported separately).  Setup (imports, SAE construction, opening
shards) and saving are excluded.

Output: the trained SAE saved with ``save_inference_model`` (``cfg.json`` +
``sae_weights.safetensors``, architecture "topk", decoder norms folded) in
``--out``, ``--out/train_metrics.json``, and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def list_shards(cache: Path) -> list[Path]:
    shards = sorted(cache.glob("shard_*.safetensors"), key=_natural_key)
    if not shards:
        raise SystemExit(f"no shard_*.safetensors in {cache}")
    return shards


def shard_shape(path: Path, key: str) -> tuple[int, int]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        if key not in f.keys():
            raise SystemExit(f"{path}: no tensor {key!r} (has {list(f.keys())})")
        shape = tuple(f.get_slice(key).get_shape())
    if len(shape) != 2:
        raise SystemExit(f"{path}: {key!r} has shape {shape}, expected 2-D")
    return shape  # type: ignore[return-value]


class ShardStream(Iterator[torch.Tensor]):
    """Endless iterator of [batch, d_in] float32 batches cut from the shards."""

    def __init__(self, shards: list[Path], key: str, batch: int,
                 shuffle: bool = False, seed: int = 0):
        self.shards, self.key, self.batch = shards, key, batch
        self.shuffle = shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.next_shard = 0
        self.epochs = 0
        self.buf: torch.Tensor | None = None
        self.pos = 0
        self.seconds = 0.0  # time spent producing batches
        self.rows_served = 0

    def _load_next(self) -> torch.Tensor:
        path = self.shards[self.next_shard]
        self.next_shard += 1
        if self.next_shard == len(self.shards):
            self.next_shard = 0
            self.epochs += 1
        with safe_open(str(path), framework="pt", device="cpu") as f:
            t = f.get_tensor(self.key)
        t = t.to(torch.float32)
        if self.shuffle:
            t = t[torch.randperm(t.shape[0], generator=self.gen)]
        return t

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> torch.Tensor:
        t0 = time.perf_counter()
        parts = []
        need = self.batch
        while need > 0:
            if self.buf is None or self.pos >= self.buf.shape[0]:
                self.buf, self.pos = self._load_next(), 0
            take = min(need, self.buf.shape[0] - self.pos)
            parts.append(self.buf[self.pos : self.pos + take])
            self.pos += take
            need -= take
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = out.contiguous()
        self.rows_served += out.shape[0]
        self.seconds += time.perf_counter() - t0
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Train a SAELens TopK SAE from cached activation shards."
    )
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--width", type=int, required=True, help="d_sae")
    ap.add_argument("--batch", type=int, required=True, help="tokens per step")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--shuffle", action="store_true",
                    help="permute rows within each shard (seeded)")
    ap.add_argument("--aux-coef", type=float, default=None,
                    help="TopK AuxK coefficient (library default 1.0)")
    ap.add_argument("--dead-window", type=int, default=1000,
                    help="steps without firing before a latent counts as dead")
    ap.add_argument("--lr-warmup", type=int, default=0)
    ap.add_argument("--lr-decay", type=int, default=0,
                    help="linear decay steps to 0 at the end")
    ap.add_argument("--no-rescale", action="store_true",
                    help="rescale_acts_by_decoder_norm=False (library default True)")
    ap.add_argument("--no-b-dec-in", action="store_true",
                    help="apply_b_dec_to_input=False (library default True)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    # ----------------------------------------------------------------- setup
    shards = list_shards(args.cache)
    n_rows = 0
    d_in = None
    for s in shards:
        n, d = shard_shape(s, args.key)
        if d_in is not None and d != d_in:
            raise SystemExit(f"{s}: d_in {d} != {d_in}")
        d_in = d
        n_rows += n
    assert d_in is not None

    torch.manual_seed(args.seed)
    sae_kwargs = dict(
        d_in=d_in,
        d_sae=args.width,
        k=args.k,
        dtype="float32",
        device="cpu",
    )
    if args.aux_coef is not None:
        sae_kwargs["aux_loss_coefficient"] = args.aux_coef
    if args.no_rescale:
        sae_kwargs["rescale_acts_by_decoder_norm"] = False
    if args.no_b_dec_in:
        sae_kwargs["apply_b_dec_to_input"] = False
    sae_cfg = TopKTrainingSAEConfig(**sae_kwargs)
    sae = TopKTrainingSAE(sae_cfg)

    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=args.lr_warmup,
        lr_decay_steps=args.lr_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        device="cpu",
        autocast=False,
        dead_feature_window=args.dead_window,
        feature_sampling_window=max(args.steps, 1) + 1,  # no mid-run sparsity reset
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    stream = ShardStream(shards, args.key, args.batch, args.shuffle, args.seed)

    class RecordingTrainer(SAETrainer):
        last_output = None

        def step(self, batch):  # type: ignore[override]
            out = super().step(batch)
            self.last_output = out
            return out

    trainer = RecordingTrainer(cfg=trainer_cfg, sae=sae, data_provider=stream)

    # ----------------------------------------------------------------- train
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0

    # ----------------------------------------------------------------- report
    assert trainer.last_output is not None
    log = trainer.build_train_step_log_dict(
        output=trainer.last_output, n_training_samples=trainer.n_training_samples
    )
    tokens = trainer.n_training_samples
    metrics = {
        "library": "sae_lens",
        "sae_lens_version": sae_lens.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "d_in": d_in,
        "width": args.width,
        "k": args.k,
        "batch": args.batch,
        "steps": trainer.n_training_steps,
        "lr": args.lr,
        "seed": args.seed,
        "cache_rows": n_rows,
        "epochs": stream.rows_served / max(n_rows, 1),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "data_seconds": stream.seconds,
        "tokens_per_s_excl_data": (
            tokens / (seconds - stream.seconds) if seconds > stream.seconds else None
        ),
        # final-step training metrics (on the last batch, as SAELens logs them)
        "mse_loss": log.get("losses/mse_loss"),
        "aux_loss": log.get("losses/auxiliary_reconstruction_loss"),
        "overall_loss": log.get("losses/overall_loss"),
        "explained_variance": log.get("metrics/explained_variance"),
        "fvu": (
            1.0 - log["metrics/explained_variance"]
            if log.get("metrics/explained_variance") is not None
            else None
        ),
        "l0": log.get("metrics/l0"),
        "dead_features": log.get("sparsity/dead_features"),
        "final_lr": log.get("details/current_learning_rate"),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(str(args.out))
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
