"""The dictionary commands of the `sparsen` command line: `cache` and `sae train|eval|dashboard|convert`.

Kept apart from cli.py (which stays importable without torch) and registered by it."""

from __future__ import annotations

import json
from pathlib import Path

from sparsen.errors import SparsenError

ARCH_CHOICES = ("standard", "topk", "batchtopk", "jumprelu", "abstopk")  # sparsen.sae.ARCHITECTURES (a test keeps them equal)


def add_parsers(sub, add_model, positive_int) -> None:
    p = sub.add_parser("cache", help="cache a model's activations at hook points (safetensors shards, resumable)",
                       description="Run the model over a corpus in windows of --ctx tokens and store the activations "
                                   "of each --hook (blocks.N.hook_resid_pre|hook_resid_post|hook_mlp_in|hook_mlp_out|"
                                   "attn.hook_z) in safetensors shards with a manifest; an interrupted run resumes from "
                                   "its last shard when started again with the same settings.")
    add_model(p)
    p.add_argument("--hook", action="append", required=True, metavar="HOOK",
                   help="hook point, repeatable (a transcoder needs its input and output hooks in one cache)")
    p.add_argument("--tokens", type=positive_int, required=True, help="activations to cache per hook")
    p.add_argument("--text", action="append", default=None, metavar="CORPUS",
                   help="a bundled corpus name, a UTF-8 text file, or a folder of .txt/.html files (e.g. "
                        "/usr/share/doc/python3.11/html from Debian's python3.11-doc); repeatable, read in order "
                        "(default wikitext2-valid)")
    p.add_argument("--ctx", type=positive_int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--skip-first", type=int, default=1,
                   help="positions at the start of each window not stored (default 1: the attention-sink token)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--shard-tokens", type=positive_int, default=65536, help="tokens per shard (default 65536)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("sae", help="sparse dictionaries: train, evaluate, convert (SAELens / sparsify formats)")
    ssub = p.add_subparsers(dest="sae_command", metavar="SUBCOMMAND")
    t = ssub.add_parser("train", help="train a dictionary (SAE or transcoder) from an activation cache",
                        description="Train one dictionary on an activation cache: Adam, seeded, checkpointed every "
                                    "--checkpoint-tokens; --resume continues an interrupted run to the same weights. "
                                    "Writes cfg.json + sae_weights.safetensors (SAELens's layout) and train.json.")
    t.add_argument("--cache", required=True, metavar="DIR", help="an activation cache from `sparsen cache`")
    t.add_argument("--arch", default="topk", choices=ARCH_CHOICES)
    t.add_argument("--hook", default=None, help="input hook (default: the cache's first)")
    t.add_argument("--hook-out", default=None, help="target hook: makes a transcoder (e.g. hook_mlp_in -> hook_mlp_out)")
    t.add_argument("--skip", action="store_true", help="add a linear skip connection (skip-transcoder)")
    t.add_argument("--width", type=positive_int, required=True, help="number of latents (d_sae)")
    t.add_argument("--k", type=positive_int, default=32, help="active latents per token (topk, batchtopk, abstopk)")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="another config field, repeatable (e.g. l1_coefficient=5, target_l0=32, aux_coefficient=0)")
    t.add_argument("--tokens", type=positive_int, default=2_000_000, help="training tokens (default 2M)")
    t.add_argument("--batch", type=positive_int, default=4096, help="tokens per step (default 4096)")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--lr-warmup-tokens", type=int, default=0)
    t.add_argument("--lr-schedule", default="linear", choices=("constant", "linear", "cosine"))
    t.add_argument("--dead-tokens", type=positive_int, default=1_000_000,
                   help="tokens without firing after which a latent counts as dead (default 1M)")
    t.add_argument("--checkpoint-tokens", type=positive_int, default=500_000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--resume", action="store_true", help="continue the run in DIR from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = ssub.add_parser("eval", help="FVU, L0, dead/dense latents, shrinkage, spliced-in CE/KL and ce_loss_score",
                        description="Evaluate a dictionary (sparsen, SAELens or sparsify folder) on the model: "
                                    "reconstruction metrics over --tokens evaluation tokens and the loss with the "
                                    "reconstruction spliced in, against zero and mean ablation, on --ce-windows windows.")
    add_model(e)
    e.add_argument("--sae", required=True, metavar="DIR", help="the dictionary's folder")
    e.add_argument("--text", default="wikitext2-test", metavar="CORPUS", help="evaluation corpus (default wikitext2-test)")
    e.add_argument("--ctx", type=positive_int, default=1024)
    e.add_argument("--tokens", type=positive_int, default=65536, help="tokens for the reconstruction metrics")
    e.add_argument("--ce-windows", type=int, default=8, help="windows for the spliced-in loss (0: skip it; default 8)")
    e.add_argument("--skip-first", type=int, default=1, help="positions per window left out / left clean (default 1)")
    e.add_argument("--hook", default=None, help="the hook to read (default: the one in the dictionary's cfg.json)")
    e.add_argument("--out", default=None, metavar="FILE.json", help="write the metrics as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    d = ssub.add_parser("dashboard", help="a static HTML site of a dictionary's latents (open index.html offline)",
                        description="Run the model over --tokens tokens of a corpus and write a dashboard: an index of "
                                    "every latent (density, max and mean activation, logit effect; sortable) and a "
                                    "page per live latent with its activation histogram, top activating contexts and "
                                    "the tokens its decoder direction raises and lowers. No server, nothing fetched.")
    add_model(d)
    d.add_argument("--sae", required=True, metavar="DIR", help="the dictionary's folder (sparsen, SAELens or sparsify)")
    d.add_argument("--text", default="wikitext2-test", metavar="CORPUS", help="corpus (default wikitext2-test)")
    d.add_argument("--ctx", type=positive_int, default=128, help="window length in tokens (default 128)")
    d.add_argument("--tokens", type=positive_int, default=65536, help="positions to analyse (default 65536)")
    d.add_argument("--top-contexts", type=positive_int, default=10, help="top activating contexts per latent (default 10)")
    d.add_argument("--max-pages", type=int, default=None, metavar="N",
                   help="write pages for the N most frequent live latents only (default: every live latent)")
    d.add_argument("--skip-first", type=int, default=1, help="positions per window left out (default 1: the sink)")
    d.add_argument("--out", required=True, metavar="DIR")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    c = ssub.add_parser("convert", help="write a dictionary in SAELens's or sparsify's format")
    c.add_argument("--sae", required=True, metavar="DIR")
    c.add_argument("--to", required=True, choices=("saelens", "sparsify"))
    c.add_argument("--out", required=True, metavar="DIR")


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SparsenError(f"--set '{item}': use FIELD=VALUE, e.g. l1_coefficient=5")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def cmd_cache(args) -> None:
    from sparsen.io import check_writable
    from sparsen.models import load_model
    from sparsen.sae.cache import build_cache

    check_writable(args.out, directory=True)
    lm = load_model(args.model)
    m = build_cache(lm, args.hook, args.tokens, args.out, corpus=args.text or ["wikitext2-valid"], ctx=args.ctx, dtype=args.dtype,
                    shard_tokens=args.shard_tokens, skip_first=args.skip_first, progress=not args.quiet)
    n = sum(s["tokens"] for s in m["shards"])
    print(f"cached {n:,} tokens x {', '.join(f'{h} ({d})' for h, d in m['spec']['hooks'].items())} "
          f"in {len(m['shards'])} shards -> {args.out}")


def cmd_sae(args) -> None:
    if args.sae_command is None:
        raise SparsenError("give a subcommand: sparsen sae train|eval|dashboard|convert")
    {"train": _train, "eval": _eval, "dashboard": _dashboard, "convert": _convert}[args.sae_command](args)


def _train(args) -> None:
    from sparsen.io import check_writable
    from sparsen.sae import build_sae, sae_config
    from sparsen.sae.cache import ActivationCache
    from sparsen.sae.trainer import TrainConfig, train

    cache = ActivationCache(args.cache)
    hooks = list(cache.spec["hooks"])
    hook = args.hook or hooks[0]
    d_in = cache.width(hook)
    fields = {"d_in": d_in, "d_sae": args.width, "hook_name": hook, "model": cache.spec["model"],
              "model_fingerprint": cache.spec["fingerprint"], **_parse_sets(args.set)}
    if args.hook_out:
        fields.update(d_out=cache.width(args.hook_out), hook_name_out=args.hook_out)
    if args.skip:
        fields["skip"] = True
    if args.arch in ("topk", "batchtopk", "abstopk"):
        fields.setdefault("k", args.k)
    cfg = sae_config(args.arch, **fields)
    tcfg = TrainConfig(tokens=args.tokens, batch=args.batch, lr=args.lr, lr_warmup_tokens=args.lr_warmup_tokens,
                       lr_schedule=args.lr_schedule, dead_tokens=args.dead_tokens,
                       checkpoint_tokens=args.checkpoint_tokens, seed=args.seed)
    check_writable(args.out, directory=True)
    s = train(build_sae(cfg), cache, tcfg, args.out, resume=args.resume, progress=not args.quiet)
    f = s["final"]
    print(f"{cfg.architecture} {hook}{' -> ' + args.hook_out if args.hook_out else ''}: d_sae {cfg.d_sae}, "
          f"{s['tokens']:,} tokens in {s['seconds']:.0f} s ({s['tokens_per_second']:,.0f} tok/s, {s['threads']} threads); "
          f"training batches of the last log interval: FVU {f['fvu']:.4f}, L0 {f['l0']:.1f}; dead {s['dead_fraction']:.3f} "
          f"-> {args.out}")


def _dictionary_on_model(sae_dir, model_spec, hook: str | None = None):
    """(dictionary, model, hook): the dictionary's input hook (or ``hook``) checked to exist on the model with the
    dictionary's width, and the model checked to be the one it was trained on (one-line SparsenErrors)."""
    from sparsen.models import load_model
    from sparsen.models.hookpoints import hook_point
    from sparsen.sae.formats import load_sae

    sae = load_sae(sae_dir)
    lm = load_model(model_spec)
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise SparsenError(f"'{sae_dir}' does not say which hook it reads: pass --hook blocks.N.KIND")
    if hook != sae.cfg.hook_name:
        import dataclasses
        sae.cfg = dataclasses.replace(sae.cfg, hook_name=hook)
    width = hook_point(lm.adapter, hook).d
    if width != sae.cfg.d_in:
        raise SparsenError(f"the dictionary reads {sae.cfg.d_in}-wide activations but {hook} is {width} wide: pass the "
                           "hook it was trained on")
    if sae.cfg.model_fingerprint and sae.cfg.model_fingerprint != lm.fingerprint:
        raise SparsenError(f"the dictionary was trained on model '{sae.cfg.model}', not this one: pass --model "
                           f"{sae.cfg.model or 'SPEC'}")
    return sae, lm, hook


def _eval(args) -> None:
    from sparsen.data import corpus_windows
    from sparsen.io import write_json
    from sparsen.sae.metrics import mean_activation, reconstruction_metrics, spliced_metrics

    sae, lm, hook = _dictionary_on_model(args.sae, args.model, args.hook)
    per = args.ctx - args.skip_first
    n_rec = -(-args.tokens // per)
    wins = corpus_windows(lm.tokenizer, args.text, args.ctx, n_rec + args.ce_windows, bos=lm.window_bos)
    rec_w, ce_w = wins[:n_rec], wins[n_rec:]
    rec = reconstruction_metrics(lm, sae, rec_w, skip_first=args.skip_first, progress=not args.quiet)
    out = {"sae": str(args.sae), "model": lm.spec, "hook": hook, "hook_out": sae.cfg.hook_name_out or None,
           "architecture": sae.cfg.architecture, "d_sae": sae.cfg.d_sae, "corpus": args.text, "ctx": args.ctx,
           "reconstruction": {k: v for k, v in rec.items() if k != "latent_frequency"}}
    if args.ce_windows > 0:
        target = sae.cfg.hook_name_out or hook
        mean = mean_activation(lm, target, rec_w, skip_first=args.skip_first)
        out["spliced"] = spliced_metrics(lm, sae, ce_w, mean, skip_first=args.skip_first, progress=not args.quiet)
    if args.out:
        write_json(args.out, {**out, "latent_frequency": rec["latent_frequency"]})
    r = out["reconstruction"]
    print(f"{out['architecture']} on {hook}: FVU {r['fvu']:.4f} (over {r['tokens']:,} tokens), L0 {r['l0']:.1f}, "
          f"dead {r['dead_fraction']:.3f}, dense(>{r['dense_threshold']:.0%}) {r['dense_fraction']:.3f}, "
          f"l2_ratio {r['l2_ratio']:.3f}, rel. bias {r['relative_reconstruction_bias']:.3f}")
    if "spliced" in out:
        s = out["spliced"]
        print(f"CE clean {s['ce_clean']:.4f}, spliced {s['ce_sae']:.4f}, zero-abl {s['ce_zero_ablation']:.4f}, "
              f"mean-abl {s['ce_mean_ablation']:.4f}; ce_loss_score zero {s['ce_loss_score_zero']:.4f}, "
              f"mean {s['ce_loss_score_mean']:.4f}; KL {s['kl_sae']:.4f} (kl_div_score zero "
              f"{s['kl_div_score_zero']:.4f})")


def _dashboard(args) -> None:
    from sparsen.data import corpus_windows
    from sparsen.io import check_writable
    from sparsen.sae.dashboard import latent_stats, render_dashboard

    if args.max_pages is not None and args.max_pages < 0:
        raise SparsenError(f"--max-pages {args.max_pages}: give 0 or more")
    if not 0 <= args.skip_first < args.ctx:
        raise SparsenError(f"--skip-first {args.skip_first} leaves no position of a {args.ctx}-token window")
    check_writable(args.out, directory=True)
    sae, lm, _ = _dictionary_on_model(args.sae, args.model)
    n = -(-args.tokens // (args.ctx - args.skip_first))
    wins = corpus_windows(lm.tokenizer, args.text, args.ctx, n, bos=lm.window_bos)
    stats = latent_stats(lm, sae, wins, top_contexts=args.top_contexts, skip_first=args.skip_first,
                         progress=not args.quiet)
    d = render_dashboard(lm, sae, wins, stats, args.out, max_pages=args.max_pages, progress=not args.quiet)
    print(f"{sae.cfg.architecture} on {sae.cfg.hook_name}: {d.latents:,} latents, {d.live:,} live over {stats.tokens:,} "
          f"positions, {d.pages:,} pages written -> {d.index}")


def _convert(args) -> None:
    from sparsen.sae.formats import load_sae, save_saelens, save_sparsify

    sae = load_sae(args.sae)
    (save_saelens if args.to == "saelens" else save_sparsify)(sae, Path(args.out))
    print(f"{args.sae} -> {args.out} ({args.to})")
