"""`sparsen attn-frontier`: sparse attention methods x densities x lengths, on the task suite and on perplexity.

Every method runs at every density of the grid (a method with its own mass budget, e.g. ``oracle-topp@p0.9``, runs
once as given). Methods that need calibration (Double Sparsity, the sketch) are calibrated once per method and
field set, whatever the density. Tasks: every decode configuration answers every sample after one dense prefill
of the sample's context (``run_tasks``). Perplexity and KL to dense: WikiText-2 test windows of each length, the
decode protocol (first half dense, second half through the method), window-major with the dense prefix computed
once (``evaluate_many``). Every score is reported with the density the sparse tokens achieved and the density of
the reads including the method's estimate.
"""

from __future__ import annotations

import time

from sparsen.core.attention import capturing_prefix_mass, prime
from sparsen.data import EVAL_CORPUS
from sparsen.errors import SparsenError
from sparsen.evaluation import evaluate_many
from sparsen.evaluation.attention import markdown_table, paired_table, run_tasks, wilson
from sparsen.methods.attention import attention_plan, get_attention_method, parse_attention_spec

DEFAULT_DENSITIES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def grid_specs(methods: list[str], densities) -> list[str]:
    """'NAME[+FIELD=VALUE...]' x densities -> 'NAME@1/8[+...]' specs; a method given with its own budget
    ('oracle-topp@p0.9', 'quest@256t') is taken once as it is."""
    out = []
    for m in methods:
        head, plus, rest = m.strip().partition("+")
        if "@" in head:
            out.append(m.strip())
            continue
        for d in densities:
            inv = 1 / d
            budget = f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{d:g}"
            out.append(f"{head}@{budget}{plus}{rest}")
    return out


def build_plans(lm, specs: list[str], progress: bool = True) -> dict:
    """{label: plan}; one calibration per method and non-budget field set."""
    calibrated: dict[tuple, dict] = {}
    plans = {}
    for spec in specs:
        config = parse_attention_spec(spec)
        label = config.label()
        if label in plans:
            raise SparsenError(f"the grid holds '{label}' twice: give each method once")
        m = get_attention_method(config.method)
        key = (config.method, tuple(sorted(config._changed().items())))
        if m.calibrate is not None and key not in calibrated:
            calibrated[key] = m.calibrate(lm, config, progress)
        plans[label] = attention_plan(lm, config, progress=progress, tensors=calibrated.get(key))
    return plans


def perplexity(lm, plans: dict, ctx: int, windows: int, corpus: str = EVAL_CORPUS, progress: bool = True) -> dict:
    """Perplexity and KL to dense of every plan on ``windows`` windows of ``ctx`` tokens: decode methods under the
    decode protocol (second half sparse), prefill methods under ``full`` (each window one sparse prefill, every
    position scored). {protocol: {"dense": ..., label: ...}}."""
    out = {}
    for protocol, kind in (("decode", "decode"), ("full", "prefill")):
        chosen = {label: p for label, p in plans.items() if _kind(p) == kind}
        if chosen:
            out[protocol] = _perplexity(lm, chosen, ctx, windows, corpus, protocol, progress)
    return out


def _kind(plan) -> str:
    return get_attention_method(plan.attention["method"]).config.kind


def _perplexity(lm, plans, ctx, windows, corpus, protocol, progress) -> dict:
    configs = {label: (lm.model, plan.build_sparsifier(lm)) for label, plan in plans.items()}
    wants_mass = any(getattr(sel, "needs_prefix_mass", False) for _, sp in configs.values()
                     for sel in sp.attention_rules.values())

    def before_prefix():
        return capturing_prefix_mass(lm.adapter, {}) if wants_mass else None

    def before_config(sp, mass):
        prime(sp, mass or {})  # a new sequence: stateful selectors forget the last window

    dense, results = evaluate_many(lm, configs, corpus=corpus, ctx=ctx, n_windows=windows, protocol=protocol,
                                   progress=progress, prefix_observer=before_prefix, before_config=before_config)
    out = {"dense": {"ppl": dense.ppl, "nll": dense.nll, "tokens_scored": dense.tokens_scored}}
    for label, r in results.items():
        att = r.sparsity.get("attention") or {}
        pre = protocol == "full"
        out[label] = {"ppl": r.ppl, "nll": r.nll, "kl": r.kl, "top1_agree": r.top1_agree,
                      "ppl_increase": r.ppl / dense.ppl - 1,
                      "density": att.get("prefill_density" if pre else "density"),
                      "density_all_layers": att.get("prefill_density_all_layers" if pre else "density_all_layers"),
                      "read_density": None if pre else att.get("read_density"),
                      "estimate_share": att.get("prefill_estimate_share") if pre else None}
    return out


def run_attention_frontier(lm, methods: list[str], densities=DEFAULT_DENSITIES, lengths=(4096, 8192),
                           samples: int = 50, seed: int = 0, tasks=None, ppl_lengths=(4096, 8192),
                           ppl_windows: int = 4, progress: bool = True, task_samples=None, checkpoint=None) -> dict:
    """The frontier record: task accuracy per (configuration, task, length) and perplexity per (configuration,
    window length). ``task_samples`` replaces the generated suite (a user's task file); ``checkpoint``: see
    ``run_tasks``."""
    from sparsen.evaluation.tasks import generate_suite

    t0 = time.perf_counter()
    specs = grid_specs(methods, densities)
    plans = build_plans(lm, specs, progress)
    configs = {label: {"spec": spec, **plan.attention} for (label, plan), spec in zip(plans.items(), specs)}
    t_cal = time.perf_counter() - t0
    record = {"model": lm.spec, "methods": list(methods), "densities": list(densities), "configs": configs,
              "lengths": list(lengths), "ppl_lengths": list(ppl_lengths), "ppl_windows": ppl_windows,
              "seconds": {"calibration": t_cal}}
    if samples and (lengths or task_samples):
        suite = task_samples if task_samples is not None else generate_suite(
            lm.tokenizer, lengths=lengths, n=samples, seed=seed, tasks=tasks)
        t1 = time.perf_counter()
        record["tasks"] = run_tasks(lm, suite, plans, progress=progress, checkpoint=checkpoint)
        record["seconds"]["tasks"] = time.perf_counter() - t1
    record["perplexity"] = {}
    for ctx in ppl_lengths:
        t1 = time.perf_counter()
        record["perplexity"][str(ctx)] = perplexity(lm, plans, ctx, ppl_windows, progress=progress)
        record["seconds"][f"perplexity_{ctx}"] = time.perf_counter() - t1
    record["seconds"]["total"] = time.perf_counter() - t0
    return record


def mean_accuracy(record: dict) -> dict:
    """{(label, length): (accuracy over every sample of every task, Wilson interval, mean density, mean read
    density)}: tasks have equal sample counts, so the pooled accuracy is the mean over tasks."""
    out = {}
    rows = record["tasks"]["samples"]
    for label in record["tasks"]["labels"]:
        by_len: dict = {}
        for r in rows:
            by_len.setdefault(r["length"], []).append(r["results"][label])
        for length, res in by_len.items():
            k, n = sum(x["score"] for x in res), len(res)
            dens = [x["density"] for x in res if "density" in x]
            reads = [x["read_density"] for x in res if "read_density" in x]
            out[(label, length)] = (k / n, wilson(k, n), sum(dens) / len(dens) if dens else None,
                                    sum(reads) / len(reads) if reads else None)
    return out


def format_markdown(record: dict) -> str:
    lines = []
    if "tasks" in record:
        acc = mean_accuracy(record)
        lengths = sorted({length for _, length in acc}, key=lambda x: x or 0)
        lines += ["Task suite: mean accuracy over tasks, % [95% Wilson interval over the pooled samples]; density of "
                  "the sparse tokens' keys read / including the estimate's reads.", "",
                  "| configuration | " + " | ".join(f"{length or 'any'}: accuracy | density / reads" for length in lengths)
                  + " |", "|---|" + "---|---|" * len(lengths)]
        for label in record["tasks"]["labels"]:
            cells = []
            for length in lengths:
                a, (lo, hi), d, r = acc[(label, length)]
                cells += [f"{100 * a:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]",
                          "dense" if d is None else f"{d:.3f}" + ("" if r is None else f" / {r:.3f}")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Per task, % [95% Wilson interval]:", "",
                  markdown_table(record["tasks"]) + paired_table(record["tasks"])]
    for ctx, by_protocol in record.get("perplexity", {}).items():
        for protocol, res in by_protocol.items():
            dense = res["dense"]
            what = ("decode protocol: second half sparse" if protocol == "decode"
                    else "full protocol: each window one sparse prefill")
            lines += [f"Perplexity on {record['ppl_windows']} WikiText-2 test windows of {ctx} ({what}, "
                      f"{dense['tokens_scored']} tokens scored); dense {dense['ppl']:.3f}.", "",
                      "| configuration | ppl | increase | KL | top-1 agree | density | reads or estimate |",
                      "|---|---|---|---|---|---|---|"]
            for label, r in res.items():
                if label == "dense":
                    continue
                extra = (f"{r['read_density']:.3f}" if r["read_density"] is not None
                         else f"est. {r['estimate_share']:.3f}" if r["estimate_share"] is not None else "")
                lines.append(f"| {label} | {r['ppl']:.3f} | {100 * r['ppl_increase']:+.2f}% | {r['kl']:.4f} | "
                             f"{r['top1_agree']:.3f} | {r['density']:.3f} | {extra} |")
            lines.append("")
    return "\n".join(lines)


def _method_of(record: dict, label: str) -> str:
    c = record["configs"][label]
    fields = parse_attention_spec(c["spec"])._changed()
    return c["method"] + "".join(f"+{k}={v}" for k, v in fields.items())


def plot_attention_frontier(record: dict, out_dir) -> list:
    """accuracy vs density per task and length (attn_frontier_tasks.png); ppl and KL vs density per window length
    (attn_frontier_ppl.png)."""
    from pathlib import Path

    from sparsen.io import pyplot, save_figure

    plt = pyplot()

    out_dir, paths = Path(out_dir), []
    if "tasks" in record:
        groups = record["tasks"]["groups"]
        tasks = sorted({g["task"] for g in groups}) + ["mean"]
        lengths = sorted({g["length"] for g in groups}, key=lambda x: x or 0)
        acc = mean_accuracy(record)
        fig, axes = plt.subplots(len(lengths), len(tasks), figsize=(3.6 * len(tasks), 3.2 * len(lengths)),
                                 squeeze=False, layout="constrained")
        for i, length in enumerate(lengths):
            for j, task in enumerate(tasks):
                ax = axes[i, j]
                curves: dict = {}
                for label in record["tasks"]["labels"]:
                    if label == "dense":
                        continue
                    if task == "mean":
                        a, _, d, _ = acc[(label, length)]
                    else:
                        g = next(g for g in groups if g["label"] == label and g["task"] == task and g["length"] == length)
                        a, d = g["accuracy"], g["density"]
                    if d is not None:
                        curves.setdefault(_method_of(record, label), []).append((d, 100 * a))
                for method, pts in curves.items():
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, "-o", ms=3, label=method)
                dense = acc[("dense", length)][0] if task == "mean" else next(
                    g["accuracy"] for g in groups if g["label"] == "dense" and g["task"] == task and g["length"] == length)
                ax.axhline(100 * dense, color="k", ls=":", lw=0.8, label="dense")
                ax.set_xscale("log", base=2)
                ax.set_ylim(-3, 103)
                ax.set_title(f"{task}, {length or 'any'} tokens", fontsize=9)
                ax.grid(alpha=0.3)
                if i == len(lengths) - 1:
                    ax.set_xlabel("density of keys read")
                if j == 0:
                    ax.set_ylabel("accuracy %")
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"{record['model']}: sparse attention on the task suite (decode methods: keys read; prefill "
                     "methods: the prefill's entries)")
        paths.append(save_figure(fig, out_dir / "attn_frontier_tasks.png"))
    if record.get("perplexity"):
        panels = [(ctx, p) for ctx, by in record["perplexity"].items() for p in by]
        fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False, layout="constrained")
        for j, (ctx, protocol) in enumerate(panels):
            res = record["perplexity"][ctx][protocol]
            curves = {}
            for label, r in res.items():
                if label != "dense" and r["density"] is not None:
                    curves.setdefault(_method_of(record, label), []).append((r["density"], r["ppl"], r["kl"]))
            for method, pts in curves.items():
                xs, ppl, kl = zip(*sorted(pts))
                axes[0, j].plot(xs, ppl, "-o", ms=3, label=method)
                axes[1, j].plot(xs, kl, "-o", ms=3, label=method)
            axes[0, j].axhline(res["dense"]["ppl"], color="k", ls=":", lw=0.8, label="dense")
            axes[0, j].set_title(f"WikiText-2 test, windows of {ctx}, " + ("second half sparse" if protocol == "decode"
                                                                          else "sparse prefill (full)"))
            axes[0, j].set_ylabel("perplexity")
            axes[1, j].set_ylabel("KL(dense || sparse), nats/token")
            axes[1, j].set_yscale("log")
            for ax in axes[:, j]:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("density of keys read" if protocol == "decode" else "density of the prefill's entries")
                ax.grid(alpha=0.3, which="both")
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{record['model']}: perplexity and KL under sparse attention")
        paths.append(save_figure(fig, out_dir / "attn_frontier_ppl.png"))
    return paths
