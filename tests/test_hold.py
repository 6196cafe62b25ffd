"""hold='prompt': thresholds rescaled per prompt so the sparsity holds on text unlike the calibration text."""

import pytest
import torch

import sparsen
from sparsen.core.hooks import prompt_scale
from sparsen.core.rules import ThresholdRule
from sparsen.evaluation import evaluate_many

SMALL = {"tokens": 2048, "ctx": 256}


def test_prompt_scale_puts_the_level_below_the_scaled_thresholds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, 64, generator=g) * torch.rand(64, generator=g) * 3
    t = torch.rand(64, generator=g) + 0.1
    t[5] = 0.0  # a channel the plan keeps dense
    for level in (0.1, 0.5, 0.83):
        c = prompt_scale(ThresholdRule(t), x, level)
        zeroed = (x.abs() <= c * t).float().mean()
        assert float(zeroed) == pytest.approx(level, abs=2 / x.numel() + 1e-6)
    assert prompt_scale(ThresholdRule(0.5), x, 0.0) == 1.0


misses = {}


@pytest.mark.parametrize("method", ["teal", "wina", "rotate"])
def test_a_prompt_hold_plan_lands_on_its_target_where_a_calibrated_one_misses(method):
    lm = sparsen.load_model("tiny-llama")
    held = sparsen.calibrate(lm, sparsen.config_for(method, sparsity=0.5, hold="prompt", **SMALL), progress=False)
    plain = sparsen.calibrate(lm, sparsen.config_for(method, sparsity=0.5, **SMALL), progress=False)
    assert held.hold == "prompt" and plain.hold == "calibrated"
    # the same thresholds, plus each site's prompt scale on the calibration text
    assert {k: {f: v for f, v in e.items() if f != "prompt_scale"} for k, e in held.sites.items()} == plain.sites
    assert all(e["prompt_scale"] > 0 for e in held.sites.values() if e.get("rule") in ("threshold", "channel_threshold"))
    for corpus in ("python-code", "licences"):
        got = {}
        for name, plan in (("held", held), ("plain", plain)):
            m = sparsen.load_model("tiny-llama")
            sparsen.sparsify_(m, plan)
            got[name] = sparsen.evaluate(m, protocol="decode", windows=4, ctx=256, corpus=corpus, progress=False)
        assert abs(got["held"].sparsity["overall"] - 0.5) < 0.012, (corpus, got["held"].sparsity["overall"])
        misses[method, corpus] = abs(got["plain"].sparsity["overall"] - 0.5)
        assert got["held"].ppl != got["plain"].ppl
        # under 'full' there is no prompt: the calibrated thresholds, the same numbers as the plain plan
        m = sparsen.load_model("tiny-llama")
        sparsen.sparsify_(m, held)
        full = sparsen.evaluate(m, protocol="full", windows=1, ctx=256, corpus=corpus, progress=False)
        m2 = sparsen.load_model("tiny-llama")
        sparsen.sparsify_(m2, plain)
        assert full.ppl == sparsen.evaluate(m2, protocol="full", windows=1, ctx=256, corpus=corpus, progress=False).ppl


def test_the_calibrated_rotation_missed_where_the_held_one_landed():
    if ("rotate", "python-code") not in misses:
        pytest.skip("runs after the parametrized test above")
    assert misses["rotate", "python-code"] > 0.03  # what hold='prompt' is for (tiny model: 0.452 for 0.5)


def test_the_frontier_sweep_measures_the_prompt_as_a_single_pass_does():
    lm = sparsen.load_model("tiny-llama")
    plan = sparsen.calibrate(lm, sparsen.TealConfig(sparsity=0.5, hold="prompt", **SMALL), progress=False)
    sparsen.sparsify_(lm, plan)
    alone = sparsen.evaluate(lm, protocol="decode", windows=2, ctx=256, corpus="licences", progress=False)
    sparsen.unsparsify_(lm)
    _, many = evaluate_many(lm, {"held": (lm.model, plan.build_sparsifier(lm))}, corpus="licences", ctx=256,
                            n_windows=2, protocol="decode", progress=False)
    assert many["held"].ppl == pytest.approx(alone.ppl, rel=1e-5)
    assert many["held"].sparsity["overall"] == pytest.approx(alone.sparsity["overall"], abs=1e-6)


def test_hold_is_checked():
    with pytest.raises(sparsen.SparsenError, match="hold 'sometimes'"):
        sparsen.TealConfig(sparsity=0.5, hold="sometimes")
