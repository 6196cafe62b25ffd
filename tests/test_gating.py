"""sparsen.train.gating: the top-K gated Gaussian mixture's density by hand, the Hellinger distance and the slope."""

import math

import pytest
import torch

from sparsen.train.gating import FITS, TRUE_TOP2, TRUE_TOPK, _truth, fit_mle, hellinger, log_density, sample, slope


def _p(d, reps=1):
    return {k: torch.tensor(v, dtype=torch.float64).expand(reps, *torch.tensor(v).shape) if isinstance(v, list)
            else torch.tensor([v], dtype=torch.float64) for k, v in d.items()}


def test_top1_density_is_the_selected_experts_gaussian():
    p = _p(TRUE_TOPK)
    x = torch.tensor([[0.4, -0.7]], dtype=torch.float64)
    y = torch.tensor([[0.1, 0.9]], dtype=torch.float64)
    got = log_density(p, x, y, 1, "topk")
    # x = 0.4: logits (0.8, -0.8) -> expert 0, mean 0.4 + 0.5; x = -0.7: expert 1, mean 0.7 - 0.5
    norm = lambda y_, m, s: -0.5 * ((y_ - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
    assert got[0, 0].item() == pytest.approx(norm(0.1, 0.9, 0.3))
    assert got[0, 1].item() == pytest.approx(norm(0.9, 0.2, 0.3))
    both = log_density(p, x, y, 2, "topk")  # K = 2: the softmax mixture of both
    w = torch.softmax(torch.tensor([0.8, -0.8]), 0)
    mix = math.log(w[0] * math.exp(norm(0.1, 0.9, 0.3)) + w[1] * math.exp(norm(0.1, -0.4 - 0.5 + 0.0 * 0, 0.3)))
    assert both[0, 0].item() == pytest.approx(mix, rel=1e-6)


@pytest.mark.parametrize("fit", [f for f in FITS if f.k == 2], ids=lambda f: f.name)
def test_hellinger_is_zero_at_the_truth_and_the_slope_recovers_a_power_law(fit):
    truth = _truth(fit)
    p = {k: v.expand(2, *v.shape) for k, v in truth.items()}
    assert torch.allclose(hellinger(p, truth, fit), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    ns = [100, 1000, 10000]
    errs = [torch.full((5,), n ** -0.5, dtype=torch.float64) * (1 + 0.01 * torch.arange(5)) for n in ns]
    s = slope(ns, errs, boots=50)
    assert s["slope"] == pytest.approx(-0.5, abs=1e-6) and s["ci"][0] <= -0.5 <= s["ci"][1] + 1e-9


def test_the_exact_top1_fit_gets_closer_with_more_data():
    fit = FITS[0]
    truth = _truth(fit)
    g = torch.Generator().manual_seed(0)
    errs = []
    for n in (300, 10000):
        x, y = sample(truth, fit, n, 4, g)
        errs.append(float(hellinger(fit_mle(x, y, truth, fit, 60, g), truth, fit).mean()))
    assert errs[1] < errs[0]


def test_the_top2_truth_mixes_both_experts_at_every_x():
    fit = next(f for f in FITS if f.true_K == 2 and f.k == 2)
    truth = _truth(fit)
    assert truth["a"].tolist() == TRUE_TOP2["a"]
    x, y = sample(truth, fit, 20000, 1, torch.Generator().manual_seed(0))
    right = x > 0.8  # expert 0's softmax weight here is sigmoid(3 x + 0.3) ~ 0.94-0.97: expert 1 still serves some
    resid0 = (y - (x + 0.5)).abs() < 0.9  # within 3 sd of expert 0's mean
    share0 = float(resid0[right].double().mean())
    w0 = torch.sigmoid(3 * x[right] + 0.3).mean().item()
    assert 0.85 < share0 < 0.995 and share0 == pytest.approx(w0, abs=0.03)
