import math

import numpy as np
import pytest
import torch

from sparsen.measure import ActivationStats, attention_coverage, mass_share


def test_gaussian_statistics_match_theory():
    torch.manual_seed(0)
    x = torch.randn(4000, 256)
    st = ActivationStats(256)
    for chunk in x.split(1000):
        st.update(chunk)
    r = st.result()
    assert r["tokens"] == 4000
    assert r["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert r["std"] == pytest.approx(1.0, abs=0.01)
    for t, frac in r["below_abs"].items():  # P(|X| < t) = erf(t / sqrt 2)
        assert frac == pytest.approx(math.erf(float(t) / math.sqrt(2)), abs=0.003)
    assert r["abs_quantiles"]["0.5"] == pytest.approx(0.6745, rel=0.03)  # median of |N(0,1)|
    assert r["abs_quantiles"]["0.9"] == pytest.approx(1.6449, rel=0.03)
    # share of largest entries holding 90% of E[x^2] for a Gaussian: solve E[x^2 1{|x|>c}] = 0.9
    from scipy import optimize, stats

    c = optimize.brentq(lambda c: 2 * (c * stats.norm.pdf(c) + stats.norm.sf(c)) - 0.9, 0.01, 5)
    assert r["l2_share"]["0.9"] == pytest.approx(2 * stats.norm.sf(c), abs=0.01)


def test_heavy_tailed_is_more_compressible_than_gaussian():
    torch.manual_seed(0)
    gauss, heavy = ActivationStats(512), ActivationStats(512)
    gauss.update(torch.randn(500, 512))
    heavy.update(torch.distributions.StudentT(3.0).sample((500, 512)))
    g, h = gauss.result(), heavy.result()
    assert h["kurtosis"] > 2 * g["kurtosis"]
    assert h["l2_share"]["0.9"] < g["l2_share"]["0.9"] - 0.05


def test_mass_share_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 33))
    got = mass_share(torch.tensor(x), (0.5, 0.9, 0.99)).numpy()
    for i, row in enumerate(x):
        sq = np.sort(row**2)[::-1]
        c = np.cumsum(sq) / sq.sum()
        for j, f in enumerate((0.5, 0.9, 0.99)):
            assert got[i, j] == pytest.approx((np.argmax(c >= f) + 1) / 33)
    one_hot = torch.zeros(1, 10)
    one_hot[0, 3] = 5.0
    assert mass_share(one_hot, (0.9,)).item() == pytest.approx(0.1)


def test_attention_coverage_known_patterns():
    T = 100
    uniform = torch.tril(torch.ones(T, T))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]
    cov = attention_coverage(uniform, (0.9,), min_keys=T)  # only the last query (100 keys)
    assert cov.item() == pytest.approx(0.9, abs=0.011)
    sink = torch.zeros(1, 2, T, T)
    sink[..., 0] = 1.0  # every query attends to the first token only
    cov = attention_coverage(sink, (0.9, 0.95), min_keys=1)
    expected = (1.0 / torch.arange(1, T + 1)).mean().item()
    assert cov.shape == (2, 2) and torch.allclose(cov, torch.full((2, 2), expected))
