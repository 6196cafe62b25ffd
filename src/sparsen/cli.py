"""The `sparsen` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from sparsen.cli_circuits import add_parsers as add_circuits_parsers
from sparsen.cli_circuits import cmd_circuits
from sparsen.cli_moefy import add_parsers as add_moefy_parsers
from sparsen.cli_moefy import cmd_moefy
from sparsen.cli_sae import add_parsers as add_sae_parsers
from sparsen.cli_sae import cmd_cache, cmd_sae
from sparsen.cli_train import add_parsers as add_train_parsers
from sparsen.cli_train import cmd_experiment, cmd_train
from sparsen.errors import SparsenError

MODEL_HELP = ("model SPEC: 'smollm2' (bundled SmolLM2-135M-Instruct, default), 'gemma3' (bundled Gemma 3 270M), "
              "'tiny-llama' / 'tiny-qwen2' (seeded random test models), a Hugging Face model directory, or a .gguf file")
# calibrate's --allocation choices; the CLI does not import torch to list them (a test keeps them equal to
# sparsen.methods.ALLOCATIONS)
ALLOCATION_CHOICES = ("uniform", "greedy", "sensitivity", "global", "search")


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


CALIB_CORPUS_NAMES = "wikitext2-valid, mixed-calib"  # sparsen.data's bundled calibration texts (not imported: torch)


def _add_common(p, corpus_default: str, corpus_role: str):
    _add_model(p)
    p.add_argument("--text", default=corpus_default, metavar="FILE",
                   help=f"{corpus_role} corpus: a UTF-8 text file, or a bundled name "
                        f"({CALIB_CORPUS_NAMES}; default {corpus_default})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_texts(p):
    p.add_argument("--text", action="append", default=None, metavar="FILE",
                   help="evaluation corpus, repeatable: a UTF-8 text file or a bundled name (wikitext2-test, "
                        "python-docs, python-code, licences; 'domains' = all four; default wikitext2-test)")


def _eval_texts(args) -> list[str]:
    """The evaluation corpora asked for, each checked readable before any work."""
    from sparsen.data import eval_corpora, read_corpus

    corpora = eval_corpora(args.text or ["wikitext2-test"])
    for c in corpora:
        read_corpus(c)
    return corpora


BEST_METHOD, BEST_ALLOCATION = "rotate-wina", "global"  # our best method (BENCHMARKS.md), what the demo calibrates
FRONTIER_METHODS = ("teal", "teal:greedy", "cats", "chess", "wina", "stat-topk", "topk", f"{BEST_METHOD}:{BEST_ALLOCATION}")


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparsenError(f"--{what} '{text}' is not a comma-separated list of numbers, e.g. 0.25,0.5") from None


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
    _add_model(p)
    _add_eval_texts(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
                   help="teal (TEAL magnitude thresholds), cats (|act(gate)| threshold), chess (per-channel MLP and q/o "
                        "thresholds), wina (|x_i|*||W[:,i]|| thresholds), stat-topk (Gaussian per-token threshold), topk "
                        "(exact per-token top-k), rotate (ours: thresholds in a folded eigenbasis of the residual stream), "
                        "rotate-wina (ours: per-segment sparse-fitted bases, value-head bases, weight-aware thresholds; "
                        "best with --allocation global), rotate-topk")
    p.add_argument("--sparsity", type=float, required=True,
                   help="target model-wide sparsity in [0, 1): the share of block-linear weight bytes skipped")
    p.add_argument("--allocation", default="uniform", choices=ALLOCATION_CHOICES,
                   help="how sparsity is spread over linears: uniform; greedy (TEAL's block-wise greedy: inside each "
                        "block, raise the linear whose step adds the least block-output error per parameter share); "
                        "sensitivity (per input group, greedy on measured KL per skipped weight byte); or global (ours: "
                        "TEAL's greedy inside each block, each block's level set by the KL it causes alone); or search (ours: "
                        "global's block levels refined by local search on the whole model's KL). All but "
                        "uniform: teal, wina and the rotation methods. Default uniform")
    p.add_argument("--segments", type=_positive_int, default=None,
                   help="rotation methods: give each of N runs of consecutive layers its own basis of the residual "
                        "stream; each change of basis costs a d x d product per token, charged against the sparsity "
                        "(default: rotate 1, i.e. one free basis; rotate-wina 4)")
    p.add_argument("--basis", choices=("pca", "sparse"), default=None,
                   help="rotation methods: pca (eigenbasis of the second moment) or sparse (refined so per-token "
                        "thresholding drops the least energy); default: rotate pca, rotate-wina sparse")
    p.add_argument("--hold", choices=("calibrated", "prompt"), default=None,
                   help="run-time thresholds: calibrated (as calibrated; the default) or prompt (rescaled per prompt so "
                        "the sparsity holds on text unlike the calibration text)")
    p.add_argument("--tune-steps", type=int, default=None, metavar="N",
                   help="after calibrating, tune the weights to the sparse model for N steps, one calibration window "
                        "each: the RMSNorm gains and a rank-16 term beside every block linear, trained on the KL from "
                        "the dense model and folded into the weights (free per token; stored in the plan; a step is a "
                        "forward and backward pass over one window, so N steps take minutes). Default 0 (none)")
    p.add_argument("--tokens", type=_positive_int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="calibration window length (default 1024)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other field of the method's config (sparsen.<Method>Config; `python -c \"import sparsen; "
                        "help(sparsen.RotateWinaConfig)\"` lists them), e.g. --set rank_share=0.03 --set "
                        "greedy_step=0.025; repeatable; VALUE is parsed as JSON (numbers, true/false, null), else a string")
    p.add_argument("--out", default="plan.json", metavar="FILE", help="plan file to write (default ./plan.json)")

    p = sub.add_parser("frontier", help="quality vs achieved sparsity: a grid of methods x sparsities, both protocols",
                       description="Calibrate every method at every target sparsity, evaluate all of them on the same "
                                   "windows (window-major: one dense reference per window), and write frontier.json, "
                                   "frontier.md (a markdown table) and frontier.png (perplexity and KL against the "
                                   "sparsity achieved on the evaluated tokens, one line per method).")
    _add_model(p)
    p.add_argument("--methods", default=",".join(FRONTIER_METHODS), metavar="LIST",
                   help="comma-separated methods, each optionally with an allocation and, for rotation methods, a "
                        "number of residual bases, and other config fields: NAME[:ALLOCATION[:SEGMENTS]][+FIELD=VALUE...], e.g. "
                        "rotate:uniform:6 or rotate-wina:global+basis=pca "
                        f"(default {','.join(FRONTIER_METHODS)})")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.6,0.7", metavar="LIST",
                   help="comma-separated target model-wide sparsities in [0, 1) (default 0.25,0.4,0.5,0.6,0.7)")
    p.add_argument("--protocols", default="full,decode", metavar="LIST", help="full, decode or both (default both)")
    p.add_argument("--windows", type=_positive_int, default=4, help="evaluation windows (default 4)")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="window length (default 1024)")
    _add_eval_texts(p)
    p.add_argument("--calib-text", default="wikitext2-valid", metavar="FILE",
                   help=f"calibration corpus: a UTF-8 text file or a bundled name ({CALIB_CORPUS_NAMES}; "
                        "default wikitext2-valid; mixed-calib is WikiText, Python docs and code)")
    p.add_argument("--tokens", type=_positive_int, default=16384,
                   help="calibration tokens per plan (default 16384, as `sparsen calibrate`)")
    p.add_argument("--out", default="frontier", metavar="DIR", help="output directory (default ./frontier)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("attn-eval", help="sparse attention on the long-context task suite, dense beside it",
                       description="Answer every sample of the long-context task suite (generated locally, seeded: "
                                   "passkey, niah, vt, cwe, story) or of your own JSONL file, dense and with each "
                                   "attention method; the context is prefilled dense once per sample, then the trailing "
                                   "question and the answer are decoded through the sparse path; a block-sparse prefill "
                                   "method (block-topk, xattention, vertical-slash, flexprefill) prefills the whole prompt "
                                   "with its pattern and the answer is decoded dense. Writes attn_eval.json and "
                                   "attn_eval.md (accuracy with 95%% intervals, density achieved).")
    _add_model(p)
    p.add_argument("--methods", default="oracle-topk@1/8,quest@1/8", metavar="LIST",
                   help="comma-separated attention methods NAME[@BUDGET][+FIELD=VALUE...]: BUDGET a density (1/8, "
                        "0.125), a key count (256t), a mass (p0.9, oracle-topp) or a prefill threshold (tau0.9, "
                        "xattention; gamma0.9, flexprefill); e.g. quest@1/16+dense_layers=2, block-topk@1/8, "
                        "xattention+tau=0.9 (decode methods: oracle-topk, oracle-topp, sink-window, h2o, quest, "
                        "double-sparsity; prefill methods: block-topk, xattention, vertical-slash, flexprefill)")
    p.add_argument("--tasks", default=None, metavar="FILE",
                   help="a JSONL task file (one object per line: id, task, prompt, answers, metric; optional "
                        "answer_prefix, max_new_tokens, query_start, meta) instead of the generated suite")
    p.add_argument("--task-names", default="passkey,niah,vt,cwe,story", metavar="LIST",
                   help="generated tasks (default all five)")
    p.add_argument("--lengths", default="1024", metavar="LIST", help="generated prompt lengths in tokens (default 1024)")
    p.add_argument("--samples", type=_positive_int, default=50, help="generated samples per task and length (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated suite (default 0)")
    p.add_argument("--sparse-from", choices=("question", "answer"), default="question",
                   help="what is decoded sparse: the trailing question and the answer (default), or the answer only")
    p.add_argument("--out", default="attn-eval", metavar="DIR", help="output directory (default ./attn-eval)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished samples of DIR/samples.jsonl (an interrupted run, or the same suite with "
                        "fewer methods) and run only what they lack; without it the file starts empty")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("attn-frontier", help="sparse attention: methods x densities x lengths, tasks and perplexity",
                       description="Every attention method at every density of the grid: accuracy on the task suite "
                                   "per task and length (dense prefix shared per sample, question and answer sparse) "
                                   "and decode-protocol perplexity / KL to dense on WikiText-2 test windows of each "
                                   "--ppl-lengths. Writes attn_frontier.json, attn_frontier.md and PNG plots.")
    _add_model(p)
    p.add_argument("--methods", default="oracle-topk,sink-window,h2o,quest,double-sparsity", metavar="LIST",
                   help="comma-separated methods NAME[+FIELD=VALUE...], each run at every density; one given with "
                        "its own budget (oracle-topp@p0.9, quest@256t) runs once as given")
    p.add_argument("--densities", default="1/32,1/16,1/8,1/4,1/2", metavar="LIST",
                   help="densities of the grid: fractions (1/8) or shares (0.125) of the causal keys")
    p.add_argument("--lengths", default="4096,8192", metavar="LIST",
                   help="task-suite prompt lengths in tokens ('' for none)")
    p.add_argument("--samples", type=int, default=50, help="samples per task and length (0: no tasks; default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated suite (default 0)")
    p.add_argument("--task-names", default="passkey,niah,vt,cwe,story", metavar="LIST", help="generated tasks")
    p.add_argument("--tasks", default=None, metavar="FILE", help="a JSONL task file instead of the generated suite")
    p.add_argument("--ppl-lengths", default="4096,8192", metavar="LIST",
                   help="window lengths of the perplexity runs ('' for none; default 4096,8192)")
    p.add_argument("--ppl-windows", type=_positive_int, default=4, help="WikiText-2 test windows per length (default 4)")
    p.add_argument("--out", default="attn-frontier", metavar="DIR", help="output directory (default ./attn-frontier)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished task samples of DIR/samples.jsonl and run only what they lack")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("generate", help="stream text from the CPU decode engine (dense, or sparse with --plan)",
                       description="Generate text with sparsen's batch-1 CPU engine: the prompt is prefilled dense, every "
                                   "new token runs the plan's sparse kernels. Text streams to stdout; speed to stderr.")
    _add_model(p)
    p.add_argument("--plan", default=None, metavar="PLAN.json", help="sparsity plan from `sparsen calibrate` (default: dense)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0 (default 1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)")
    p.add_argument("--weights", "--dtype", default="auto", metavar="KIND",
                   help="engine weights: gguf (the model file's own quantized weights, exactly), bf16, fp32, or auto "
                        "(default: gguf for a GGUF model unless the plan rotates or adds weights, then bf16; else fp32)")
    p.add_argument("--threads", type=_positive_int, default=2, help="threads (default 2)")

    p = sub.add_parser("bench", help="decode tokens/s: engine dense and sparse vs HF generate and llama.cpp",
                       description="Decode speed, batch 1: the engine dense, the engine under --plan, Hugging Face "
                                   "`generate` on the same fp32 weights and llama.cpp (llama-cpp-python) on the same GGUF "
                                   "file, same thread count, interleaved rounds, medians. Each peer runs in a child "
                                   "process: one that crashes or hangs becomes a note, the engine's figures stay. "
                                   "Writes bench.json "
                                   "(with the machine: CPU, the kernels' instruction sets, llama.cpp's build).")
    _add_model(p)
    p.add_argument("--plan", default=None, metavar="PLAN.json", help="sparsity plan for the sparse engine")
    p.add_argument("--vs", default="hf,llamacpp", metavar="LIST",
                   help="other systems to time: comma-separated subset of hf,llamacpp (default both; '' for none)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=64,
                   help="prompt length, the first tokens of WikiText-2 test (default 64)")
    p.add_argument("--context", type=_positive_int, default=None, metavar="N",
                   help="long-context bench: the prompt is the first N tokens of WikiText-2 test, prefilled through the "
                        "torch model into each engine (not timed), then --new-tokens decoded; with --attn, one engine "
                        "per attention method beside the dense one, and the bytes each reads per token")
    p.add_argument("--attn", default=None, metavar="LIST",
                   help="comma-separated attention methods for --context, e.g. 'quest@1/8,sketch@1/8' (on top of "
                        "--plan if given)")
    p.add_argument("--kv-dtype", choices=("fp32", "fp16"), default="fp32", help="engine KV cache dtype (default fp32)")
    p.add_argument("--new-tokens", type=_positive_int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="interleaved rounds; medians reported (default 3)")
    p.add_argument("--weights", "--dtype", default="auto", metavar="LIST",
                   help="engine weights, comma-separated, each benched dense (and under --plan) in the same rounds: "
                        "gguf (the model file's own quantized weights), bf16, fp32, auto (default: gguf for a GGUF "
                        "model unless the plan rotates or adds weights, then bf16; else fp32)")
    p.add_argument("--threads", type=_positive_int, default=2, help="threads for every system (default 2)")
    p.add_argument("--out", default="bench.json", metavar="FILE", help="output JSON (default ./bench.json)")
    p.add_argument("--peer-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="each peer runs in a child process; one that gives no answer (loading, or one decode) within "
                        "this many seconds is stopped and noted, as is one that crashes (default 900)")
    p.add_argument("--profile", action="store_true",
                   help="also time the engine with every block-linear input skipped, to split a token's time into the "
                        "block linears and the rest (lm_head, attention, norms, synchronisation), and each block "
                        "linear's product and the wait after it, dense and sparse")
    p.add_argument("--full-logits", action="store_true",
                   help="greedy steps dot every lm_head row (by default, on a GGUF's int8 lm_head, they bound every "
                        "logit from the codes' top five bits and dot only the rows that can be the largest)")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")

    p = sub.add_parser("demo", help="the `make demo` job: profile, dense eval, 50%% plans (teal, our best), a report",
                       description="Profile a model, evaluate it dense, calibrate uniform TEAL and our best method at "
                                   "the target sparsity and evaluate them under the decode protocol, with bounded sizes; "
                                   "print a summary and write a report folder (JSON, plans, PNG plots, index.html).")
    _add_model(p)
    p.add_argument("--tokens", type=_positive_int, default=4096, help="profile tokens (default 4096)")
    p.add_argument("--windows", type=_positive_int, default=10, help="eval windows (default 10)")
    p.add_argument("--ctx", type=_positive_int, default=1024, help="window length (default 1024)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity of the demo's plans (default 0.5)")
    p.add_argument("--calib-tokens", type=_positive_int, default=8192, help="calibration tokens per plan (default 8192)")
    p.add_argument("--out", default="report", metavar="DIR", help="report directory (default ./report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sae_parsers(sub, _add_model, _positive_int)
    add_circuits_parsers(sub, _add_model, _positive_int)
    add_train_parsers(sub, _add_model, _positive_int)
    add_moefy_parsers(sub, _add_model, _positive_int)
    return parser


def cmd_profile(args) -> None:
    import sparsen
    from sparsen.io import check_writable, write_json

    out = check_writable(args.out, directory=True)
    lm = sparsen.load_model(args.model)
    prof = sparsen.profile(lm, corpus=args.text, tokens=args.tokens, ctx=args.ctx, attention=not args.no_attention,
                           sensitivity_windows=args.sensitivity_windows, progress=not args.quiet)
    write_json(out / "profile.json", prof.to_dict())
    pngs = prof.plot(out)
    print(prof.table())
    print(f"wrote {out / 'profile.json'} and {', '.join(str(p) for p in pngs)}")


def config_from_args(args):
    """The method config `sparsen calibrate` builds from its flags: the same object Python code would pass."""
    from sparsen.methods import config_for
    from sparsen.methods.config import parse_fields

    fields = {"corpus": args.text, "tokens": args.tokens, "ctx": args.ctx, "allocation": args.allocation,
              "segments": args.segments, "basis": args.basis, "hold": args.hold, "tune_steps": args.tune_steps}
    extra = parse_fields(args.set)
    if "sparsity" in extra or "method" in extra:
        raise SparsenError("--set takes the method's other fields: pass --method and --sparsity as flags")
    return config_for(args.method, sparsity=args.sparsity, **{**fields, **extra})


def cmd_calibrate(args) -> None:
    import sparsen
    from sparsen.io import check_writable

    check_writable(args.out)
    config = config_from_args(args)  # a bad method, field or value fails before the model loads
    lm = sparsen.load_model(args.model)
    t0 = time.perf_counter()
    plan = sparsen.calibrate(lm, config, progress=not args.quiet)
    plan.save(args.out)
    got = "n/a (measured at eval)" if plan.calibrated_sparsity is None else f"{plan.calibrated_sparsity:.3f}"
    print(f"{args.method} plan for {lm.spec}: target sparsity {args.sparsity:.3f}, on calibration tokens {got} "
          f"({time.perf_counter() - t0:.0f} s)")
    if (t := plan.params.get("tuning")) is not None:
        line = f"weights tuned for {t['steps']} steps on {t['windows']} window(s)"
        if t["held_out_kl_before"] is not None:
            line += (f": KL to dense on the next window (not tuned on) {t['held_out_kl_before']:.4f} before, "
                     f"{t['held_out_kl_after']:.4f} after")
        print(line)
    print(f"wrote {args.out}")


def format_eval(res) -> str:
    line = (f"{res.model} on {res.corpus}: ctx {res.ctx}, {res.windows} windows, protocol {res.protocol}, "
            f"{res.tokens_scored} tokens scored: ppl {res.ppl:.3f} (nll {res.nll:.4f})")
    if res.kl is not None:
        line += (f"\n  dense ppl {res.dense_ppl:.3f}, KL(dense||sparse) {res.kl:.4f} nats/token, top-1 agreement "
                 f"{res.top1_agree:.3f}, achieved sparsity {res.sparsity['overall']:.3f}")
    return line


def format_eval_corpora(results: list, target: float | None) -> str:
    """The per-corpus table of a cross-domain eval: quality, KL and the achieved sparsity's miss of the target."""
    sparse = results[0].kl is not None
    head = "corpus                 dense ppl      ppl   vs dense      KL   top-1  achieved    miss" if sparse else \
        "corpus                       ppl"
    lines = [head]
    for r in results:
        if not sparse:
            lines.append(f"{r.corpus:<22}{r.ppl:10.3f}")
            continue
        ach = r.sparsity["overall"]
        miss = f"{ach - target:+8.3f}" if target is not None else "     n/a"
        lines.append(f"{r.corpus:<22}{r.dense_ppl:10.2f}{r.ppl:9.2f}{r.ppl / r.dense_ppl - 1:+10.1%}{r.kl:8.3f}"
                     f"{r.top1_agree:8.3f}{ach:10.3f}{miss}")
    return "\n".join(lines)


def cmd_eval(args) -> None:
    import sparsen
    from sparsen.io import check_writable, write_json

    check_writable(args.out)
    corpora = _eval_texts(args)
    plan = sparsen.Plan.load(args.plan) if args.plan else None  # a missing or corrupt plan fails before the model loads
    lm = sparsen.load_model(args.model)
    if plan is not None:
        sparsen.sparsify_(lm, plan)
    results = []
    for corpus in corpora:
        res = sparsen.evaluate(lm, corpus=corpus, ctx=args.ctx, windows=args.windows, protocol=args.protocol,
                               progress=not args.quiet)
        res.plan = args.plan
        results.append(res)
        print(format_eval(res))
    if len(results) == 1:
        write_json(args.out, results[0].to_dict())
    else:
        target = plan.target_sparsity if plan is not None else None
        write_json(args.out, {"corpora": corpora, "plan": args.plan, "target_sparsity": target,
                              "results": {r.corpus: r.to_dict() for r in results}})
        print(format_eval_corpora(results, target))
    print(f"wrote {args.out}")


def cmd_frontier(args) -> None:
    from sparsen import load_model
    from sparsen.core.rules import check_sparsity
    from sparsen.evaluation.frontier import format_corpora_summary, format_markdown, parse_method, plot_frontier, run_frontier
    from sparsen.io import check_writable, write_json, write_text
    from sparsen.methods import config_for

    out = check_writable(args.out, directory=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)
    sparsities = _float_list(args.sparsities, "sparsities")
    for s in sparsities:
        check_sparsity(s)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not protocols or any(p not in ("full", "decode") for p in protocols):
        raise SparsenError(f"--protocols '{args.protocols}': use full, decode or full,decode")
    corpora = _eval_texts(args)
    calib = {"corpus": args.calib_text, "tokens": args.tokens, "ctx": min(args.ctx, args.tokens)}
    config_for("teal", sparsity=0.5, **calib)  # an evaluation corpus as --calib-text fails here, before any work
    lm = load_model(args.model)
    fr = run_frontier(lm, methods, sparsities, protocols, windows=args.windows, ctx=args.ctx, calib=calib,
                      corpus=corpora if len(corpora) > 1 else corpora[0], progress=not args.quiet,
                      model_loader=lambda: load_model(args.model))
    records = fr["by_corpus"] if len(corpora) > 1 else {corpora[0]: fr}
    write_json(out / "frontier.json", fr)
    parts, pngs = [], []
    for c, rec in records.items():
        png = out / ("frontier.png" if len(corpora) == 1 else f"frontier_{_slug(c)}.png")
        plot_frontier(rec, png)
        pngs.append(png)
        parts.append((c, format_markdown(rec)))
    print(f"{lm.spec}: {fr['windows']} windows of {fr['ctx']} per corpus; calibration {fr['calibration']['tokens']} "
          f"tokens of {fr['calibration']['corpus']}; 'increase / teal's' = perplexity increase over dense divided by "
          "uniform teal's at the same achieved sparsity on that corpus; 'KL / teal's' likewise for the KL")
    if len(corpora) == 1:
        md = parts[0][1] + "\n"
        print(parts[0][1])
    else:
        summaries = [f"## All corpora, protocol {p}\n\n{format_corpora_summary(fr, p)}\n" for p in fr["protocols"]]
        md = "\n".join(summaries + [f"## {c}\n\n{t}\n" for c, t in parts])
        print(md)
    write_text(out / "frontier.md", md)
    print(f"wrote {out / 'frontier.json'}, {out / 'frontier.md'}, {', '.join(str(p) for p in pngs)} "
          f"({fr['seconds']['total']:.0f} s)")


def cmd_attn_eval(args) -> None:
    import sparsen.engine.prefill  # noqa: F401  (block-sparse prefill on the C kernel when it is built)
    from sparsen import load_model
    from sparsen.evaluation.attention import markdown_table, paired_table, run_tasks
    from sparsen.evaluation.tasks import generate_suite, load_tasks
    from sparsen.io import check_writable, write_json, write_text
    from sparsen.methods.attention import attention_plan, parse_attention_spec

    out = check_writable(args.out, directory=True)
    configs = [parse_attention_spec(m) for m in args.methods.split(",") if m.strip()]
    labels = [c.label() for c in configs]
    if len(set(labels)) != len(labels):
        raise SparsenError(f"--methods names one configuration twice ({', '.join(labels)}): give each once")
    samples = load_tasks(args.tasks) if args.tasks else None  # a bad task file fails before the model loads
    lengths = [int(x) for x in _float_list(args.lengths, "lengths")]
    lm = load_model(args.model)
    if samples is None:
        names = [t.strip() for t in args.task_names.split(",") if t.strip()]
        samples = generate_suite(lm.tokenizer, lengths=lengths, n=args.samples, seed=args.seed, tasks=names)
    plans = {c.label(): attention_plan(lm, c, progress=not args.quiet) for c in configs}
    res = run_tasks(lm, samples, plans, sparse_from=args.sparse_from, progress=not args.quiet,
                    checkpoint=_checkpoint(out, args.resume))
    res["argv"] = sys.argv[1:]
    md = markdown_table(res) + paired_table(res)
    prefill = [label for label, kind in res["kinds"].items() if kind == "prefill"]
    print(f"{lm.spec}: {len(samples)} samples, sparse from the {args.sparse_from}"
          + (f" (prefill methods {', '.join(prefill)}: the whole prompt sparse, the answer dense)" if prefill else "")
          + "; accuracy % [95% interval]")
    print(md)
    write_json(out / "attn_eval.json", res)
    write_text(out / "attn_eval.md", md)
    print(f"wrote {out / 'attn_eval.json'}, {out / 'attn_eval.md'} ({res['seconds']:.0f} s)")


def _checkpoint(out: Path, resume: bool) -> Path:
    """DIR/samples.jsonl: every finished task sample, appended as it finishes; emptied unless resuming."""
    path = out / "samples.jsonl"
    if not resume:
        path.unlink(missing_ok=True)
    return path


def _int_list(text: str, what: str) -> list[int]:
    values = _float_list(text, what)
    if any(v != int(v) or v < 1 for v in values):
        raise SparsenError(f"--{what} '{text}': give whole numbers of tokens, e.g. 4096,8192")
    return [int(v) for v in values]


def _density_list(text: str) -> list[float]:
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        try:
            num, _, den = part.partition("/")
            v = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise SparsenError(f"--densities '{part}': write fractions (1/8) or shares (0.125)") from None
        if not 0 < v <= 1:
            raise SparsenError(f"--densities '{part}' is outside (0, 1]: give the share of the context read")
        out.append(v)
    if not out:
        raise SparsenError("--densities is empty: give at least one density, e.g. 1/8")
    return out


def cmd_attn_frontier(args) -> None:
    from sparsen import load_model
    from sparsen.evaluation import attn_frontier as af
    from sparsen.evaluation.tasks import load_tasks
    from sparsen.io import check_writable, write_json, write_text
    from sparsen.methods.attention import parse_attention_spec

    out = check_writable(args.out, directory=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs = af.grid_specs(methods, _density_list(args.densities))
    labels = [parse_attention_spec(s).label() for s in specs]  # every spec is checked before the model loads
    if len(set(labels)) != len(labels):
        raise SparsenError(f"the grid names one configuration twice ({', '.join(labels)}): give each method once")
    lengths = _int_list(args.lengths, "lengths")
    ppl_lengths = _int_list(args.ppl_lengths, "ppl-lengths")
    if args.samples < 0:
        raise SparsenError("--samples must be 0 (no task suite) or more")
    samples = load_tasks(args.tasks) if args.tasks else None
    lm = load_model(args.model)
    names = [t.strip() for t in args.task_names.split(",") if t.strip()]
    rec = af.run_attention_frontier(lm, methods, _density_list(args.densities), lengths, args.samples, args.seed, names,
                                 ppl_lengths, args.ppl_windows, progress=not args.quiet, task_samples=samples,
                                 checkpoint=_checkpoint(out, args.resume))
    rec["argv"] = sys.argv[1:]
    md = af.format_markdown(rec)
    print(md)
    write_json(out / "attn_frontier.json", rec)
    write_text(out / "attn_frontier.md", md)
    pngs = af.plot_attention_frontier(rec, out)
    print(f"wrote {out / 'attn_frontier.json'}, {out / 'attn_frontier.md'}, {', '.join(str(p) for p in pngs)} "
          f"({rec['seconds']['total']:.0f} s)")


def _slug(corpus: str) -> str:
    """A file-name part for a corpus name or path."""
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(corpus).stem if "/" in corpus or "." in corpus else corpus)


def cmd_demo(args) -> None:
    import sparsen
    from sparsen.core.rules import check_sparsity
    from sparsen.io import check_writable, write_json
    from sparsen.methods import config_for
    from sparsen.report import write_report

    check_sparsity(args.sparsity)
    out = check_writable(args.out, directory=True)
    t0 = time.perf_counter()
    lm = sparsen.load_model(args.model)
    print(f"loaded {lm.spec} ({lm.config.model_type}, {lm.adapter.n_layers} layers) in {time.perf_counter() - t0:.1f} s")
    prof = sparsen.profile(lm, tokens=args.tokens, ctx=min(args.ctx, args.tokens), progress=not args.quiet)
    write_json(out / "profile.json", prof.to_dict())
    pngs = [p.name for p in prof.plot(out)]
    prof_table = prof.table()
    print(prof_table)
    sections = [("Activation profile (sparsen profile)", prof_table, pngs)]
    res = sparsen.evaluate(lm, ctx=args.ctx, windows=args.windows, protocol="full", progress=not args.quiet)
    write_json(out / "eval_full.json", res.to_dict())
    evals = [format_eval(res)]
    print(evals[-1])

    # Our best method at the target, then uniform TEAL calibrated at the sparsity ours *achieved* on the evaluation
    # text (the rotation lands a few points below its target there), so the two are compared at equal sparsity.
    # Decode protocol (dense prompt, sparse continuation). The plans are saved in the report folder: `sparsen eval
    # --plan` reproduces each line.
    best = sparsen.load_model(args.model)  # sparsify_ folds the rotation into the weights of the model it is given
    common = {"tokens": args.calib_tokens, "ctx": args.ctx}
    runs = {}
    for method, target in ((BEST_METHOD, args.sparsity), ("teal", None)):
        owner = best if method == BEST_METHOD else lm
        if target is None:
            target = round(runs[BEST_METHOD].sparsity["overall"], 3)
        allocation = BEST_ALLOCATION if method == BEST_METHOD else "uniform"
        print(f"calibrating {method} at {target:g} on {args.calib_tokens} tokens (allocation {allocation}) ...", flush=True)
        plan = sparsen.calibrate(owner, config_for(method, sparsity=target, allocation=allocation, **common),
                                 progress=not args.quiet)
        plan.save(out / f"plan_{method}.json")
        sparsen.sparsify_(owner, plan)
        runs[method] = sparsen.evaluate(owner, ctx=args.ctx, windows=args.windows, protocol="decode",
                                        progress=not args.quiet)
        runs[method].plan = str(out / f"plan_{method}.json")
        write_json(out / f"eval_decode_{method}.json", runs[method].to_dict())
        if owner is lm:
            sparsen.unsparsify_(lm)
    dense_ppl = runs[BEST_METHOD].dense_ppl
    first = runs[BEST_METHOD]
    lines = [f"decode protocol, {first.windows} windows of {first.ctx}, {first.tokens_scored} tokens scored "
             f"(first half of each window dense, second half sparse); TEAL's target = our achieved sparsity",
             f"{'model':<34}{'target':>8}{'achieved':>10}{'ppl':>9}{'vs dense':>10}{'KL':>8}{'top-1':>8}",
             f"{'dense':<34}{'':>8}{0:>10.3f}{dense_ppl:>9.2f}{'':>10}{0:>8.3f}{1:>8.3f}"]
    for method in ("teal", BEST_METHOD):
        r = runs[method]
        label = method + (f" ({BEST_ALLOCATION})" if method == BEST_METHOD else " (uniform)")
        target = json_target(out / f"plan_{method}.json")
        lines.append(f"{label:<34}{target:>8.3f}{r.sparsity['overall']:>10.3f}{r.ppl:>9.2f}"
                     f"{r.ppl / dense_ppl - 1:>+10.1%}{r.kl:>8.3f}{r.top1_agree:>8.3f}")
    teal, ours = runs["teal"], runs[BEST_METHOD]
    if teal.ppl > dense_ppl:
        lines.append(f"our perplexity increase is {(ours.ppl - dense_ppl) / (teal.ppl - dense_ppl):.2f} of TEAL's, our KL "
                     f"{ours.kl / teal.kl:.2f} of TEAL's, at achieved sparsity {ours.sparsity['overall']:.3f} vs "
                     f"{teal.sparsity['overall']:.3f}")
    print("\n".join(lines))
    evals += [""] + lines
    sections.append(("Quality at equal achieved sparsity: dense, uniform TEAL and our best method (sparsen eval)",
                     "\n".join(evals), []))
    sections.append(("Speed: the CPU engine, dense vs sparse (sparsen generate, sparsen bench)",
                     demo_engine(args, best, lm, out), []))
    page = write_report(out, sections)
    print(f"report: {page} ({time.perf_counter() - t0:.0f} s)")


def json_target(plan_path: Path) -> float:
    import json

    return float(json.loads(plan_path.read_text())["target_sparsity"])


def demo_engine(args, best, dense_lm, out: Path) -> str:
    """The demo's last part: a streamed sample from the engine under our best plan, then a short dense-vs-sparse
    bench of the engine (the full comparison with HF and llama.cpp is `sparsen bench`)."""
    import statistics
    import sys

    from sparsen.data import corpus_windows
    from sparsen.engine import Engine, bytes_per_token
    from sparsen.engine.commands import TextStream, _engine_run, prompt_ids
    from sparsen.io import write_json

    sparse = Engine(best, best.plan, threads=2, max_seq=512)  # `best` already carries the plan's rotation
    chat = bool(getattr(best.tokenizer, "chat_template", None))
    prompt = "Write two sentences about the European lobster."
    print(f"\n$ sparsen generate --plan {out / f'plan_{BEST_METHOD}.json'} {'--chat ' if chat else ''}"
          f"--prompt '{prompt}' --max-new-tokens 48")
    stream = TextStream(best.tokenizer, sys.stdout)
    tokens = sparse.generate(prompt_ids(best, prompt, chat), 48, eos_token_id=best.tokenizer.eos_token_id,
                             on_token=stream)
    sample = best.tokenizer.decode(tokens, skip_special_tokens=True)
    print()
    dense = Engine(dense_lm, None, threads=2, max_seq=512)
    ids = corpus_windows(best.tokenizer, "wikitext2-test", 64, 1, bos=best.window_bos)[0].tolist()
    runs = {"dense": [], "sparse": []}
    for _ in range(3):
        runs["dense"].append(_engine_run(dense, ids, 64))
        sparse.reset()
        runs["sparse"].append(_engine_run(sparse, ids, 64))
    d, s = statistics.median(runs["dense"]), statistics.median(runs["sparse"])
    achieved = sparse.achieved()["overall"]
    bound = bytes_per_token(dense, 0, 96) / bytes_per_token(dense, achieved, 96)
    write_json(out / "bench.json", {"engine_dense_tok_s": d, "engine_sparse_tok_s": s, "speedup_vs_dense": s / d,
                                    "achieved_sparsity": achieved, "bound_speedup": bound, "threads": 2,
                                    "weights_dtype": "fp32", "prompt_tokens": 64, "new_tokens": 64, "raw_tok_s": runs})
    speed = (f"engine, fp32, 2 threads, 64 + 64 tokens, median of 3 interleaved rounds:\n"
             f"  dense  {d:6.1f} tok/s\n  sparse {s:6.1f} tok/s  ({s / d:.2f}x at achieved sparsity {achieved:.3f}; "
             f"bytes bound {bound:.2f}x)\n"
             "  (the full comparison with HF generate and llama.cpp: `sparsen bench`, see BENCHMARKS.md)")
    print(speed)
    return f"sample ({BEST_METHOD} plan, {len(tokens)} tokens): {sample}\n\n{speed}"


def cmd_generate(args) -> None:
    from sparsen.engine.commands import cmd_generate as run

    run(args)


def cmd_bench(args) -> None:
    from sparsen.engine.commands import cmd_bench as run
    from sparsen.io import check_writable

    check_writable(args.out)
    run(args)


COMMANDS = {"profile": cmd_profile, "eval": cmd_eval, "calibrate": cmd_calibrate, "frontier": cmd_frontier,
            "attn-eval": cmd_attn_eval, "attn-frontier": cmd_attn_frontier, "generate": cmd_generate, "bench": cmd_bench,
            "demo": cmd_demo, "cache": cmd_cache, "sae": cmd_sae,
            "circuits": cmd_circuits, "train": cmd_train, "experiment": cmd_experiment, "moefy": cmd_moefy}


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
