"""The `sparsen` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sparsen.errors import SparsenError

MODEL_HELP = ("model SPEC: 'smollm2' (bundled SmolLM2-135M-Instruct, default), 'tiny-llama' / 'tiny-qwen2' "
              "(seeded random test models), a Hugging Face model directory, or a .gguf file")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _add_model(p):
    p.add_argument("--model", default="smollm2", metavar="SPEC", help=MODEL_HELP)


def _add_common(p, corpus_default: str, corpus_role: str):
    _add_model(p)
    p.add_argument("--text", default=corpus_default, metavar="FILE",
                   help=f"{corpus_role} corpus: a UTF-8 text file, or a bundled name "
                        f"(wikitext2-test, wikitext2-valid; default {corpus_default})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from sparsen import __version__

    parser = argparse.ArgumentParser(
        prog="sparsen",
        description="Measure, induce and exploit activation sparsity in transformer LMs on a CPU.",
    )
    parser.add_argument("--version", action="version", version=f"sparsen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("profile", help="measure where a model is sparse (lazy neurons), per layer",
                       description="Per layer: for each linear's input and the MLP intermediate, the share of entries "
                                   "below magnitude thresholds, the share needed to keep 90/95/99%% of the L2 mass, "
                                   "quantiles and kurtosis; per attention head, the share of causal keys covering "
                                   "90/95%% of the attention mass. Writes profile.json and PNG plots.")
    _add_common(p, "wikitext2-valid", "calibration")
    p.add_argument("--tokens", type=_positive_int, default=8192, help="calibration tokens to profile (default 8192)")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--no-attention", action="store_true", help="skip attention statistics (faster)")
    p.add_argument("--sensitivity-windows", type=int, default=2, metavar="N",
                   help="windows for the per-group sensitivity test (KL to dense with one input group 50/70%% "
                        "sparse); 0 skips it (default 2)")
    p.add_argument("--out", default="profile", metavar="DIR", help="output directory (default ./profile)")

    p = sub.add_parser("eval", help="perplexity (and KL / top-1 agreement to dense) on the evaluation corpus",
                       description="Perplexity over non-overlapping windows [i*ctx, (i+1)*ctx) of the corpus tokenized "
                                   "once, no special tokens. Protocol 'full' scores every position; 'decode' computes "
                                   "the first half of each window dense and scores the second half with the model "
                                   "under test (= dense prompt, sparse generation). With --plan, also KL(dense||sparse) "
                                   "and top-1 agreement with the dense model.")
    _add_common(p, "wikitext2-test", "evaluation")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--windows", type=_positive_int, default=None, help="number of windows (default: all)")
    p.add_argument("--protocol", choices=("full", "decode"), default="full", help="scoring protocol (default full)")
    p.add_argument("--plan", default=None, metavar="PLAN.json", help="sparsity plan from `sparsen calibrate`")
    p.add_argument("--out", default="eval.json", metavar="FILE", help="output JSON (default ./eval.json)")

    p = sub.add_parser("calibrate", help="calibrate a sparsity method and write a plan file",
                       description="Calibrate a training-free activation-sparsity method on calibration text and write "
                                   "a plan (per-linear thresholds or top-k shares, the method, target and "
                                   "calibration-measured sparsity, the model's fingerprint). Apply it with "
                                   "`sparsen eval --plan`.")
    _add_common(p, "wikitext2-valid", "calibration")
    p.add_argument("--method", required=True,
                   help="teal (TEAL magnitude thresholds), rotate (ours: thresholds in a folded eigenbasis of the residual "
                        "stream), rotate-topk (ours: exact per-token top-k in that basis), topk (exact per-token top-k), "
                        "stat-topk (Gaussian per-token threshold)")
    p.add_argument("--sparsity", type=float, required=True,
                   help="target model-wide sparsity in [0, 1): the share of block-linear weight bytes skipped")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "sensitivity"),
                   help="how sparsity is spread over linears: uniform, or sensitivity (per input group, greedy on "
                        "measured KL per skipped weight byte; teal and rotate only). Default uniform")
    p.add_argument("--tokens", type=_positive_int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="calibration window length (default 1024)")
    p.add_argument("--out", default="plan.json", metavar="FILE", help="plan file to write (default ./plan.json)")

    p = sub.add_parser("demo", help="the `make demo` job: profile + dense eval of the bundled model, with a report",
                       description="Profile and evaluate a model with bounded sizes; print a summary and write a "
                                   "report folder (JSON, PNG plots, index.html).")
    _add_model(p)
    p.add_argument("--tokens", type=_positive_int, default=4096, help="profile tokens (default 4096)")
    p.add_argument("--windows", type=_positive_int, default=10, help="eval windows (default 10)")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="window length (default 1024)")
    p.add_argument("--out", default="report", metavar="DIR", help="report directory (default ./report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def cmd_profile(args) -> None:
    from sparsen import load_model
    from sparsen.io import write_json
    from sparsen.measure.plots import plot_profile
    from sparsen.measure.profile import format_table, run_profile

    lm = load_model(args.model)
    prof = run_profile(lm, corpus=args.text, tokens=args.tokens, ctx=args.ctx, attention=not args.no_attention,
                       sensitivity_windows=args.sensitivity_windows, progress=not args.quiet)
    out = Path(args.out)
    write_json(out / "profile.json", prof)
    pngs = plot_profile(prof, out)
    print(format_table(prof))
    print(f"wrote {out / 'profile.json'} and {', '.join(str(p) for p in pngs)}")


def _load_plan_sparsifier(lm, plan_path):
    if plan_path is None:
        return None
    from sparsen.methods import Plan

    return Plan.load(plan_path).sparsifier(lm)


def cmd_calibrate(args) -> None:
    from sparsen import load_model
    from sparsen.methods import CalibrationConfig, calibrate, check_sparsity, get_method

    check_sparsity(args.sparsity)
    get_method(args.method)  # fail on a bad name before loading the model
    lm = load_model(args.model)
    t0 = time.perf_counter()
    plan = calibrate(lm, args.method, args.sparsity,
                     CalibrationConfig(corpus=args.text, tokens=args.tokens, ctx=args.ctx, allocation=args.allocation),
                     progress=not args.quiet)
    plan.save(args.out)
    got = "n/a (measured at eval)" if plan.calibrated_sparsity is None else f"{plan.calibrated_sparsity:.3f}"
    print(f"{args.method} plan for {lm.spec}: target sparsity {args.sparsity:.3f}, on calibration tokens {got} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"wrote {args.out}")


def format_eval(res) -> str:
    line = (f"{res.model} on {res.corpus}: ctx {res.ctx}, {res.windows} windows, protocol {res.protocol}, "
            f"{res.tokens_scored} tokens scored: ppl {res.ppl:.3f} (nll {res.nll:.4f})")
    if res.kl is not None:
        line += (f"\n  dense ppl {res.dense_ppl:.3f}, KL(dense||sparse) {res.kl:.4f} nats/token, top-1 agreement "
                 f"{res.top1_agree:.3f}, achieved sparsity {res.sparsity['overall']:.3f}")
    return line


def cmd_eval(args) -> None:
    from sparsen import load_model
    from sparsen.evaluation import evaluate
    from sparsen.io import write_json

    lm = load_model(args.model)
    sparsifier = _load_plan_sparsifier(lm, args.plan)
    res = evaluate(lm, corpus=args.text, ctx=args.ctx, n_windows=args.windows, protocol=args.protocol,
                   sparsifier=sparsifier, progress=not args.quiet, plan_name=args.plan)
    write_json(args.out, res.to_dict())
    print(format_eval(res))
    print(f"wrote {args.out}")


def cmd_demo(args) -> None:
    from sparsen import load_model
    from sparsen.evaluation import evaluate
    from sparsen.io import write_json
    from sparsen.measure.plots import plot_profile
    from sparsen.measure.profile import format_table, run_profile
    from sparsen.report import write_report

    t0 = time.perf_counter()
    out = Path(args.out)
    lm = load_model(args.model)
    print(f"loaded {lm.spec} ({lm.config.model_type}, {lm.adapter.n_layers} layers) in {time.perf_counter() - t0:.1f} s")
    prof = run_profile(lm, tokens=args.tokens, ctx=min(args.ctx, args.tokens), progress=not args.quiet)
    write_json(out / "profile.json", prof)
    pngs = [p.name for p in plot_profile(prof, out)]
    prof_table = format_table(prof)
    print(prof_table)
    sections = [("Activation profile (sparsen profile)", prof_table, pngs)]
    evals = []
    for protocol in ("full", "decode"):
        res = evaluate(lm, ctx=args.ctx, n_windows=args.windows, protocol=protocol, progress=not args.quiet)
        write_json(out / f"eval_{protocol}.json", res.to_dict())
        evals.append(format_eval(res))
        print(evals[-1])
    sections.append(("Dense quality (sparsen eval)", "\n".join(evals), []))
    page = write_report(out, sections)
    print(f"report: {page} ({time.perf_counter() - t0:.0f} s)")


COMMANDS = {"profile": cmd_profile, "eval": cmd_eval, "calibrate": cmd_calibrate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"
    try:
        COMMANDS[args.command](args)
    except SparsenError as e:
        print(f"sparsen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
