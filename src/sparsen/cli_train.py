"""The `sparsen train` and `sparsen experiment` commands: small models trained on the CPU, the Lazy Neuron and top-k
experiments. Kept apart from cli.py (which stays importable without torch) and registered by it."""

from __future__ import annotations

import argparse

from sparsen.errors import SparsenError

MLP_KINDS = ("dense", "topk", "stat-topk", "predictor", "blockffn", "moe")  # sparsen.nn.MLP_KINDS (not imported: torch)
ATTENTIONS = ("dense", "topk", "local-dilated")
EXPERIMENTS = ("emergence", "width", "random", "topk", "stat-topk", "distill",  # sparsen.train.experiments.RUNNERS
               "moe-vs-dense", "balance", "capacity", "experts-per-token", "gates",  # sparsen.train.routing.RUNNERS
               "gating-theory")  # sparsen.train.gating.RUNNERS


def _layers(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of layer indices, e.g. 0,2") from None


def add_parsers(sub, add_model, positive_int) -> None:
    p = sub.add_parser("train", help="train a small transformer on the CPU (any sparse MLP or attention in any block)",
                       description="Train a small pre-LN transformer (byte or SmolLM2-BPE vocabulary) on a local corpus "
                                   "with AdamW; measures held-out loss and the MLPs' % nonzero at log-spaced steps from "
                                   "initialisation on. Checkpoints to --out (safetensors + config.json); --resume "
                                   "continues to the same weights an uninterrupted run reaches.")
    p.add_argument("--text", default="wikitext2-valid", metavar="FILE",
                   help="training corpus: a UTF-8 file, a folder of .txt/.html (e.g. /usr/share/doc/python3.11/html) or "
                        "a bundled name (default wikitext2-valid); its last --heldout share is held out")
    p.add_argument("--heldout", type=float, default=0.05, help="held-out share of the corpus (default 0.05)")
    p.add_argument("--vocab", default="bytes", choices=("bytes", "bpe"), help="bytes (256) or SmolLM2's BPE (default bytes)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoint, config, train.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=positive_int, default=128)
    g.add_argument("--layers", type=positive_int, default=4)
    g.add_argument("--heads", type=positive_int, default=4)
    g.add_argument("--ctx", type=positive_int, default=128)
    g.add_argument("--d-ff", type=positive_int, default=512)
    g.add_argument("--mlp", default="dense", help=f"MLP kind: {', '.join(MLP_KINDS)} (default dense ReLU)")
    g.add_argument("--activation", default="relu", help="relu, gelu, gelu_tanh or silu (default relu)")
    g.add_argument("--gated", action="store_true", help="gated MLP: act(gate x) * up x")
    g.add_argument("--k", type=int, default=32,
                   help="topk / stat-topk / predictor: units kept per token; moe: experts per token (default 32)")
    g.add_argument("--hard", action="store_true", help="stat-topk: hard threshold instead of soft")
    g.add_argument("--r", type=int, default=64, help="predictor: input dimensions that predict (default 64)")
    g.add_argument("--experts", type=positive_int, default=16, help="blockffn, moe: experts (default 16)")
    g.add_argument("--moe-aux", type=float, default=0.0, help="moe: load-balancing loss weight (default 0)")
    g.add_argument("--moe-z", type=float, default=0.0, help="moe: router z-loss weight (default 0)")
    g.add_argument("--capacity-factor", type=float, default=None, help="moe: capacity factor (default dropless)")
    g.add_argument("--gate", default="softmax", choices=("softmax", "activation"),
                   help="moe: softmax(logits / temperature) or softmax(tanh(logits)) (default softmax)")
    g.add_argument("--temperature", type=float, default=1.0, help="moe: softmax temperature (default 1)")
    g.add_argument("--router-l1", type=float, default=0.0, help="blockffn: router L1 weight (default 0)")
    g.add_argument("--attention", default="dense", help=f"attention: {', '.join(ATTENTIONS)} (default dense)")
    g.add_argument("--attn-k", type=positive_int, default=16, help="topk attention: keys per query (default 16)")
    g.add_argument("--window", type=positive_int, default=16, help="local-dilated: recent keys (default 16)")
    g.add_argument("--stride", type=positive_int, default=16, help="local-dilated: stride of older keys (default 16)")
    g.add_argument("--sparse-layers", type=_layers, default=(), metavar="I,J",
                   help="blocks that get --mlp / --attention (default all)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=200)
    g.add_argument("--batch", type=positive_int, default=32, help="sequences per step (default 32)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--label-noise", type=float, default=0.0, help="share of targets replaced by random tokens")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=positive_int, default=100)
    g.add_argument("--threads", type=int, default=0, help="torch threads (default every core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("experiment", help="the Lazy Neuron and top-k experiments: each writes NAME.json, .md and .png",
                       description="emergence: % nonzero per layer over training, 3 seeds; width: against d_ff; random: the "
                                   "language model fitting a random label per position, of text and of random bytes; topk: the "
                                   "top-k Transformer vs dense (loss, ECE, corrupted inputs, noisy labels); stat-topk: "
                                   "statistical vs exact top-k (recall, forward+backward time); distill: sparse-attention "
                                   "students with and without online distillation; moe-vs-dense, balance, capacity, "
                                   "experts-per-token, gates: top-k mixtures of experts; gating-theory: a Gaussian mixture of "
                                   "experts fitted by maximum likelihood against n (synthetic). The default is small (minutes, "
                                   "on WikiText-2 validation bytes); --full is the documented setting (Debian's python3.11-doc). "
                                   "Runs are cached in OUT/runs and reused across experiments.")
    p.add_argument("name", metavar="NAME", help=f"one of {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", default="experiments", metavar="DIR", help="output folder (default ./experiments)")
    p.add_argument("--full", action="store_true", help="the full setting (see BENCHMARKS.md for its time)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds (default the setting's)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default the setting's)")
    p.add_argument("--text", default=None, metavar="FILE", help="training corpus instead of the setting's")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_train(args) -> None:
    if args.mlp not in MLP_KINDS:
        raise SparsenError(f"unknown --mlp '{args.mlp}': use one of {', '.join(MLP_KINDS)}")
    if args.attention not in ATTENTIONS:
        raise SparsenError(f"unknown --attention '{args.attention}': use one of {', '.join(ATTENTIONS)}")
    from sparsen.io import check_writable
    from sparsen.train import LMConfig, LMTask, TrainConfig, build_model, load_data, train

    out = check_writable(args.out, directory=True)
    tcfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                       label_noise=args.label_noise, seed=args.seed, checkpoint_every=args.checkpoint_every,
                       threads=args.threads)
    data = load_data(args.text, args.vocab, args.ctx, args.heldout)
    cfg = LMConfig(vocab=data.vocab_size, d_model=args.d_model, n_layers=args.layers,
                   n_heads=args.heads, ctx=args.ctx, d_ff=args.d_ff, mlp=args.mlp, activation=args.activation,
                   gated=args.gated, k=args.k, soft=not args.hard, r=args.r, experts=args.experts,
                   router_l1=args.router_l1, moe_aux=args.moe_aux, moe_z=args.moe_z,
                   capacity_factor=args.capacity_factor, gate=args.gate, temperature=args.temperature,
                   sparse_layers=args.sparse_layers, attention=args.attention,
                   attn_k=args.attn_k, attn_window=args.window, attn_stride=args.stride)
    task = LMTask(data)
    task.check(tcfg)
    model = build_model(cfg, args.seed)
    s = train(model, task, tcfg, out, resume=args.resume, progress=not args.quiet)
    f = s["final"]
    nnz = ", ".join(f"{v:.3f}" for v in f["nnz_heldout"])
    cls = ", ".join(f"{v:.3f}" for v in f["chunk_sparsity_8_heldout"] if v is not None)
    print(f"trained {s['params']:,} parameters on {s['tokens']:,} tokens in {s['seconds']:.0f} s "
          f"({s['tokens_per_second']:,} tokens/s, {s['threads']} threads); held-out loss {f['heldout_loss']:.3f} "
          f"(perplexity {2.718281828 ** f['heldout_loss']:.2f}); share nonzero per layer {nnz}; chunk sparsity "
          f"(8 tokens) {cls}")
    print(f"wrote {out / 'model.safetensors'} and {out / 'train.json'}")


def cmd_experiment(args) -> None:
    if args.name not in EXPERIMENTS:
        raise SparsenError(f"unknown experiment '{args.name}': use one of {', '.join(EXPERIMENTS)}")
    from sparsen.io import check_writable
    from sparsen.train.experiments import RUNNERS
    from sparsen.train.gating import RUNNERS as GATING
    from sparsen.train.routing import RUNNERS as ROUTING

    RUNNERS = {**RUNNERS, **ROUTING, **GATING}
    out = check_writable(args.out, directory=True)
    kwargs = {"full": args.full, "progress": not args.quiet}
    if args.name not in ("stat-topk", "gating-theory"):
        kwargs.update(seeds=args.seeds, steps=args.steps, text=args.text)
    elif args.seeds or args.steps or args.text:
        raise SparsenError(f"{args.name} trains no language model: --seeds, --steps and --text do not apply")
    res = RUNNERS[args.name](out, **kwargs)
    print((out / f"{args.name}.md").read_text())
    failed = [k for k, v in res.get("acceptance", {}).items() if not v]
    if "acceptance" in res:
        print(f"acceptance: {'all pass' if not failed else 'failed: ' + '; '.join(failed)}")
    print(f"wrote {out / (args.name + '.json')}, {args.name}.md and {args.name}.png")
