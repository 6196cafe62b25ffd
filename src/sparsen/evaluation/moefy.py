"""Expert-level against neuron-level MLP sparsity: a MoEfied model's perplexity against k, beside TEAL and CATS
restricted to the MLP at the same share of MLP bytes skipped.

One moefy calibration serves every k (the experts and routers do not depend on k); its oracle twin reads each
token's truly largest experts (the same experts, an exact router: what routing could reach). Neuron-level: TEAL's
thresholds on gate, up and down only (q, k, v, o dense) at level L = 1 - k / E, and CATS at 1.5 L on up and down
(gate stays dense under CATS, so 1.5 L of two thirds of the MLP is L of it). Every configuration is evaluated in
one window-major sweep (shared dense references, decode protocol).
"""

from __future__ import annotations

import copy

from sparsen.data import EVAL_CORPUS
from sparsen.errors import SparsenError
from sparsen.evaluation import evaluate_many
from sparsen.methods import calibrate, config_for
from sparsen.methods.moefy import mlp_share, plan_at_k
from sparsen.methods.registry import MAX_LEVEL

MLP = ("gate", "up", "down")


def mlp_only(plan):
    """A plan with its attention linears (q, k, v, o) left dense."""
    out = copy.copy(plan)
    out.sites = {s: (dict(e) if s.rsplit(".", 1)[1] in MLP else {"rule": "dense"}) for s, e in plan.sites.items()}
    return out


def moefy_plans(lm, ks, experts: int = 16, calib: dict | None = None, oracle: bool = True,
                contiguous_ks=(), neuron: bool = True, progress: bool = True) -> list[dict]:
    """Every configuration of the comparison: [{name, family, k, mlp_level, plan}]."""
    calib = dict(calib or {})
    bad = [k for k in ks if not 1 <= k <= experts]
    if bad:
        raise SparsenError(f"k {bad[0]}: give experts per token from 1 to {experts}")
    rows = []
    base = calibrate(lm, config_for("moefy", sparsity=0.0, experts=experts, k=max(ks), **calib), progress=progress)
    for k in ks:
        rows.append({"name": f"moefy k={k}", "family": "moefy", "k": k, "plan": plan_at_k(base, k)})
        if oracle:
            rows.append({"name": f"moefy-oracle k={k}", "family": "moefy-oracle", "k": k,
                         "plan": plan_at_k(base, k, oracle=True)})
    if contiguous_ks:
        flat = calibrate(lm, config_for("moefy", sparsity=0.0, experts=experts, k=max(contiguous_ks),
                                        clustering="contiguous", **calib), progress=progress)
        rows += [{"name": f"moefy-contiguous k={k}", "family": "moefy-contiguous", "k": k, "plan": plan_at_k(flat, k)}
                 for k in contiguous_ks]
    if neuron:
        share = mlp_share(lm)
        for k in ks:
            level = 1 - k / experts
            if level <= 0:
                continue
            teal = calibrate(lm, config_for("teal", sparsity=level, **calib), progress=progress)
            rows.append({"name": f"teal-mlp L={level:g}", "family": "teal-mlp", "k": k, "plan": mlp_only(teal)})
            if 1.5 * level <= MAX_LEVEL:
                cats = calibrate(lm, config_for("cats", sparsity=1.5 * level * share * 2 / 3, **calib), progress=progress)
                rows.append({"name": f"cats L={level:g}", "family": "cats", "k": k, "plan": cats})
    for r in rows:
        r["mlp_level"] = 1 - r["k"] / experts
    return rows


def moefy_quality(lm, rows: list[dict], windows: int = 40, ctx: int = 1024, corpus: str = EVAL_CORPUS,
                  progress: bool = True) -> dict:
    """Perplexity, KL and achieved sparsity of every configuration (decode protocol, one sweep)."""
    configs = {r["name"]: (lm.model, r["plan"].build_sparsifier(lm)) for r in rows}
    dense, results = evaluate_many(lm, configs, corpus=corpus, ctx=ctx, n_windows=windows, protocol="decode",
                                   progress=progress)
    out = []
    for r in rows:
        res = results[r["name"]]
        per_linear = res.sparsity["per_linear"]
        out.append({k: v for k, v in r.items() if k != "plan"} | {
            "ppl": res.ppl, "nll": res.nll, "kl": res.kl, "top1_agree": res.top1_agree,
            "achieved": res.sparsity["overall"], "added_share": res.sparsity["added_share"],
            "mlp_skipped": sum(per_linear.get(n, 0.0) for n in MLP) / len(MLP)})
    return {"dense": {"ppl": dense.ppl, "nll": dense.nll, "tokens_scored": dense.tokens_scored},
            "corpus": corpus, "ctx": ctx, "windows": windows, "protocol": "decode", "rows": out}
