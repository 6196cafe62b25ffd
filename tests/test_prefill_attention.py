"""Block-sparse prefill: the kernel and the torch path equal dense masked softmax over the same entries, every block
kept is dense, each method's mask equals an independent restatement of its rule, the HF forward runs the pattern on
a prompt's prefill only and accounts for it, plans and specs round-trip, attn-eval runs prefill methods."""

import copy
import json
import math

import pytest
import torch

from sparsen.core.prefill import (
    PrefillPattern,
    block_sparse_attention,
    finish_pattern,
    n_blocks,
    pattern_entries,
    run_prefill,
)
from sparsen.errors import SparsenError
from sparsen.methods.attention import attention_method_names, attention_plan, parse_attention_spec
from sparsen.models.kv import cache_of, with_cache

PREFILL = ["block-topk", "xattention", "vertical-slash", "flexprefill"]


def _kernel():
    import sparsen.engine.prefill as pf

    if not pf.available():
        pytest.skip("the C kernels are not built")
    return pf


def token_mask(p: PrefillPattern, n: int) -> torch.Tensor:
    """The (query, key) entries a pattern reads, token by token: bool [mask_heads, n, n] (written from the
    definition, not from the code under test)."""
    B = p.block
    m = torch.zeros(p.heads, n, n, dtype=torch.bool)
    for h in range(p.heads):
        for t in range(n):
            for j in range(t + 1):
                m[h, t, j] = bool(p.mask[h, t // B, j // B]) or (p.columns is not None and bool(p.columns[h, j])
                                                                 and j // B < t // B)
    return m


def masked_reference(q, k, v, m, scale):
    """Dense softmax with every entry outside ``m`` [mask_heads, n, n] at -inf (query head h: mask h // (H / mh))."""
    H, n, _ = q.shape
    g = H // k.shape[0]
    gm = H // m.shape[0]
    s = torch.einsum("hnd,hkd->hnk", q.double(), k.double().repeat_interleave(g, 0)) * scale
    s = s.masked_fill(~m.repeat_interleave(gm, 0), -math.inf)
    return torch.einsum("hnk,hkd->hnd", torch.softmax(s, -1), v.double().repeat_interleave(g, 0)).float()


def _random(H, n_kv, n, d, B, shared, columns, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, n, d, generator=gen) for h in (H, n_kv, n_kv))
    mh = n_kv if shared else H
    nb = n_blocks(n, B)
    raw = torch.rand(mh, nb, nb, generator=gen) < 0.35
    cols = torch.rand(mh, n, generator=gen) < 0.1 if columns else None
    return q, k, v, finish_pattern(PrefillPattern(raw, B, cols), n, B, (n_kv, H))


CASES = [(4, 2, 150, 16, 16, True, False), (6, 2, 203, 24, 32, False, True), (9, 3, 131, 64, 64, True, True),
         (4, 1, 70, 8, 128, True, True)]


@pytest.mark.parametrize("H, n_kv, n, d, B, shared, columns", CASES)
def test_torch_and_kernel_equal_masked_dense(H, n_kv, n, d, B, shared, columns):
    q, k, v, p = _random(H, n_kv, n, d, B, shared, columns, seed=H + n)
    ref = masked_reference(q, k, v, token_mask(p, n), d ** -0.5)
    got = block_sparse_attention(q, k, v, p, d ** -0.5)
    assert torch.allclose(got, ref, atol=2e-5), (got - ref).abs().max()
    out = _kernel().kernel_attention(q, k, v, p, d ** -0.5, threads=2)
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
    kept, causal = pattern_entries(p, n)
    assert (kept, causal) == (int(token_mask(p, n).sum()), p.heads * n * (n + 1) // 2)


@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_every_block_is_sdpa_dense(backend):
    if backend == "kernel":
        _kernel()
    gen = torch.Generator().manual_seed(1)
    H, n_kv, n, d = 9, 3, 200, 64
    q, k, v = (torch.randn(h, n, d, generator=gen) for h in (H, n_kv, n_kv))
    nb = n_blocks(n, 64)
    p = finish_pattern(torch.ones(n_kv, nb, nb, dtype=torch.bool), n, 64, (n_kv,))
    out, ran = run_prefill(q, k, v, p, d ** -0.5, backend=backend)
    ref = torch.nn.functional.scaled_dot_product_attention(q[None], k.repeat_interleave(3, 0)[None],
                                                           v.repeat_interleave(3, 0)[None], is_causal=True)[0]
    assert ran == backend and torch.allclose(out, ref, atol=2e-5)
    assert pattern_entries(p, n) == (n_kv * n * (n + 1) // 2,) * 2


# --- each method's mask against its rule, restated -------------------------------------------------------------
def _qk(seed=0, n_kv=2, g=2, n=150, d=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_kv, g, n, d, generator=gen), torch.randn(n_kv, n, d, generator=gen)


def _heads(x, shared, reduce="sum"):
    """[n_kv, g, ...] -> per mask head: the group's sum (or mean), or every query head."""
    if shared:
        return x.sum(1) if reduce == "sum" else x.mean(1)
    return x.flatten(0, 1)


def _block_mean(x, B):  # x [n, d]: mean of each block's rows (the last partial)
    return torch.stack([x[i:i + B].mean(0) for i in range(0, x.shape[0], B)])


def _causal_probs(q, k, scale, q0):  # q [m, d] at positions q0.., k [n, d] -> causal softmax rows
    s = (q @ k.T) * scale
    for i in range(q.shape[0]):
        s[i, q0 + i + 1:] = -math.inf
    return torch.softmax(s, -1)


def _top_set(values, count):
    """Indices of the ``count`` largest, ties by position (a sort restated with Python's)."""
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    return set(order[:count])


@pytest.mark.parametrize("shared", [True, False])
def test_block_topk_keeps_the_top_pooled_blocks(shared):
    from sparsen.methods.attention.block_topk import BlockTopK

    q, k = _qk()
    B, density = 16, 0.3
    got = BlockTopK(parse_attention_spec(f"block-topk@{density}+block={B}+shared={str(shared).lower()}")).blocks(q, k, 0.35)
    nb = n_blocks(150, B)
    scores = _heads(torch.stack([torch.stack([_block_mean(q[h, j], B) @ _block_mean(k[h], B).T for j in range(2)])
                                 for h in range(2)]), shared)
    for h in range(scores.shape[0]):
        for i in range(nb):
            forced = {0, i} | ({i - 1} if i >= 1 else set())
            budget = max(math.ceil(density * (i + 1)), len(forced))
            rest = [j for j in range(i + 1) if j not in forced]
            want = forced | {rest[x] for x in _top_set([scores[h, i, j] for j in rest], budget - len(forced))}
            assert set(got[h, i].nonzero().flatten().tolist()) == want, (h, i)


@pytest.mark.parametrize("shared", [True, False])
def test_xattention_keeps_blocks_up_to_tau(shared):
    from sparsen.methods.attention.xattention import XAttention

    q, k = _qk(seed=1, n=150)
    B, S, tau, scale = 16, 4, 0.8, 2.0  # a large scale: peaked attention, so that far from every block is kept
    spec = f"xattention@tau{tau}+block={B}+stride={S}+shared={str(shared).lower()}"
    got = XAttention(parse_attention_spec(spec)).blocks(q, k, scale)
    n, nb = 150, n_blocks(150, 16)
    ns = nb * B // S

    def pos(x, i):  # a position's vector, zero past the end
        return x[i] if i < n else torch.zeros(x.shape[-1])

    mass = torch.zeros(2, 2, nb, nb)
    for h in range(2):
        for j in range(2):
            for r in range(ns):
                if r * S >= n:
                    continue
                cs = [c for c in range(r + 1) if c * S < n]  # causal and real key groups
                logits = torch.tensor([float(sum(pos(q[h, j], r * S + S - 1 - t) @ pos(k[h], c * S + t)
                                                 for t in range(S))) * scale / S for c in cs])
                for c, p in zip(cs, torch.softmax(logits, 0)):
                    mass[h, j, r * S // B, c * S // B] += p
    mass = _heads(mass, shared)
    for h in range(mass.shape[0]):
        for i in range(nb):
            total = float(mass[h, i].sum())
            kept = {0, i}
            acc = sum(float(mass[h, i, j]) for j in kept)
            for j in sorted((j for j in range(i + 1) if j not in kept), key=lambda j: (-float(mass[h, i, j]), j)):
                if acc < tau * total:
                    kept.add(j)
                    acc += float(mass[h, i, j])
            assert set(got[h, i].nonzero().flatten().tolist()) == kept, (h, i)
    assert got.sum() < 0.8 * mass.shape[0] * nb * (nb + 1) / 2  # (a selection, not every block)


@pytest.mark.parametrize("shared", [True, False])
def test_vertical_slash_keeps_the_top_columns_and_diagonals(shared):
    from sparsen.methods.attention.vertical_slash import VerticalSlash

    q, k = _qk(seed=2, n=150)
    n, B, last, scale = 150, 8, 20, 2.0
    spec = f"vertical-slash@0.1+block={B}+last_q={last}+sink=3+local=5+vertical_share=0.4+shared={str(shared).lower()}"
    sel = VerticalSlash(parse_attention_spec(spec))
    got = finish_pattern(sel.blocks(q, k, scale), n, B, (2, 4))
    probs = _heads(torch.stack([torch.stack([_causal_probs(q[h, j, n - last:], k[h], scale, n - last)
                                             for j in range(2)]) for h in range(2)]), shared)
    nv, ns = max(math.ceil(0.1 * 0.4 * n - 1e-9), 3), max(math.ceil(0.1 * 0.6 * n - 1e-9), 5)
    for h in range(probs.shape[0]):
        vertical = probs[h].sum(0)
        slash = [sum(float(probs[h, i, n - last + i - o]) for i in range(last) if n - last + i - o >= 0)
                 for o in range(n)]
        cols = set(range(3)) | _top_set([vertical[j] if j >= 3 else math.inf for j in range(n)], nv)
        offs = set(range(5)) | _top_set([slash[o] if o >= 5 else math.inf for o in range(n)], ns)
        want = torch.zeros(n, n, dtype=torch.bool)
        for t in range(n):
            for j in range(t + 1):
                want[t, j] = (t - j) in offs
        blocks = torch.zeros(n_blocks(n, B), n_blocks(n, B), dtype=torch.bool)
        for t, j in want.nonzero().tolist():  # a diagonal computes every block it crosses
            blocks[t // B, j // B] = True
        blocks |= torch.eye(len(blocks), dtype=torch.bool)
        blocks[:, 0] = True
        assert torch.equal(got.mask[h], blocks), h
        assert set(got.columns[h].nonzero().flatten().tolist()) == cols
        assert blocks.sum() < 0.8 * len(blocks) * (len(blocks) + 1) / 2


@pytest.mark.parametrize("shared, tau", [(True, 0.1), (False, 0.1), (True, 10.0), (False, 0.0)])
def test_flexprefill_chooses_per_head_and_covers_gamma(shared, tau):
    """tau 10: every head query-aware; tau 0: every head vertical-slash; 0.1: as the divergence says."""
    from sparsen.methods.attention.flexprefill import FlexPrefill

    q, k = _qk(seed=3, n=150)
    n, B, last, gamma, scale = 150, 16, 24, 0.8, 2.0
    sel = FlexPrefill(parse_attention_spec(f"flexprefill@gamma{gamma}+tau={tau}+block={B}+last_q={last}"
                                           f"+min_budget=0.2+shared={str(shared).lower()}"))
    got = sel.blocks(q, k, scale)
    nb = n_blocks(n, B)
    probs = _heads(torch.stack([torch.stack([_causal_probs(q[h, j, n - last:], k[h], scale, n - last)
                                             for j in range(2)]) for h in range(2)]), shared, "mean")
    est = _heads(torch.stack([torch.stack([torch.softmax(q[h, j, n - last:].mean(0) @ _block_mean(k[h], B).T * scale, 0)
                                           for j in range(2)]) for h in range(2)]), shared, "mean")
    pooled = torch.zeros(2, 2, nb, nb)
    for h in range(2):
        for j in range(2):
            s = _block_mean(q[h, j], B) @ _block_mean(k[h], B).T * scale
            pooled[h, j] = torch.softmax(s.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), -math.inf), -1)
    pooled = _heads(pooled, shared, "mean")
    lo = math.ceil(0.2 * n / B)

    def cover(values):  # the fewest largest values reaching gamma of the total
        acc, c = 0.0, 0
        for x in sorted(values, reverse=True):
            if acc >= gamma - 1e-12:
                break
            acc += x
            c += 1
        return max(c, 1)

    for h in range(probs.shape[0]):
        vertical = probs[h].mean(0)
        slash = [sum(float(probs[h, i, n - last + i - o]) for i in range(last) if n - last + i - o >= 0) / last
                 for o in range(n)]
        true_blocks = torch.stack([vertical[b * B:(b + 1) * B].sum() for b in range(nb)])
        m = (true_blocks + est[h]) / 2
        js = math.sqrt(0.5 * float((true_blocks * (true_blocks / m).log()).sum())
                       + 0.5 * float((est[h] * (est[h] / m).log()).sum()))
        want = torch.zeros(nb, nb, dtype=torch.bool)
        if js < tau:
            flat = (pooled[h] / nb).flatten().tolist()
            for x in _top_set(flat, cover(flat)):
                want[x // nb, x % nb] = True
        else:
            n_v = min(max(cover(vertical.tolist()) // B + 1, lo), nb)
            n_s = min(max(cover(slash) // B + 1, lo), nb)
            vb = _top_set([float(vertical[b * B:(b + 1) * B].sum()) for b in range(nb)], n_v)
            sb = _top_set([sum(slash[b * B:(b + 1) * B]) for b in range(nb)], n_s)
            for i in range(nb):
                for j in range(i + 1):
                    want[i, j] = j in vb or (i - j) in sb
        assert bool(sel.query_aware[h]) == (js < tau)
        assert torch.equal(got[h], want), (h, js)
        assert want.sum() < 0.7 * nb * (nb + 1) / 2


# --- the HF forward --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ids(tiny_llama):
    torch.manual_seed(0)
    return torch.randint(0, tiny_llama.adapter.vocab_size, (1, 200))


FULL = {"block-topk": "block-topk@1", "xattention": "xattention@tau1+stride=4",
        "vertical-slash": "vertical-slash@1+vertical_share=1",
        "flexprefill": "flexprefill+tau=0+min_budget=1"}


@pytest.mark.parametrize("name", PREFILL)
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_every_block_kept_is_dense_in_the_model(tiny_llama, ids, name, backend, monkeypatch):
    import sparsen.core.prefill as cp

    if backend == "kernel":
        _kernel()
    else:
        monkeypatch.setattr(cp, "_KERNEL", [])
    lm = tiny_llama
    plan = attention_plan(lm, parse_attention_spec(FULL[name] + "+block=32"), progress=False)
    with torch.no_grad():
        ref = lm.model(ids).logits
        sp = plan.build_sparsifier(lm)
        with sp:
            out = lm.model(ids).logits
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    att = sp.achieved()["attention"]
    assert att["prefill_density"] == pytest.approx(1.0) and att["prefill_backend"] == backend
    assert att["prefill_layers"] == [0, 1, 2] and att["prefill_tokens"] == 200 and att["density"] is None
    assert lm.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", PREFILL)
def test_sparse_prefill_then_dense_decoding(tiny_llama, ids, name):
    """The prompt's prefill runs the pattern (and is accounted); decode steps on its cache are dense."""
    lm = tiny_llama
    spec = {"block-topk": "block-topk@1/4", "xattention": "xattention@tau0.5+stride=4",
            "vertical-slash": "vertical-slash@1/8", "flexprefill": "flexprefill@gamma0.5+min_budget=0"}[name]
    plan = attention_plan(lm, parse_attention_spec(spec + "+block=16+dense_layers=1"), progress=False)
    with torch.no_grad():
        ref = lm.model(ids, use_cache=True)
        sp = plan.build_sparsifier(lm)
        with sp:
            out = lm.model(ids, use_cache=True)
        att = sp.achieved()["attention"]
        assert att["prefill_layers"] == [1, 2] and att["prefill_tokens"] == 200
        assert 0 < att["prefill_density"] < 0.95 and 0 < att["prefill_estimate_share"] < 1
        assert att["prefill_density_all_layers"] == pytest.approx((2 * att["prefill_density"] + 1) / 3)
        assert not torch.allclose(out.logits, ref.logits, atol=1e-3)
        nxt = torch.tensor([[5]])
        cache = cache_of(out)
        with sp:
            step = lm.model(nxt, **with_cache(lm.model, copy.deepcopy(cache))).logits
        dense_step = lm.model(nxt, **with_cache(lm.model, copy.deepcopy(cache))).logits
    assert torch.equal(step, dense_step)
    assert sp.achieved()["attention"]["prefill_tokens"] == 200  # the step was not a prefill


def test_shared_and_per_head_masks(tiny_llama, ids):
    from sparsen.core.attention import capturing_qk

    lm = tiny_llama
    seen = {}
    with torch.no_grad(), capturing_qk(lm.adapter, lambda layer, q, k: seen.setdefault(layer, (q[0], k[0]))):
        lm.model(ids)
    q, k = seen[1]
    for shared, heads in ((True, 2), (False, 4)):
        plan = attention_plan(lm, parse_attention_spec(f"block-topk@1/4+block=16+shared={str(shared).lower()}"), progress=False)
        sel = plan.build_sparsifier(lm).rules["layers.1.attn"]
        assert sel.blocks(q.reshape(2, 2, 200, -1), k, 0.25).shape == (heads, 13, 13)


# --- specs, plans, attn-eval ------------------------------------------------------------------------------------
def test_specs_labels_and_plans(tiny_llama, tmp_path):
    from sparsen.core.plan import Plan

    assert attention_method_names()[-4:] == PREFILL
    for spec, label in (("block-topk@1/8", "block-topk@1/8"), ("xattention+tau=0.9", "xattention@tau0.9"),
                        ("xattention@tau0.95+stride=16", "xattention@tau0.95+stride=16"),
                        ("vertical-slash@1/16+last_q=32", "vertical-slash@1/16+last_q=32"),
                        ("flexprefill", "flexprefill@gamma0.9"),
                        ("flexprefill+gamma=0.95+tau=0.2", "flexprefill@gamma0.95+tau=0.2"),
                        ("block-topk@1/8+shared=false", "block-topk@1/8+shared=false")):
        c = parse_attention_spec(spec)
        assert c.kind == "prefill" and c.label() == label and parse_attention_spec(label) == c
    plan = attention_plan(tiny_llama, parse_attention_spec("xattention@tau0.8+dense_layers=1"), progress=False)
    plan.save(tmp_path / "x.json")
    loaded = Plan.load(tmp_path / "x.json")
    assert loaded.attention == plan.attention
    assert sorted(loaded.build_sparsifier(tiny_llama).prefill_rules) == ["layers.1.attn", "layers.2.attn"]


@pytest.mark.parametrize("spec, message", [
    ("xattention@1/8", "give tau instead"), ("block-topk@256t", "share of the causal blocks"),
    ("xattention+stride=5", "not a multiple of stride"), ("xattention@tau1.5", "outside (0, 1]"),
    ("flexprefill+min_budget=0.5+max_budget=0.2", "0 <= min <= max <= 1"), ("block-topk@0", "outside (0, 1]"),
    ("vertical-slash+last_q=0", "last_q 0"), ("flexprefill@gammaX", "attention budget"),
])
def test_bad_prefill_specs_are_one_line_errors(spec, message):
    with pytest.raises(SparsenError) as e:
        parse_attention_spec(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_attn_eval_runs_prefill_methods(tmp_path):
    from sparsen.cli import main

    prompt = "Some text here. " * 12 + "\n\nWhat is the colour?"
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"id": "a", "task": "mine", "prompt": prompt, "answers": ["blue"], "metric": "exact",
                                 "max_new_tokens": 3, "query_start": prompt.index("What")}) + "\n")
    out = tmp_path / "ae"
    assert main(["attn-eval", "--model", "tiny-llama", "--tasks", str(tasks), "--methods",
                 "block-topk@1/8+block=16,xattention+tau=0.9+block=16,quest@1/2", "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "attn_eval.json").read_text())
    assert d["labels"] == ["dense", "block-topk@1/8+block=16", "xattention@tau0.9+block=16", "quest@1/2"]
    assert d["kinds"] == {"block-topk@1/8+block=16": "prefill", "xattention@tau0.9+block=16": "prefill",
                          "quest@1/2": "decode"}
    res = d["samples"][0]["results"]
    assert 0 < res["block-topk@1/8+block=16"]["density"] < 1 and res["block-topk@1/8+block=16"]["estimate_share"] > 0
    assert 0 < res["quest@1/2"]["density"] <= 1
