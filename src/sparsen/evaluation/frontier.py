"""`sparsen frontier`: quality against achieved sparsity, every method on one grid, one protocol.

Each (method, target sparsity) is calibrated on the calibration corpus, then all of them are
evaluated in one window-major sweep per protocol (``evaluate_many``: the dense reference and, under
``decode``, the dense prompt's KV cache are computed once per window). Quality is reported against
the sparsity *achieved on the evaluated tokens* (share of block-linear weight bytes a kernel skips),
not the target. A method that cannot reach a target (CATS covers only up/down) is listed as such.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
from tqdm.auto import tqdm

from sparsen.core.rules import check_sparsity
from sparsen.core.transforms import applied_key
from sparsen.data import CALIB_CORPUS, read_corpus
from sparsen.errors import SparsenError, UnreachableSparsity
from sparsen.evaluation import evaluate_many
from sparsen.methods import calibrate, config_for, get_method
from sparsen.methods.config import parse_fields
from sparsen.methods.registry import untuned_fields

DEFAULT_SPARSITIES = (0.25, 0.4, 0.5, 0.6, 0.7)
REFERENCE = "teal"  # the uniform TEAL baseline every other method is compared with
REFERENCE_MARGIN = 0.1  # the reference is also run this far beyond both ends of the grid (see reference_targets)


def reference_targets(sparsities) -> list[float]:
    """Targets the reference runs at beyond the grid, so that every method's *achieved* sparsity lies inside the
    reference's measured range and gets a ratio (a method can land below its lowest target: the rotations do on
    the test text). One step of REFERENCE_MARGIN below the lowest and above the highest target, inside (0, 0.95)."""
    lo, hi = round(min(sparsities) - REFERENCE_MARGIN, 4), round(max(sparsities) + REFERENCE_MARGIN, 4)
    return [s for s in (lo, hi) if 0 < s < 0.95 and s not in sparsities]


def parse_method(spec: str) -> tuple[str, str, int | None, dict]:
    """'NAME[:ALLOCATION[:SEGMENTS]][+FIELD=VALUE...]' -> (method, allocation, segments, other config fields);
    checked against the registry and the method's config (e.g. ``rotate-wina:global+basis=pca``)."""
    head, *sets = spec.split("+")
    name, allocation, segments = (head.split(":") + ["", ""])[:3]
    m = get_method(name)
    allocation = allocation or "uniform"
    if allocation not in m.config.allocations:
        raise SparsenError(f"method '{name}' supports allocation {', '.join(m.config.allocations)}, not '{allocation}'")
    if segments and (not segments.isdigit() or int(segments) < 1 or (int(segments) > 1 and not m.rotation)):
        raise SparsenError(f"'{spec}': segments must be a whole number >= 1, and above 1 only for rotation methods")
    fields = parse_fields(sets, what=f"'{spec}'")
    if {"sparsity", "allocation", "segments"} & set(fields):
        raise SparsenError(f"'{spec}': give the allocation and segments as NAME:ALLOCATION:SEGMENTS, not as fields")
    segments = int(segments) if segments and m.rotation else None
    config_for(name, sparsity=0.5, allocation=allocation, segments=segments, **fields)  # unknown fields fail now
    return name, allocation, segments, fields


def run_frontier(lm, methods: list[str], sparsities=DEFAULT_SPARSITIES, protocols=("full", "decode"),
                 windows: int = 8, ctx: int = 1024, calib: dict | None = None,
                 corpus: str | list[str] = "wikitext2-test", progress: bool = True, model_loader=None) -> dict:
    """Calibrate every (method, sparsity) and evaluate them all; returns the frontier record.

    ``methods`` are names, optionally with an allocation (``rotate:sensitivity``); ``calib`` holds the config
    fields every plan shares (corpus, tokens, ctx; default: the configs' defaults). ``model_loader()``
    returns a fresh copy of the model, for methods that transform the weights (a folded rotation);
    copies are shared between plans with the same transform tensors. ``corpus``: one evaluation corpus (the
    record as below) or a list of them: the plans are calibrated once and evaluated on each, and the record holds
    one single-corpus record per corpus under ``by_corpus``.
    """
    corpora = [corpus] if isinstance(corpus, str) else list(corpus)
    if not corpora:
        raise SparsenError("no evaluation corpus given")
    for c in corpora:
        read_corpus(c)  # a missing file fails before any calibration
    calib = {"corpus": CALIB_CORPUS, "tokens": 16384, "ctx": 1024, **(calib or {})}
    t0 = time.perf_counter()
    configs, rows = calibrate_grid(lm, methods, sparsities, calib, progress, model_loader)
    calib_seconds = time.perf_counter() - t0
    by_corpus = {}
    for c in corpora:
        t1 = time.perf_counter()
        fr = evaluate_grid(lm, configs, rows, c, protocols, windows, ctx, progress)
        fr.update({"methods": list(methods), "sparsities": list(sparsities),
                   "calibration": {"corpus": calib["corpus"], "tokens": calib["tokens"], "ctx": calib["ctx"]},
                   "seconds": {"calibration": calib_seconds, "evaluation": time.perf_counter() - t1,
                               "total": time.perf_counter() - t0}})
        by_corpus[c] = fr
    if isinstance(corpus, str):
        return by_corpus[corpus]
    return {"model": lm.spec, "fingerprint": lm.fingerprint, "corpora": corpora, "ctx": ctx, "windows": windows,
            "protocols": list(protocols), "sparsities": list(sparsities), "methods": list(methods),
            "calibration": by_corpus[corpora[0]]["calibration"], "by_corpus": by_corpus,
            "seconds": {"calibration": calib_seconds, "total": time.perf_counter() - t0}}


def calibrate_grid(lm, methods, sparsities, calib: dict, progress: bool = True, model_loader=None):
    """Every (method, sparsity) plan, ready to evaluate: ({name: (model, sparsifier)}, rows)."""
    parsed = {spec: parse_method(spec) for spec in methods}
    for s in sparsities:
        check_sparsity(s)
    configs, rows, copies = {}, [], {}
    jobs = [(m, s) for m in methods for s in sparsities]
    if REFERENCE in methods:
        jobs += [(REFERENCE, s) for s in reference_targets(sparsities)]
    untuned = {}  # a plan before its tuning step, shared by the specs that differ only in their tune_* fields
    for method, s in tqdm(jobs, desc="calibrate grid", disable=not progress):
        name, allocation, segments, fields = parsed[method]
        try:
            config = config_for(name, sparsity=s, allocation=allocation, segments=segments, **fields, **calib)
            key = (name, json.dumps(untuned_fields(config), sort_keys=True, default=str))
            if key not in untuned and config.tune_steps:
                untuned[key] = calibrate(lm, config_for(name, **untuned_fields(config)), progress=False)
            plan = calibrate(lm, config, progress=False, untuned=untuned.get(key))
            untuned.setdefault(key, plan)
        except UnreachableSparsity as e:
            rows.append({"method": method, "target": s, "skipped": str(e)})
            continue
        owner = lm
        if plan.transform is not None:  # a transformed copy per distinct transform (plans may share one)
            key = (tuple(plan.transforms), applied_key(plan.transform_tensors()))
            if key not in copies:
                copies[key] = model_loader()
                plan.transform_(copies[key])
            owner = copies[key]
        name = f"{method}@{s:g}"
        configs[name] = (owner.model, plan.build_sparsifier(owner))
        rows.append({"method": method, "target": s, "name": name, "calibrated": plan.calibrated_sparsity,
                     "params": {k: v for k, v in plan.params.items() if k != "kl_table"},
                     **({"reference_range": True} if s not in sparsities else {})})
    return configs, rows


def evaluate_grid(lm, configs: dict, rows: list[dict], corpus: str, protocols, windows: int, ctx: int,
                  progress: bool = True) -> dict:
    """One corpus's frontier record: every configuration under every protocol (rows are copied, not changed)."""
    rows = [dict(r) for r in rows]
    dense = {}
    for protocol in protocols:
        d, results = evaluate_many(lm, configs, corpus=corpus, ctx=ctx, n_windows=windows, protocol=protocol,
                                   progress=progress)
        dense[protocol] = {"ppl": d.ppl, "nll": d.nll, "tokens_scored": d.tokens_scored}
        for row in rows:
            if "name" in row:
                r = results[row["name"]]
                row[protocol] = {"ppl": r.ppl, "nll": r.nll, "kl": r.kl, "top1_agree": r.top1_agree,
                                 "achieved": r.sparsity["overall"], "per_linear": r.sparsity["per_linear"]}
    return {"model": lm.spec, "fingerprint": lm.fingerprint, "corpus": corpus, "ctx": ctx, "windows": windows,
            "protocols": list(protocols), "dense": dense, "rows": rows}


def relative_to_reference(frontier: dict, row: dict, protocol: str) -> tuple[float | None, float | None]:
    """(perplexity increase / the reference's, KL / the reference's) at the row's achieved sparsity, on one
    corpus's record; None where the reference's measured range does not reach it."""
    q = row[protocol]
    inc = math.exp(q["nll"] - frontier["dense"][protocol]["nll"]) - 1
    ref = reference_increase(frontier, protocol, q["achieved"])
    ref_kl = reference_kl(frontier, protocol, q["achieved"])
    return (inc / ref if ref and ref > 0 else None), (q["kl"] / ref_kl if ref_kl and ref_kl > 0 else None)


def format_corpora_summary(multi: dict, protocol: str) -> str:
    """One line per (method, target), one column group per corpus: achieved sparsity, perplexity increase and KL
    as shares of uniform TEAL's at that achieved sparsity."""
    corpora = multi["corpora"]
    head = ["method", "target"]
    for c in corpora:
        head += [f"{c}: achieved", f"{c}: increase / teal's", f"{c}: KL / teal's"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| dense | 0 | " + " | ".join(f"ppl {multi['by_corpus'][c]['dense'][protocol]['ppl']:.2f} | |"
                                            for c in corpora) + " |"]
    first = multi["by_corpus"][corpora[0]]["rows"]
    for i, r0 in enumerate(first):
        if r0.get("reference_range"):
            continue
        cells = [r0["method"], f"{r0['target']:g}"]
        for c in corpora:
            fr = multi["by_corpus"][c]
            r = fr["rows"][i]
            if "skipped" in r:
                cells += ["unreachable", "", ""]
                continue
            rel, rel_kl = relative_to_reference(fr, r, protocol)
            cells += [f"{r[protocol]['achieved']:.3f}", "n/a" if rel is None else f"{rel:.2f}",
                      "n/a" if rel_kl is None else f"{rel_kl:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve(frontier: dict, method: str, protocol: str, key: str = "nll"):
    pts = sorted((r[protocol]["achieved"], r[protocol][key]) for r in frontier["rows"]
                 if r["method"] == method and protocol in r)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _reference_log_at(frontier: dict, protocol: str, achieved: float, key: str) -> float | None:
    """log(reference's ``key``) interpolated at an achieved sparsity, linear in the log between its points
    (perplexity and KL both grow about exponentially with sparsity); None outside its measured range."""
    x, y = _curve(frontier, REFERENCE, protocol, key)
    if key != "nll":
        y = np.log(np.maximum(y, 1e-12))
    if len(x) == 0 or achieved < x[0] - 1e-3 or achieved > x[-1] + 1e-3:
        return None
    return float(np.interp(achieved, x, y))


def reference_increase(frontier: dict, protocol: str, achieved: float) -> float | None:
    """Perplexity increase (ratio - 1) of the reference method interpolated at an achieved sparsity
    (linear in log-perplexity between its grid points; None outside its measured range)."""
    nll = _reference_log_at(frontier, protocol, achieved, "nll")
    return None if nll is None else math.exp(nll - frontier["dense"][protocol]["nll"]) - 1


def reference_kl(frontier: dict, protocol: str, achieved: float) -> float | None:
    """KL(dense || sparse) of the reference method interpolated at an achieved sparsity (linear in log-KL)."""
    log_kl = _reference_log_at(frontier, protocol, achieved, "kl")
    return None if log_kl is None else math.exp(log_kl)


def format_markdown(frontier: dict) -> str:
    """The frontier as a markdown table: per (method, target) the achieved sparsity and quality per protocol,
    and, against uniform TEAL at the *same achieved sparsity*, the share of TEAL's perplexity increase and of
    its KL. (The KL ratio is the steadier of the two at low sparsity, where a perplexity increase of a few
    tenths on a few windows is within the noise.)"""
    protocols = frontier["protocols"]
    head = ["method", "target"]
    cols = 6
    for p in protocols:
        head += [f"{p}: achieved", f"{p}: ppl", f"{p}: KL", f"{p}: top-1", f"{p}: increase / teal's",
                 f"{p}: KL / teal's"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = ["dense", "0"]
    for p in protocols:
        dense += ["0", f"{frontier['dense'][p]['ppl']:.2f}", "0", "1", "", ""]
    lines.append("| " + " | ".join(dense) + " |")
    for r in frontier["rows"]:
        cells = [r["method"], f"{r['target']:g}" + (" (reference range)" if r.get("reference_range") else "")]
        if "skipped" in r:
            cells += ["unreachable"] + [""] * (cols * len(protocols) - 1)
        else:
            for p in protocols:
                q = r[p]
                rel, rel_kl = relative_to_reference(frontier, r, p)
                cells += [f"{q['achieved']:.3f}", f"{q['ppl']:.2f}", f"{q['kl']:.3f}", f"{q['top1_agree']:.3f}",
                          "n/a" if rel is None else f"{rel:.2f}", "n/a" if rel_kl is None else f"{rel_kl:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(frontier: dict, path) -> None:
    from sparsen.io import pyplot, save_figure

    plt = pyplot()

    protocols = frontier["protocols"]
    fig, axes = plt.subplots(2, len(protocols), figsize=(6.5 * len(protocols), 9), squeeze=False)
    for j, p in enumerate(protocols):
        for method in frontier["methods"]:
            pts = sorted((r[p]["achieved"], r[p]["ppl"], r[p]["kl"]) for r in frontier["rows"]
                         if r["method"] == method and p in r)
            if not pts:
                continue
            xs, ppl, kl = zip(*pts)
            style = "-o" if method != REFERENCE else "--s"
            axes[0, j].plot(xs, ppl, style, label=method, ms=4)
            axes[1, j].plot(xs, kl, style, label=method, ms=4)
        axes[0, j].axhline(frontier["dense"][p]["ppl"], color="k", lw=0.8, ls=":", label="dense")
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel("perplexity")
        axes[1, j].set_yscale("log")
        axes[1, j].set_ylabel("KL(dense || sparse), nats/token")
        axes[0, j].set_title(f"protocol {p}: {frontier['windows']} windows of {frontier['ctx']}")
        for ax in axes[:, j]:
            ax.set_xlabel("achieved model-wide sparsity (share of block-linear bytes skipped)")
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{frontier['model']}: quality vs achieved activation sparsity ({frontier['corpus']})")
    save_figure(fig, path)
