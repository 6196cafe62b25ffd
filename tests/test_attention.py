"""Decode-time key selection: density 1 is dense, the sparse path runs and is accounted, each selector equals an
independent re-statement of its rule, plans round-trip and compose, bad input is refused in one line."""

import copy
import math

import pytest
import torch

from sparsen.core.attention import budget_tokens, prime
from sparsen.core.plan import Plan
from sparsen.errors import SparsenError
from sparsen.methods.attention import attention_method_names, attention_plan, parse_attention_spec
from sparsen.models.kv import cache_of, with_cache

CALIB = {"calib_tokens": 256, "calib_ctx": 128}


def _config(name, **kw):
    extra = "".join(f"+{k}={v}" for k, v in {**(CALIB if name in ("double-sparsity", "sketch") else {}), **kw}.items())
    return parse_attention_spec(name + extra)


@pytest.fixture(scope="module")
def ids(tiny_llama):
    torch.manual_seed(0)
    return torch.randint(0, tiny_llama.adapter.vocab_size, (1, 160))


@pytest.mark.parametrize("name", ["oracle-topk", "oracle-topp", "sink-window", "h2o", "quest", "double-sparsity",
                                  "sketch"])
def test_full_budget_reproduces_dense(tiny_llama, ids, name):
    lm = tiny_llama
    full = {"p": 1.0} if name == "oracle-topp" else {"density": 1.0}
    plan = attention_plan(lm, _config(name, **full), progress=False)
    with torch.no_grad():
        ref = lm.model(ids).logits
        sp = plan.build_sparsifier(lm, dense_prefix=80)
        with sp:
            out = lm.model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    att = sp.achieved()["attention"]
    assert att["density"] == pytest.approx(1.0) and att["queries"] == 80
    assert lm.config._attn_implementation == "sdpa"  # restored on detach


@pytest.mark.parametrize("name", ["oracle-topk", "sink-window", "h2o", "quest", "double-sparsity", "sketch"])
def test_sparse_path_runs_at_its_budget(tiny_llama, ids, name):
    lm = tiny_llama
    plan = attention_plan(lm, _config(name, density=0.25, dense_layers=1), progress=False)
    with torch.no_grad():
        ref = lm.model(ids).logits
        sp = plan.build_sparsifier(lm, dense_prefix=80)
        with sp:
            out = lm.model(ids).logits
    assert torch.allclose(out[:, :80], ref[:, :80], atol=1e-4)  # the dense prompt is untouched
    assert not torch.allclose(out[:, 80:], ref[:, 80:], atol=1e-3)
    att = sp.achieved()["attention"]
    assert att["sparse_layers"] == [1, 2]
    # ceil(0.25 n) keys per query (Quest rounds up to whole pages and always reads the current one)
    expected = sum(math.ceil(0.25 * (t + 1)) for t in range(80, 160)) / sum(t + 1 for t in range(80, 160))
    if name == "quest":
        assert expected <= att["density"] < expected + 0.2
    else:
        assert att["density"] == pytest.approx(expected, abs=1e-3)
    assert att["density_all_layers"] == pytest.approx((2 * att["density"] + 1) / 3)


def test_cache_path_equals_single_pass(tiny_llama, ids):
    """A shared dense prefix, then the tail through the sparse path (how attn-eval runs) = one pass with a dense prefix."""
    from sparsen.core.attention import capturing_prefix_mass

    lm = tiny_llama
    for name in ("h2o", "quest"):
        plan = attention_plan(lm, _config(name, density=0.3), progress=False)
        with torch.no_grad():
            sp = plan.build_sparsifier(lm, dense_prefix=100)
            with sp:
                single = lm.model(ids).logits[:, 100:]
            mass = {}
            with capturing_prefix_mass(lm.adapter, mass):
                cache = cache_of(lm.model(ids[:, :100], use_cache=True))
            sp2 = plan.build_sparsifier(lm)
            prime(sp2, mass)
            with sp2:
                tail = lm.model(ids[:, 100:], **with_cache(lm.model, copy.deepcopy(cache))).logits
        assert torch.allclose(single, tail, atol=1e-4), (name, (single - tail).abs().max())


def _qk(seed=0, n_kv=2, g=2, n=1, nk=70, d=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_kv, g, n, d, generator=gen)
    k = torch.randn(n_kv, nk, d, generator=gen)
    qpos = torch.tensor([nk - 1])
    scores = torch.einsum("hgnd,hkd->hgnk", q, k) / math.sqrt(d)
    return q, k, qpos, scores


def test_quest_reads_the_pages_with_the_largest_bounds():
    from sparsen.methods.attention.quest import Quest

    q, k, qpos, scores = _qk()
    sel = Quest(_config("quest", density=0.3))
    keep = sel.keep(q, k, qpos, scores)[:, 0, 0]  # shared: [n_kv, nk]
    for h in range(2):
        bounds = []
        for p in range(70 // 16):  # complete pages: 4 (the query sits in page 4)
            page = k[h, p * 16:(p + 1) * 16]
            per_head = [float((q[h, j, 0] * torch.where(q[h, j, 0] > 0, page.max(0).values, page.min(0).values)).sum())
                        for j in range(2)]
            for j in range(2):  # an upper bound on every key's score in the page
                assert float((page @ q[h, j, 0]).max()) <= per_head[j] + 1e-5
            bounds.append(sum(per_head))
        n_pages = max(3, math.ceil(math.ceil(0.3 * 70) / 16)) - 1
        best = sorted(range(4), key=lambda p: -bounds[p])[:n_pages]
        want = torch.zeros(70, dtype=torch.bool)
        for p in best:
            want[p * 16:(p + 1) * 16] = True
        want[64:] = True  # the current page
        assert torch.equal(keep[h], want)


def test_sink_window_and_oracle_sets():
    from sparsen.methods.attention.oracle import OracleTopK
    from sparsen.methods.attention.sink_window import SinkWindow

    q, k, qpos, scores = _qk()
    keep = SinkWindow(_config("sink-window", density=0.2)).keep(q, k, qpos, scores)[0, 0, 0]
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3] + list(range(60, 70))  # ceil(0.2 * 70) = 14
    keep = OracleTopK(_config("oracle-topk", density=0.2)).keep(q, k, qpos, scores)[:, 0, 0]
    probs = torch.softmax(scores, -1).sum(1)[:, 0]  # summed over the group
    for h in range(2):
        assert set(keep[h].nonzero().flatten().tolist()) == set(probs[h].topk(14).indices.tolist())


def test_sketch_basis_is_the_best_rank_r_bilinear_form():
    """Eckart-Young: the bilinear basis's expected squared logit error at rank r is the sum of the discarded squared
    singular values, no larger than a PCA basis of the queries or the keys; at full rank q^T A B^T k = q^T k."""
    from sparsen.methods.attention.sketch import bilinear_basis

    g = torch.Generator().manual_seed(0)
    d, r = 12, 4
    Mq, Mk = torch.randn(2, d, d, generator=g, dtype=torch.float64), torch.randn(2, d, d, generator=g, dtype=torch.float64)
    cq = Mq @ Mq.transpose(1, 2)
    ck = Mk @ torch.diag(torch.linspace(0.1, 3, d, dtype=torch.float64)) @ Mk.transpose(1, 2)
    A, B = bilinear_basis(cq, ck)
    assert torch.allclose(A @ B.transpose(1, 2), torch.eye(d, dtype=torch.float64).expand(2, d, d), atol=1e-6)

    def error(P, Q):  # E[(q^T (I - P Q^T) k)^2] for independent q, k of second moments cq, ck
        E = torch.eye(d, dtype=torch.float64) - P @ Q.transpose(1, 2)
        return torch.einsum("nij,njk,nkl,nil->n", cq, E, ck, E)

    lq, lk = torch.linalg.cholesky(cq), torch.linalg.cholesky(ck)
    sv = torch.linalg.svdvals(lq.transpose(1, 2) @ lk)
    best = error(A[:, :, :r], B[:, :, :r])
    assert torch.allclose(best, (sv[:, r:] ** 2).sum(1), rtol=1e-4)
    for c in (cq, ck):
        V = torch.linalg.eigh(c).eigenvectors.flip(-1)[:, :, :r]
        assert (best <= error(V, V) + 1e-9).all()


def test_sketch_keeps_the_top_estimated_keys_with_sinks_and_window():
    from sparsen.methods.attention.sketch import Sketch

    q, k, qpos, scores = _qk()
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(2, 2, 8, 8, generator=g)).Q  # any [2, n_kv, d, d]
    cfg = _config("sketch", density=0.3, rank=3, sinks=2, local=4)
    keep = Sketch(cfg, basis, 0.5).keep(q, k, qpos, scores)[:, 0, 0]
    budget = math.ceil(0.3 * 70)
    for h in range(2):
        A, B = basis[0, h, :, :3], basis[1, h, :, :3]
        lab = k[h] @ B
        step = lab.abs().max(1).values / 127
        lab = torch.round(lab / step[:, None]) * step[:, None]  # int8 with a scale per key
        est = sum(torch.softmax((q[h, j, 0] @ A) @ lab.T * 0.5, -1) for j in range(2))
        forced = [0, 1, 66, 67, 68, 69]
        rest = sorted((i for i in range(70) if i not in forced), key=lambda i: -float(est[i]))[: budget - len(forced)]
        assert set(keep[h].nonzero().flatten().tolist()) == set(forced + rest)


def test_h2o_equals_a_restated_rule():
    """H2O: the new key enters; over budget, the held key outside the recent window with least accumulated mass
    leaves for good; the mass of what each query reads accumulates. Re-stated here one query at a time."""
    from sparsen.methods.attention.h2o import H2O

    gen = torch.Generator().manual_seed(3)
    n_kv, g, d, P, T = 1, 2, 8, 20, 30
    q = torch.randn(n_kv, g, T, d, generator=gen)
    k = torch.randn(n_kv, T, d, generator=gen)
    prefix_mass = torch.rand(n_kv, P, generator=gen)
    qpos = torch.arange(P, T)
    scores = torch.einsum("hgnd,hkd->hgnk", q[:, :, P:], k)
    scores = scores.masked_fill(torch.arange(T)[None, :] > qpos[:, None], -math.inf)
    sel = H2O(_config("h2o", density=0.4))
    sel.observe_prefix(prefix_mass)
    got = sel.keep(q[:, :, P:], k, qpos, scores)[0, 0]

    mass = {j: float(prefix_mass[0, j]) for j in range(P)}
    held = set(range(P))
    for i, t in enumerate(range(P, T)):
        held.add(t)
        mass.setdefault(t, 0.0)
        b = math.ceil(0.4 * (t + 1))
        recent = math.ceil(0.5 * b)
        window = set(range(t + 1 - recent, t + 1))
        while len(held) > b:
            held.remove(min(held - window, key=lambda j: mass[j]))
        assert set(got[i].nonzero().flatten().tolist()) == held, t
        for h in range(g):
            s = torch.tensor([float(scores[0, h, i, j]) for j in sorted(held)])
            for j, p in zip(sorted(held), torch.softmax(s, 0).tolist()):
                mass[j] += p


def test_budget_tokens():
    n = torch.tensor([1, 10, 100])
    assert budget_tokens(n, 0.125, None).tolist() == [1, 2, 13]
    assert budget_tokens(n, None, 32).tolist() == [1, 10, 32]


def test_plan_round_trip_and_composition(tiny_llama, ids, tmp_path):
    import sparsen

    lm = tiny_llama
    plan = attention_plan(lm, _config("double-sparsity", density=0.25, channels=4), progress=False)
    plan.save(tmp_path / "ds.json")
    loaded = Plan.load(tmp_path / "ds.json")
    assert loaded.attention == plan.attention and set(loaded.tensors) == set(plan.tensors)
    teal = sparsen.calibrate(lm, sparsen.TealConfig(sparsity=0.3, tokens=256, ctx=128), progress=False)
    both = attention_plan(lm, _config("double-sparsity", density=0.25, channels=4), base=teal, progress=False)
    both.save(tmp_path / "both.json")
    both = Plan.load(tmp_path / "both.json")
    with torch.no_grad():
        outs = []
        for p in (loaded, both):
            sp = p.build_sparsifier(lm, dense_prefix=80)
            with sp:
                outs.append(lm.model(ids).logits)
            a = sp.achieved()
            assert a["attention"]["density"] == pytest.approx(0.25, abs=0.01)
        assert a["overall"] > 0.2  # the linear rules ran too
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("spec, message", [
    ("quest@0", "outside (0, 1]"), ("quest@1.5", "outside (0, 1]"), ("quest@0t", "1 or more"),
    ("nosuch@1/8", "unknown attention method"), ("quest@1/8+colour=red", "has no field 'colour'"),
    ("quest@eighth", "attention budget"), ("oracle-topp@p1.2", "outside (0, 1]"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(SparsenError) as e:
        parse_attention_spec(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_method_is_registered():
    assert attention_method_names() == ["oracle-topk", "oracle-topp", "sink-window", "h2o", "quest", "double-sparsity",
                                        "sketch", "block-topk", "xattention", "vertical-slash", "flexprefill"]
