"""The Python API: the whole workflow in a few verbs, each taking a documented config.

    import sparsen
    lm = sparsen.load_model("smollm2")
    plan = sparsen.calibrate(lm, sparsen.RotateWinaConfig(sparsity=0.53, allocation="global"))
    plan.save("plan.json")
    sparsen.sparsify_(lm, plan)                 # explicit and in place, like torchao's quantize_
    result = sparsen.evaluate(lm, protocol="decode", windows=8)
    engine = sparsen.Engine(lm, plan)
    print(engine.generate_text("The lobster", max_new_tokens=32))

Why these names: ``calibrate`` returns a plan and changes nothing; ``sparsify_`` is the one verb that changes a
model (the trailing underscore is PyTorch's mark of an in-place operation); ``evaluate`` measures whatever the
model now is against its dense self. The command line is a thin layer over these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import sparsen.engine.prefill  # noqa: F401  (registers the C block-sparse prefill kernel with the HF forward)
from sparsen.core.hooks import Sparsifier
from sparsen.core.plan import Plan
from sparsen.data import CALIB_CORPUS, EVAL_CORPUS
from sparsen.errors import SparsenError
from sparsen.evaluation import PROTOCOLS, EvalResult
from sparsen.evaluation import evaluate as _evaluate
from sparsen.methods import calibrate as _calibrate
from sparsen.methods import config_for, method_names
from sparsen.methods.config import MethodConfig
from sparsen.models import LoadedModel, load_model


def _check_model(lm) -> None:
    if not isinstance(lm, LoadedModel):
        raise SparsenError(f"expected a model from sparsen.load_model(...), not {type(lm).__name__}")


def calibrate(lm: LoadedModel, config: MethodConfig, progress: bool = True) -> Plan:
    """Calibrate ``config``'s method on ``lm`` and return the plan; ``lm`` is not changed."""
    _check_model(lm)
    return _calibrate(lm, config, progress=progress)


def sparsify_(lm: LoadedModel, plan: Plan | str) -> Sparsifier:
    """Apply ``plan`` (a Plan or the path of a plan file) to ``lm`` in place: its weight transform, if any, then
    its hooks, attached. Returns the hooks (``.achieved()`` reports the sparsity seen so far). Applying another
    plan to the same model replaces the hooks; a second, different transform is refused (load the model again)."""
    _check_model(lm)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan.check_model(lm)
    if lm.sparsifier is not None:
        lm.sparsifier.detach()
        lm.sparsifier = lm.plan = None
    plan.transform_(lm)
    sp = plan.build_sparsifier(lm).attach()
    lm.plan, lm.sparsifier = plan, sp
    return sp


def unsparsify_(lm: LoadedModel) -> None:
    """Remove the hooks ``sparsify_`` attached (a folded transform stays: it computes the same function)."""
    _check_model(lm)
    if lm.sparsifier is not None:
        lm.sparsifier.detach()
    lm.plan = lm.sparsifier = None


def evaluate(lm: LoadedModel, protocol: str = "full", windows: int | None = None, ctx: int = 1024,
             corpus: str = EVAL_CORPUS, progress: bool = True) -> EvalResult:
    """Perplexity of ``lm`` on ``windows`` windows of ``ctx`` tokens of ``corpus``; if a plan was applied with
    ``sparsify_``, also KL(dense || sparse), top-1 agreement and the sparsity achieved. ``protocol``: 'full'
    (every position scored) or 'decode' (first half of each window dense, second half sparse and scored)."""
    _check_model(lm)
    if protocol not in PROTOCOLS:
        raise SparsenError(f"protocol '{protocol}' is unknown: use one of {', '.join(PROTOCOLS)}")
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int) or windows < 1):
        raise SparsenError(f"windows {windows!r}: give a whole number of 1 or more, or None for all")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise SparsenError(f"ctx {ctx!r}: give a window of at least 2 tokens")
    plan_name = lm.plan.method if lm.plan is not None else None
    return _evaluate(lm, corpus=corpus, ctx=ctx, n_windows=windows, protocol=protocol, sparsifier=lm.sparsifier,
                     progress=progress, plan_name=plan_name)


@dataclass
class Profile:
    """Where a model is sparse: per layer and input, and (optionally) the per-group sensitivity."""

    model: str
    corpus: str
    tokens: int
    summary: dict
    layers: list
    sensitivity: dict | None
    raw: dict

    def table(self) -> str:
        from sparsen.measure.profile import format_table

        return format_table(self.raw)

    def plot(self, out_dir) -> list:
        from sparsen.measure.plots import plot_profile

        return plot_profile(self.raw, out_dir)

    def to_dict(self) -> dict:
        return self.raw


def profile(lm: LoadedModel, tokens: int = 8192, ctx: int = 1024, corpus: str = CALIB_CORPUS, attention: bool = True,
            sensitivity_windows: int = 2, progress: bool = True) -> Profile:
    """Activation statistics of ``lm`` per layer and input (``sparsen profile``)."""
    from sparsen.measure.profile import run_profile

    _check_model(lm)
    raw = run_profile(lm, corpus=corpus, tokens=tokens, ctx=ctx, attention=attention,
                      sensitivity_windows=sensitivity_windows, progress=progress)
    return Profile(model=raw["model"], corpus=raw["corpus"], tokens=raw["tokens"], summary=raw["summary"],
                   layers=raw["layers"], sensitivity=raw["sensitivity"], raw=raw)


def __getattr__(name):  # the engine needs its C library: imported on first use only
    if name == "Engine":
        from sparsen.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["LoadedModel", "load_model", "calibrate", "sparsify_", "unsparsify_", "evaluate", "profile", "Profile",
           "EvalResult", "Plan", "Sparsifier", "config_for", "method_names"]
