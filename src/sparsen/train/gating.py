"""Top-K sparse softmax gating, checked on synthetic data: a Gaussian mixture of experts with known parameters, fitted
by maximum likelihood, its density and parameter errors against the sample size (Nguyen et al., ICLR 2024; the
temperature vs activation-gate companion, ICML 2024).

Model (d = 1): p(y | x) = sum over the K largest gating logits g_i = b1_i x + b0_i of softmax_i(g over those K) *
N(y | a_i x + c_i, s_i^2). Truths: two experts with top-1 gating (each x is served by one expert), fitted exactly
(k = 2, K = 1) and over-specified (k = 3 with K = 1, 2, 3); and two experts with top-2 gating (K* = 2: both serve
every x), fitted exactly (k = 2, K = 2) and over-specified (k = 3 with K = 2, which cannot select both copies of the
split expert and the other one, and K = 3, which can: the covering condition). The dense-gating pair:
softmax((b1 x + b0) / tau) against softmax(tanh(b1 x + b0)) over two experts (the second's logit fixed at 0), each
fitted to data from its own family.

Errors, averaged over replicates fitted together (one batched Adam run per setting and n, initialised at the truth
plus noise, the extra expert a perturbed copy of the first):
- density: E_x[Hellinger(p_hat(.|x), p(.|x))] on a grid of x and y;
- parameters, by Voronoi cell (each fitted expert goes to the true expert nearest in (a, c, s)): per true expert the
  largest distance from a member of its cell, reported for cells with one member ("unsplit") and with more ("split");
  an empty cell counts its nearest fitted expert; the dense-gating pair adds the gate's own parameters.
Slopes: least squares of log error on log n, with a bootstrap over replicates (95% interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsen.train.experiments import _plt, _write

TRUE_TOPK = {"b1": [2.0, -2.0], "b0": [0.0, 0.0], "a": [1.0, -1.0], "c": [0.5, -0.5], "s": [0.3, 0.3]}
TRUE_TOP2 = {"b1": [1.5, -1.5], "b0": [0.3, 0.0], "a": [1.0, -1.0], "c": [0.5, -0.5], "s": [0.3, 0.3]}
TRUE_DENSE = {"b1": [3.0], "b0": [0.5], "tau": 1.0, "a": [1.0, -1.0], "c": [0.5, -0.5], "s": [0.3, 0.3]}


@dataclass(frozen=True)
class Fit:
    name: str
    k: int
    """fitted experts"""
    K: int = 0
    """experts per input (top-K); 0 for the dense-gating pair"""
    gate: str = "topk"
    """topk, temperature or tanh"""
    prediction: str = ""
    true_K: int = 1
    """the truth's experts per input (top-K gates only): 1 (TRUE_TOPK) or 2 (TRUE_TOP2)"""


FITS = (Fit("exact k=2, K=1", 2, 1, prediction="density -1/2, parameters -1/2"),
        Fit("over k=3, K=1", 3, 1, prediction="density does not converge (K below the split cell's size)"),
        Fit("over k=3, K=2", 3, 2, prediction="density -1/2; split expert slower (about -1/4), unsplit -1/2"),
        Fit("over k=3, K=3", 3, 3, prediction="density -1/2; split expert slower (about -1/4), unsplit -1/2"),
        Fit("temperature softmax", 2, 0, "temperature", "density -1/2; parameters slower than any power (slope ~0)"),
        Fit("tanh before softmax", 2, 0, "tanh", "density -1/2; parameters polynomial (clearly negative)"),
        Fit("K*=2: exact k=2, K=2", 2, 2, prediction="density -1/2, parameters -1/2", true_K=2),
        Fit("K*=2: over k=3, K=2", 3, 2, prediction="density does not converge (K below the 3 experts both cells hold)",
            true_K=2),
        Fit("K*=2: over k=3, K=3", 3, 3, prediction="density -1/2; split expert slower (about -1/4), unsplit -1/2",
            true_K=2))


def _truth(fit: Fit) -> dict:
    t = TRUE_DENSE if fit.gate != "topk" else (TRUE_TOPK if fit.true_K == 1 else TRUE_TOP2)
    return {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else torch.tensor(v, dtype=torch.float64)
            for k, v in t.items()}


def _logits(p: dict, x: torch.Tensor, gate: str) -> torch.Tensor:
    """[R, n, k] gating logits (the dense pair's second expert at 0)."""
    g = p["b1"][:, None, :] * x[..., None] + p["b0"][:, None, :]
    if gate == "topk":
        return g
    g = g / p["tau"][:, None, None] if gate == "temperature" else torch.tanh(g)
    return torch.cat([g, torch.zeros_like(g)], -1)


def log_density(p: dict, x: torch.Tensor, y: torch.Tensor, K: int, gate: str) -> torch.Tensor:
    """log p(y | x) [R, n] for parameters p (each [R, ...]); x, y [R, n]."""
    g = _logits(p, x, gate)
    if gate == "topk" and K < g.shape[-1]:
        kth = g.topk(K, -1).values[..., -1:]
        g = g.masked_fill(g < kth, float("-inf"))
    log_gate = g.log_softmax(-1)
    s = p["s"][:, None, :]
    mean = p["a"][:, None, :] * x[..., None] + p["c"][:, None, :]
    log_normal = -0.5 * ((y[..., None] - mean) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(log_gate + log_normal, -1)


def sample(truth: dict, fit: Fit, n: int, reps: int, gen: torch.Generator):
    x = torch.rand(reps, n, generator=gen, dtype=torch.float64) * 2 - 1
    p = {k: v.expand(reps, *v.shape) for k, v in truth.items()}
    g = _logits(p, x, fit.gate)
    if fit.gate == "topk" and fit.true_K == 1:
        choice = g.argmax(-1)
    else:  # every truth but the top-1 one has two experts, both selected
        choice = torch.multinomial(g.softmax(-1).reshape(-1, g.shape[-1]), 1, generator=gen).view(reps, n)
    a, c, s = (truth[k][choice] for k in ("a", "c", "s"))
    y = a * x + c + s * torch.randn(reps, n, generator=gen, dtype=torch.float64)
    return x, y


def _init(truth: dict, fit: Fit, reps: int, gen: torch.Generator) -> dict:
    noise = lambda shape: 0.1 * torch.randn(reps, *shape, generator=gen, dtype=torch.float64)
    p = {}
    extra = fit.k - truth["a"].shape[0]
    for key in ("b1", "b0", "a", "c", "s"):
        v = truth[key]
        if extra > 0:
            v = torch.cat([v, v[:1].expand(extra)])  # extra experts: copies of the first, split by the noise
        p[key] = v.expand(reps, *v.shape).clone() + noise(v.shape)
    p["s"] = p["s"].abs().clamp_min(0.05)
    if fit.gate == "temperature":
        p["tau"] = truth["tau"].expand(reps).clone() + noise(())
    return p


def _nll(raw: dict, x, y, fit: Fit) -> torch.Tensor:
    p = {k: (v.exp() if k in ("s", "tau") else v) for k, v in raw.items()}
    return -log_density(p, x, y, fit.K, fit.gate).mean(-1)


@torch.no_grad()
def _search_gates(raw: dict, x, y, fit: Fit, span: float, points: int = 15) -> None:
    """Coordinate search over each expert's gate intercept and slope, per replicate: under top-K gating the likelihood
    is piecewise constant in where the selection switches, so gradients cannot move those boundaries."""
    for key in ("b0", "b1"):
        for i in range(raw[key].shape[1]):
            base = raw[key][:, i].clone()
            best, best_nll = base.clone(), _nll(raw, x, y, fit)
            for d in torch.linspace(-span, span, points, dtype=torch.float64):
                raw[key][:, i] = base + d
                nll = _nll(raw, x, y, fit)
                better = nll < best_nll
                best = torch.where(better, base + d, best)
                best_nll = torch.where(better, nll, best_nll)
            raw[key][:, i] = best


def fit_mle(x, y, truth: dict, fit: Fit, steps: int, gen: torch.Generator) -> dict:
    """Batched maximum likelihood over the replicates: Adam with a cosine-decayed rate, from the truth plus noise; for
    top-K gates, coordinate searches over the gate parameters at four points of the run, each finer."""
    reps = x.shape[0]
    init = _init(truth, fit, reps, gen)
    raw = {k: (v.log() if k in ("s", "tau") else v).clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.Adam(raw.values(), lr=0.05)
    searches = {int(steps * f): span for f, span in ((0.0, 0.5), (0.25, 0.2), (0.5, 0.08), (0.75, 0.03), (0.95, 0.01))}
    for step in range(steps):
        if fit.gate == "topk" and step in searches:
            _search_gates({k: v.data for k, v in raw.items()}, x, y, fit, searches[step])
        for g in opt.param_groups:
            g["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / steps)) + 1e-4
        p = {k: (v.exp() if k in ("s", "tau") else v) for k, v in raw.items()}
        nll = -log_density(p, x, y, fit.K, fit.gate).mean(-1).sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
    return {k: (v.exp() if k in ("s", "tau") else v).detach() for k, v in raw.items()}


@torch.no_grad()
def hellinger(p: dict, truth: dict, fit: Fit, grid: int = 201) -> torch.Tensor:
    """E_x Hellinger distance per replicate [R], x uniform on [-1, 1], on a y grid."""
    reps = next(iter(p.values())).shape[0]
    xs = torch.linspace(-1, 1, 101, dtype=torch.float64)
    ys = torch.linspace(-3, 3, grid, dtype=torch.float64)
    X = xs[:, None].expand(-1, grid).reshape(1, -1).expand(reps, -1)
    Y = ys[None, :].expand(len(xs), -1).reshape(1, -1).expand(reps, -1)
    tp = {k: v.expand(reps, *v.shape) for k, v in truth.items()}
    K_true = fit.true_K if fit.gate == "topk" else 0
    lp = log_density(p, X, Y, fit.K, fit.gate).view(reps, len(xs), grid)
    lq = log_density(tp, X, Y, K_true, fit.gate).view(reps, len(xs), grid)
    # the Bhattacharyya coefficient, each density normalised on the grid (so the grid's own error cancels)
    bc = torch.exp(0.5 * (lp + lq)).sum(-1) / torch.sqrt(lp.exp().sum(-1) * lq.exp().sum(-1))
    return torch.sqrt((1 - bc).clamp_min(0)).mean(-1)


@torch.no_grad()
def voronoi_errors(p: dict, truth: dict, fit: Fit) -> dict:
    """Per replicate: the largest in-cell parameter distance for unsplit and split cells, and the gate's error."""
    est = torch.stack([p["a"], p["c"], p["s"]], -1)  # [R, k, 3]
    tru = torch.stack([truth["a"], truth["c"], truth["s"]], -1)  # [k*, 3]
    dist = torch.cdist(est, tru.expand(est.shape[0], -1, -1))  # [R, k, k*]
    cell = dist.argmin(-1)
    unsplit, split = [], []
    for r in range(est.shape[0]):
        u, s_ = [], []
        for j in range(tru.shape[0]):
            members = (cell[r] == j).nonzero().squeeze(1)
            err = float(dist[r, members, j].max()) if len(members) else float(dist[r, :, j].min())
            (s_ if len(members) > 1 else u).append(err)
        unsplit.append(max(u) if u else float("nan"))
        split.append(max(s_) if s_ else float("nan"))
    out = {"unsplit": torch.tensor(unsplit), "split": torch.tensor(split)}
    if fit.gate != "topk":
        gate = torch.stack([p["b1"][:, 0], p["b0"][:, 0]], -1)
        tgate = torch.stack([truth["b1"][0], truth["b0"][0]])
        if fit.gate == "temperature":
            gate = torch.cat([gate, p["tau"][:, None]], -1)
            tgate = torch.cat([tgate, truth["tau"][None]])
            ratio = torch.stack([p["b1"][:, 0], p["b0"][:, 0]], -1) / p["tau"][:, None]
            out["gate_ratio"] = (ratio - tgate[:2] / truth["tau"]).norm(dim=-1)
        out["gate"] = (gate - tgate).norm(dim=-1)
    return out


def slope(ns, errors: list[torch.Tensor], boots: int = 1000, seed: int = 0) -> dict:
    """Least-squares slope of log(mean error) on log n, and a bootstrap over replicates."""
    errors = [e.double()[~torch.isnan(e.double())] for e in errors]  # replicates without such a cell drop out
    if any(len(e) == 0 for e in errors):
        return {"slope": float("nan"), "ci": [float("nan"), float("nan")], "replicates": [len(e) for e in errors]}
    ln = torch.log(torch.tensor(ns, dtype=torch.float64))
    A = torch.stack([ln, torch.ones_like(ln)], 1)

    def fit_slope(means):
        return float(torch.linalg.lstsq(A, torch.log(means)[:, None]).solution[0, 0])
    means = torch.stack([e.mean() for e in errors])
    g = torch.Generator().manual_seed(seed)
    bs = []
    for _ in range(boots):
        m = torch.stack([e[torch.randint(len(e), (len(e),), generator=g)].mean() for e in errors])
        bs.append(fit_slope(m.clamp_min(1e-300)))
    bs.sort()
    return {"slope": fit_slope(means), "ci": [bs[int(0.025 * boots)], bs[int(0.975 * boots) - 1]],
            "replicates": [len(e) for e in errors]}


def gating_theory(out, full: bool = False, progress: bool = True, **_) -> dict:
    """Density and parameter error against n for every fit in FITS; slopes beside the papers' predictions."""
    from tqdm.auto import tqdm

    out = Path(out)
    ns = [int(round(v)) for v in torch.logspace(3, 4.5, 7).tolist()] if full else [1000, 3000, 10000]
    reps, steps = (10, 300) if full else (6, 200)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for fit in tqdm(FITS, desc="gating theory", disable=not progress):
        truth = _truth(fit)
        per_n = []
        for n in ns:
            x, y = sample(truth, fit, n, reps, gen)
            p = fit_mle(x, y, truth, fit, steps, gen)
            errs = voronoi_errors(p, truth, fit)
            per_n.append({"n": n, "hellinger": hellinger(p, truth, fit), **errs})
        row = {"prediction": fit.prediction, "k": fit.k, "K": fit.K, "gate": fit.gate,
               "by_n": [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()} for r in per_n]}
        for key in ("hellinger", "unsplit", "split", "gate", "gate_ratio"):
            if key in per_n[0] and not all(torch.isnan(r[key]).all() for r in per_n):
                row[f"slope_{key}"] = slope(ns, [r[key] for r in per_n])
        results[fit.name] = row
    result = {"ns": ns, "replicates": reps, "adam_steps": steps, "truth_topk": TRUE_TOPK, "truth_dense": TRUE_DENSE,
              "fits": results}

    def cell(r, key):
        s = r.get(f"slope_{key}")
        return f"{s['slope']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s else "-"
    md = [f"# Top-K sparse softmax gating on synthetic data: slopes of log error on log n (n = {ns[0]}..{ns[-1]}, "
          f"{reps} replicates, 95% bootstrap intervals)", "",
          "| fit | density (Hellinger) | unsplit experts | split experts | gate | gate ratio b/tau | predicted |",
          "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        md.append(f"| {name} | {cell(r, 'hellinger')} | {cell(r, 'unsplit')} | {cell(r, 'split')} | {cell(r, 'gate')} | "
                  f"{cell(r, 'gate_ratio')} | {r['prediction']} |")
    md += ["", "Mean Hellinger distance by n: " + "; ".join(
        f"{name}: " + ", ".join(f"{sum(b['hellinger']) / len(b['hellinger']):.4f}" for b in r["by_n"])
        for name, r in results.items())]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        axes[0].plot(ns, [sum(b["hellinger"]) / reps for b in r["by_n"]], marker="o", label=name)
        key = "gate" if r["gate"] != "topk" else ("split" if "slope_split" in r else "unsplit")
        axes[1].plot(ns, [sum(b[key]) / reps for b in r["by_n"]], marker="o", label=f"{name}: {key}")
    for ax, title in zip(axes, ("density error (mean Hellinger)", "parameter error")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n")
        ax.set_title(title)
        ax.legend(fontsize=7)
    _write(out, "gating-theory", result, "\n".join(md) + "\n", fig)
    return result


RUNNERS = {"gating-theory": gating_theory}
