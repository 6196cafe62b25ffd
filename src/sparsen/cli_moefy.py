"""`sparsen moefy`: a MoEfied model's perplexity and engine decode speed against k, beside neuron-level MLP sparsity
(TEAL on the MLP, CATS) at the same MLP bytes skipped. Registered by cli.py; imports torch only when run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sparsen.errors import SparsenError


def _ks(text: str) -> tuple[int, ...]:
    import argparse

    try:
        ks = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers, e.g. 4,8,16") from None
    if not ks:
        raise argparse.ArgumentTypeError("give at least one k")
    return ks


SMALL = {"ks": (8, 12, 16), "contiguous_ks": (8,), "windows": 8, "tokens": 4096, "rounds": 2, "new_tokens": 64}
FULL = {"ks": (4, 6, 8, 10, 12, 14, 16), "contiguous_ks": (8, 12), "windows": 40, "tokens": 16384, "rounds": 5,
        "new_tokens": 128}


def add_parsers(sub, add_model, positive_int) -> None:
    p = sub.add_parser("moefy", help="MoEfication: perplexity and engine tokens/s against experts per token",
                       description="Split each MLP into --experts experts by co-activation, train a router per layer "
                                   "(one calibration), then evaluate perplexity / KL for every k in --ks (decode "
                                   "protocol), with the oracle router, the unclustered split and TEAL / CATS on the "
                                   "MLP at the same MLP bytes skipped; time the engine on each. Writes moefy.json, "
                                   "moefy.md, moefy.png and every plan (plans/) to --out.")
    add_model(p)
    p.add_argument("--experts", type=positive_int, default=16, help="experts per MLP (default 16)")
    p.add_argument("--full", action="store_true",
                   help="the BENCHMARKS.md run (k = 4,6,...,16, unclustered at 8,12, 40 windows, 16,384 calibration "
                        "tokens, 5 timing rounds of 128 tokens; about an hour on 2 cores); without it a small run of "
                        "minutes (k = 8,12,16, unclustered at 8, 8 windows, 4,096 tokens, 2 rounds of 64 tokens)")
    p.add_argument("--ks", type=_ks, default=None, help="experts per token (default: see --full)")
    p.add_argument("--contiguous-ks", type=_ks, default=None,
                   help="k of the unclustered baseline (channels in index order; default: see --full)")
    p.add_argument("--windows", type=positive_int, default=None, help="WikiText-2 test windows (default: see --full)")
    p.add_argument("--tokens", type=positive_int, default=None, help="calibration tokens (default: see --full)")
    p.add_argument("--no-bench", action="store_true", help="quality only: no engine timing")
    p.add_argument("--rounds", type=positive_int, default=None, help="interleaved timing rounds (default: see --full)")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="decoded tokens per timing (default: see --full)")
    p.add_argument("--threads", type=positive_int, default=2, help="engine threads (default 2)")
    p.add_argument("--out", default="moefy", metavar="DIR", help="output folder (default ./moefy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def bench(lm, rows: list[dict], rounds: int, new_tokens: int, threads: int, progress: bool = True) -> dict:
    """Engine decode tokens/s of dense and every routed / neuron-level configuration (interleaved rounds, medians),
    with the bytes bound of what each configuration skipped. The speedup is the median over rounds of each round's
    ratio to that round's dense run (the machine's speed drifts between rounds more than between neighbours)."""
    import statistics

    from sparsen.data import corpus_windows
    from sparsen.engine import Engine, bytes_per_token
    from sparsen.engine.commands import _engine_run

    ids = corpus_windows(lm.tokenizer, "wikitext2-test", 256, 1, bos=lm.window_bos)[0].tolist()
    max_seq = len(ids) + new_tokens + 2
    engines = {"dense": Engine(lm, None, threads=threads, max_seq=max_seq)}
    for r in rows:
        if r["family"] != "moefy-oracle":
            engines[r["name"]] = Engine(lm, r["plan"], threads=threads, max_seq=max_seq)
    runs = {name: [] for name in engines}
    for i in range(rounds):
        for name, e in engines.items():
            e.reset()
            runs[name].append(_engine_run(e, ids, new_tokens))
        if progress:
            print(f"round {i + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in runs.items()), file=sys.stderr)
    context = len(ids) + new_tokens / 2
    dense_bytes = bytes_per_token(engines["dense"], 0.0, context)
    out = {}
    for name, e in engines.items():
        achieved = e.achieved()["overall"] if name != "dense" else 0.0
        tok_s = statistics.median(runs[name])
        out[name] = {"tok_s": tok_s, "raw": runs[name], "achieved": achieved,
                     "speedup": statistics.median(v / d for v, d in zip(runs[name], runs["dense"])),
                     "bound_speedup": dense_bytes / bytes_per_token(engines["dense"], achieved, context)}
    return {"prompt_tokens": len(ids), "new_tokens": new_tokens, "rounds": rounds, "threads": threads,
            "weights_dtype": "fp32", "engines": out}


def _markdown(res: dict) -> str:
    q, b = res["quality"], (res.get("bench") or {}).get("engines", {})
    lines = [f"# MoEfied {res['model']}: {res['experts']} experts per MLP",
             "", f"WikiText-2 test, {q['windows']} windows of {q['ctx']}, decode protocol; dense ppl "
                 f"{q['dense']['ppl']:.3f}. MLP skipped: the share of gate/up/down bytes a kernel skips.", "",
             "| configuration | k | MLP skipped | model-wide | ppl | KL | top-1 | engine tok/s | speedup | bytes bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if "dense" in b:
        lines.append(f"| dense | | 0 | 0 | {q['dense']['ppl']:.3f} | 0 | 1 | {b['dense']['tok_s']:.1f} | 1.00x | 1.00x |")
    for r in q["rows"]:
        e = b.get(r["name"])
        speed = (f"{e['tok_s']:.1f} | {e['speedup']:.2f}x | {e['bound_speedup']:.2f}x" if e else "n/a | | ")
        lines.append(f"| {r['name']} | {r['k']} | {r['mlp_skipped']:.3f} | {r['achieved']:.3f} | {r['ppl']:.3f} | "
                     f"{r['kl']:.4f} | {r['top1_agree']:.3f} | {speed} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: Path) -> None:
    from sparsen.io import pyplot

    plt = pyplot()
    q, b = res["quality"], (res.get("bench") or {}).get("engines", {})
    fig, axes = plt.subplots(1, 2 if b else 1, figsize=(11 if b else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    families = list(dict.fromkeys(r["family"] for r in q["rows"]))
    color = {fam: f"C{i}" for i, fam in enumerate(families)}  # the same family, the same colour in both panels
    for fam in families:
        rs = sorted((r for r in q["rows"] if r["family"] == fam), key=lambda r: r["mlp_skipped"])
        ax.plot([r["mlp_skipped"] for r in rs], [r["ppl"] for r in rs], "o-", color=color[fam], label=fam)
    ax.axhline(q["dense"]["ppl"], color="k", lw=0.8, ls="--", label="dense")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_xlabel("share of MLP bytes skipped")
    ax.set_ylabel(f"perplexity (WikiText-2 test, {q['windows']} windows, decode)")
    ax.legend(fontsize=8)
    if b:
        ax = axes[0][1]
        for fam in families:
            rs = sorted((r for r in q["rows"] if r["family"] == fam and r["name"] in b), key=lambda r: r["mlp_skipped"])
            if rs:
                ax.plot([r["mlp_skipped"] for r in rs], [b[r["name"]]["speedup"] for r in rs], "o-", color=color[fam],
                        label=fam)
        rs = sorted((r for r in q["rows"] if r["family"] == "moefy" and r["name"] in b), key=lambda r: r["mlp_skipped"])
        ax.plot([r["mlp_skipped"] for r in rs], [b[r["name"]]["bound_speedup"] for r in rs], "k:", label="bytes bound (moefy)")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("share of MLP bytes skipped")
        ax.set_ylabel("engine decode speed / dense")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_moefy(args) -> None:
    from sparsen.evaluation.moefy import moefy_plans, moefy_quality
    from sparsen.io import write_json
    from sparsen.models import load_model

    for key, value in (FULL if args.full else SMALL).items():  # what the command line left unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(k > args.experts for k in args.ks + args.contiguous_ks):
        raise SparsenError(f"--ks and --contiguous-ks take experts per token from 1 to {args.experts} (--experts)")
    out = Path(args.out)
    progress = not args.quiet
    t0 = time.perf_counter()
    lm = load_model(args.model)
    rows = moefy_plans(lm, args.ks, args.experts, calib={"tokens": args.tokens}, contiguous_ks=args.contiguous_ks,
                       progress=progress)
    t_cal = time.perf_counter() - t0
    quality = moefy_quality(lm, rows, windows=args.windows, progress=progress)
    t_eval = time.perf_counter() - t0 - t_cal
    res = {"model": lm.spec, "experts": args.experts, "ks": list(args.ks), "quality": quality,
           "layers": next(r["plan"].params["layers"] for r in rows if r["family"] == "moefy"),
           "seconds": {"calibrate": t_cal, "evaluate": t_eval}}
    if not args.no_bench:
        res["bench"] = bench(lm, rows, args.rounds, args.new_tokens, args.threads, progress)
        res["seconds"]["bench"] = time.perf_counter() - t0 - t_cal - t_eval
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:  # every plan, for `sparsen eval` / `sparsen bench --plan` (the oracle's too: eval only)
        r["plan"].save(out / "plans" / (r["name"].replace(" ", "_").replace("=", "") + ".json"))
    write_json(out / "moefy.json", res)
    md = _markdown(res)
    (out / "moefy.md").write_text(md)
    _plot(res, out / "moefy.png")
    print(md)
    print(f"wrote {out}/moefy.json, moefy.md, moefy.png ({time.perf_counter() - t0:.0f} s)")
