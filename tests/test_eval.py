import math

import pytest
import torch
import torch.nn.functional as F

from sparsen.core import Sparsifier, ThresholdRule
from sparsen.data import EVAL_CORPUS, corpus_windows
from sparsen.evaluation import evaluate, scored_range


def direct_nll(model, wins, start, stop):
    """Reference: token-by-token sum of -log p(target) with an independent loop."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(w[None]).logits[0].double()
            for pos in range(start, stop):
                total -= F.log_softmax(logits[pos], -1)[w[pos + 1]].item()
                count += 1
    return total / count, count


@pytest.mark.parametrize("protocol", ["full", "decode"])
def test_perplexity_matches_direct_computation(tiny_llama, protocol):
    ctx, n = 64, 3
    res = evaluate(tiny_llama, ctx=ctx, n_windows=n, protocol=protocol, progress=False)
    wins = corpus_windows(tiny_llama.tokenizer, EVAL_CORPUS, ctx, n)
    start, stop = scored_range(ctx, protocol)
    nll, count = direct_nll(tiny_llama.model, wins, start, stop)
    assert res.tokens_scored == count == n * (stop - start)
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert res.kl is None and res.sparsity is None


def test_full_protocol_matches_hf_labels_loss(tiny_qwen2):
    ctx, n = 96, 4
    wins = corpus_windows(tiny_qwen2.tokenizer, EVAL_CORPUS, ctx, n)
    with torch.no_grad():
        hf = sum(tiny_qwen2.model(w[None], labels=w[None]).loss.item() for w in wins) / n
    res = evaluate(tiny_qwen2, ctx=ctx, n_windows=n, progress=False)
    assert res.nll == pytest.approx(hf, rel=1e-5)


def test_decode_protocol_scores_only_sparse_positions(tiny_llama):
    assert scored_range(1024, "decode") == (512, 1023)
    assert scored_range(1024, "full") == (0, 1023)
    # A sparsifier that destroys the input of every linear changes nothing in the dense prefix,
    # so under the decode protocol the achieved sparsity is measured on the second half only.
    rules = {site: ThresholdRule(1e9) for site, *_ in tiny_llama.adapter.linear_sites()}
    sp = Sparsifier(tiny_llama.adapter, rules)
    res = evaluate(tiny_llama, ctx=64, n_windows=2, protocol="decode", sparsifier=sp, progress=False)
    assert res.sparsity["overall"] == pytest.approx(1.0)
    assert sp.entries["layers.0.q"] == 2 * 32 * tiny_llama.config.hidden_size


def test_kl_and_agreement_equal_a_hand_computation(tiny_llama):
    from sparsen.data import EVAL_CORPUS, corpus_windows

    sites = [s for s, *_ in tiny_llama.adapter.linear_sites()]
    some = Sparsifier(tiny_llama.adapter, {s: ThresholdRule(0.3) for s in sites})
    dense = evaluate(tiny_llama, ctx=64, n_windows=2, protocol="full", progress=False)
    res = evaluate(tiny_llama, ctx=64, n_windows=2, protocol="full", sparsifier=some, progress=False)
    kl = agree = n = 0.0
    with torch.no_grad():
        for w in corpus_windows(tiny_llama.tokenizer, EVAL_CORPUS, 64, 2):
            p = torch.log_softmax(tiny_llama.model(w[None]).logits[0, :-1].double(), -1)
            with some:
                q = torch.log_softmax(tiny_llama.model(w[None]).logits[0, :-1].double(), -1)
            kl += float((p.exp() * (p - q)).sum())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            n += len(p)
    assert res.kl == pytest.approx(kl / n, rel=1e-4) and res.kl > 1e-3
    assert res.top1_agree == agree / n < 1.0
    assert 0.05 < res.sparsity["overall"] < 0.95
    assert res.dense_nll == pytest.approx(dense.nll, rel=1e-6)
    # the hooks are gone afterwards: the model is dense again
    assert evaluate(tiny_llama, ctx=64, n_windows=2, progress=False).nll == pytest.approx(dense.nll, rel=1e-7)


@pytest.mark.slow
def test_smollm2_perplexity_agrees_with_hf_labels_loss(smollm2):
    ctx, n = 1024, 3
    wins = corpus_windows(smollm2.tokenizer, EVAL_CORPUS, ctx, n)
    with torch.no_grad():
        hf_loss = sum(smollm2.model(w[None], labels=w[None]).loss.item() for w in wins) / n
    res = evaluate(smollm2, ctx=ctx, n_windows=n, protocol="full", progress=False)
    assert res.tokens_scored == n * (ctx - 1)
    assert abs(res.ppl / math.exp(hf_loss) - 1) < 0.01
    assert 10 < res.ppl < 40  # a real language model on English text, not noise


@pytest.mark.parametrize("protocol", ["full", "decode"])
def test_evaluate_many_equals_evaluate_per_config(protocol):
    """The frontier's window-major sweep (shared dense reference, shared prompt KV) gives evaluate's numbers."""
    from sparsen import load_model
    from sparsen.evaluation import evaluate_many
    from sparsen.methods import RotateConfig, TealConfig, calibrate

    lm, rot = load_model("tiny-llama"), load_model("tiny-llama")
    teal = calibrate(lm, TealConfig(sparsity=0.5, tokens=1024, ctx=256), progress=False)
    rotate = calibrate(lm, RotateConfig(sparsity=0.4, tokens=1024, ctx=256), progress=False)
    rotate.transform_(rot)
    configs = {"teal": (lm.model, teal.build_sparsifier(lm)), "rotate": (rot.model, rotate.build_sparsifier(rot))}
    dense, many = evaluate_many(lm, configs, ctx=128, n_windows=3, protocol=protocol, progress=False)
    assert dense.nll == pytest.approx(evaluate(lm, ctx=128, n_windows=3, protocol=protocol, progress=False).nll, rel=1e-9)
    for name, owner in (("teal", lm), ("rotate", rot)):
        one = evaluate(owner, ctx=128, n_windows=3, protocol=protocol, sparsifier=configs[name][1], progress=False)
        got = many[name]
        assert got.tokens_scored == one.tokens_scored
        assert got.nll == pytest.approx(one.nll, rel=1e-6) and got.kl == pytest.approx(one.kl, rel=1e-4, abs=1e-7)
        assert got.top1_agree == one.top1_agree
        assert got.sparsity["overall"] == pytest.approx(one.sparsity["overall"], abs=1e-12)


def test_frontier_ratios_interpolate_the_reference_at_the_achieved_sparsity():
    from sparsen.evaluation.frontier import format_markdown, reference_increase, reference_kl

    def row(method, target, achieved, ppl, kl):
        return {"method": method, "target": target, "decode": {"achieved": achieved, "nll": math.log(ppl), "ppl": ppl,
                                                               "kl": kl, "top1_agree": 0.8}}

    fr = {"protocols": ["decode"], "dense": {"decode": {"nll": math.log(20.0), "ppl": 20.0}},
          "rows": [row("teal", 0.4, 0.4, 25.0, 0.1), row("teal", 0.6, 0.6, 45.0, 0.4), row("ours", 0.5, 0.5, 24.0, 0.1)]}
    assert reference_increase(fr, "decode", 0.5) == pytest.approx(math.sqrt(25 * 45) / 20 - 1)  # geometric midpoint
    assert reference_kl(fr, "decode", 0.5) == pytest.approx(0.2)
    assert reference_kl(fr, "decode", 0.3) is None and reference_increase(fr, "decode", 0.7) is None
    ours = format_markdown(fr).splitlines()[-1].split(" | ")
    assert ours[-2] == f"{0.2 / (math.sqrt(25 * 45) / 20 - 1):.2f}" and ours[-1] == "0.50 |"
