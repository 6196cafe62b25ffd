"""The `sparsen circuits` command: circuit discovery with discrete codes, checked against per-head patching.

Kept apart from cli.py (which stays importable without torch) and registered by it."""

from __future__ import annotations

from sparsen.errors import SparsenError

TASK_NAMES = ("ioi", "greater-than", "docstring")  # sparsen.circuits.TASKS (not imported here: torch)
OUTPUT_MODES = ("mean", "last", "tail")  # sparsen.circuits.heads.OUTPUT_MODES (likewise)


def add_parsers(sub, add_model, positive_int) -> None:
    p = sub.add_parser("circuits", help="find a task's attention-head circuit from discrete SAE codes (O'Neill & Bui)",
                       description="Build seeded positive/negative prompt pairs for a task, check the model solves it, "
                                   "compute a ground-truth circuit by per-head activation patching from the paired "
                                   "negatives, train the shared code SAE on the heads' outputs over --seeds seeds and "
                                   "report the ROC AUC of its node, flip, tv and pair scores (and of the mean-difference "
                                   "and attribution-patching baselines) against that ground truth, with a label-permutation "
                                   "null and each stage's runtime. Writes circuits.json and circuits.md to --out.")
    p.add_argument("--task", required=True, metavar="TASK", help=f"one of {', '.join(TASK_NAMES)}")
    add_model(p)
    p.add_argument("--prompts", type=positive_int, default=100,
                   help="prompt pairs generated: positives and as many paired negatives (default 100)")
    p.add_argument("--pairs", type=positive_int, default=96,
                   help="pairs patched for the ground truth, from the positives the model solves (default 96, or "
                        "as many as it solves); the patching costs about n_heads x pairs prompt forwards")
    p.add_argument("--seeds", type=positive_int, default=10, help="SAE seeds (default 10)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed; SAE seeds follow it (default 0)")
    p.add_argument("--l1", type=float, default=None,
                   help="the SAE's L1 weight (default the paper's: 0.02, docstring 0.05)")
    p.add_argument("--mode", default="mean", choices=OUTPUT_MODES,
                   help="head outputs the codes read: mean over positions (the paper, default), the last position, or "
                        "tail: the mean over the positions from the first one where a pair's prompts differ")
    p.add_argument("--max-rows", type=positive_int, default=96, help="prompt rows per forward pass (default 96)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default ./circuits-TASK)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_circuits(args) -> None:
    if args.task not in TASK_NAMES:
        raise SparsenError(f"unknown task '{args.task}': use one of {', '.join(TASK_NAMES)}")
    from sparsen.circuits import CircuitConfig, run_circuits, summary_markdown
    from sparsen.io import check_writable, write_json, write_text
    from sparsen.models import load_model

    out = check_writable(args.out or f"circuits-{args.task}", directory=True)
    config = CircuitConfig(task=args.task, prompts=args.prompts, pairs=args.pairs, seeds=args.seeds, seed=args.seed,
                           l1=args.l1, mode=args.mode, max_rows=args.max_rows)
    lm = load_model(args.model)
    res = run_circuits(lm, config, progress=not args.quiet)
    write_json(out / "circuits.json", res)
    write_text(out / "circuits.md", summary_markdown(res))
    b, auc = res["behaviour"], res["auc"]["threshold"]
    print(f"{args.task} on {lm.spec}: positives accuracy {b['positives']['accuracy']:.3f} (M {b['positives']['metric']:.3f}), "
          f"negatives {b['negatives']['accuracy']:.3f} (M {b['negatives']['metric']:.3f}); ground truth "
          f"{len(res['truth']['sets']['threshold'])} heads ({res['truth']['bootstrap']['size_in_gate']:.0%} of bootstrap "
          f"resamples within 5-40); node AUC {auc['node']['mean']:.3f} ± {auc['node']['std']:.3f} "
          f"(null 95% {auc['node']['null_95']:.3f}), flip {auc['flip']['mean']:.3f}, tv {auc['tv']['mean']:.3f}, "
          f"pair {auc['pair']['mean']:.3f}, "
          f"mean-difference {auc['mean_difference']['mean']:.3f}, attribution {auc['attribution']['mean']:.3f}")
    failed = [k for k, v in res["acceptance"].items() if not v["pass"]]
    print(f"acceptance: {'all pass' if not failed else 'failed ' + ', '.join(failed)}")
    print(f"wrote {out / 'circuits.json'} and {out / 'circuits.md'}")
