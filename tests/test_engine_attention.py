"""The C engine's decode-time KV selection: for every method its logits and accounting equal the torch path's (the
same plan over one forward of the whole sequence, the prompt a dense prefix), density 1 is the dense engine, it
composes with linear rules, the torch prefill route equals stepping the prompt, the fp16 cache is close to fp32."""

import json

import numpy as np
import pytest
import torch

from sparsen import SparsenError
from sparsen.core.plan import Plan
from sparsen.engine import Engine, kernels
from sparsen.methods.attention import attention_plan, parse_attention_spec
from test_engine import plan_for, ptr, tiny_gemma3

CALIB = "+calib_tokens=256+calib_ctx=128"
SPECS = {  # budgets that really select on 60-120 keys, the first layer dense
    "oracle-topk": "oracle-topk@0.25",
    "oracle-topp": "oracle-topp@p0.8",
    "sink-window": "sink-window@0.25",
    "h2o": "h2o@0.25",
    "quest": "quest@0.25+page_size=4",
    "double-sparsity": "double-sparsity@0.25+channels=4" + CALIB,
    "sketch": "sketch@0.25+rank=4" + CALIB,  # int8 codes
    "sketch-fp32": "sketch@0.25+rank=4+bits=0" + CALIB,
}
FULL = {"oracle-topp": "oracle-topp@p1.0"}  # density 1 of the others: '@1'
N, PROMPT = 120, 60
_PLANS: dict = {}


@pytest.mark.parametrize("m", [40, 300, 2048, 8192])
def test_top_budget_kernel_keeps_every_value_at_or_above_the_kth_largest(m):
    rng = np.random.default_rng(m)
    for k in sorted({1, 2, m // 16, m // 8, m // 2, m - 1, m} - {0}):
        for ties in (False, True):
            v = rng.random(m, dtype=np.float32) ** 4  # skewed, as probabilities are
            if ties:  # few distinct values, and sinks and a window forced above everything
                v = np.round(v * 8).astype(np.float32) / 8
                v[:4] = v[-16:] = 1e30
            out = np.zeros(m, dtype=np.int32)
            c = kernels().sp_test_top_budget(ptr(v), m, k, ptr(out))
            kth = np.sort(v)[::-1][k - 1]
            assert np.array_equal(out[:c], np.flatnonzero(v >= kth)), (m, k, ties)


def _plan(lm, spec):
    key = (lm.spec, spec)
    if key not in _PLANS:
        _PLANS[key] = attention_plan(lm, parse_attention_spec(spec), progress=False)
    return _PLANS[key]


@pytest.fixture(scope="module")
def ids():
    return [int(t) for t in torch.randint(0, 256, (N,), generator=torch.Generator().manual_seed(0))]


def torch_path(lm, plan, ids, prompt):
    """Logits at positions prompt-1 .. end under the plan's hooks (positions >= prompt sparse), and achieved()."""
    sp = plan.build_sparsifier(lm, dense_prefix=prompt)
    with torch.no_grad(), sp:
        logits = lm.model(torch.tensor([ids])).logits[0].numpy()
    return logits[prompt - 1:], sp.achieved()


def engine_path(engine, ids, prompt, via="engine"):
    """The prompt prefilled dense, then every later token stepped (sparse): logits at positions prompt-1 .. end."""
    out = [engine.prefill(ids[:prompt], via=via).copy()]
    out += [engine.step(t).copy() for t in ids[prompt:]]
    return np.stack(out)


def assert_close(got, want, rtol=1e-4):
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


def assert_same_accounting(got: dict, want: dict):
    assert got.keys() == want.keys() and got["sparse_layers"] == want["sparse_layers"]
    assert got["queries"] == want["queries"] and got["per_layer"] == pytest.approx(want["per_layer"], abs=1e-12)
    for k in ("density", "density_all_layers", "read_density", "read_density_all_layers", "estimate_share"):
        assert got[k] == pytest.approx(want[k], rel=1e-12), k


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("method", list(SPECS))
def test_engine_selection_equals_the_torch_path(tiny_llama, ids, method, shared):
    if method == "sink-window" and not shared:
        pytest.skip("sink-window chooses the same keys for every head")
    plan = _plan(tiny_llama, SPECS[method] + "+dense_layers=1" + ("" if shared else "+shared=false"))
    want, achieved = torch_path(tiny_llama, plan, ids, PROMPT)
    engine = Engine(tiny_llama, plan, threads=2, max_seq=128)
    got = engine_path(engine, ids, PROMPT)
    assert_close(got, want)
    att = engine.achieved()["attention"]
    assert_same_accounting(att, achieved["attention"])
    assert att["sparse_layers"] == [1, 2] and att["queries"] == N - PROMPT
    assert att["density"] < 0.6  # it really selects, and that changes the logits
    dense = engine_path(Engine(tiny_llama, threads=2, max_seq=128), ids, PROMPT)
    assert np.abs(dense - got).max() > 1e-2 * np.abs(dense).max()


@pytest.mark.parametrize("method", list(SPECS))
def test_density_one_is_the_dense_engine(tiny_llama, ids, method):
    spec = FULL.get(method, SPECS[method].replace("@0.25", "@1"))
    engine = Engine(tiny_llama, _plan(tiny_llama, spec), threads=2, max_seq=128)
    got = engine_path(engine, ids, PROMPT)
    assert_close(got, engine_path(Engine(tiny_llama, threads=2, max_seq=128), ids, PROMPT), rtol=1e-6)
    assert engine.achieved()["attention"]["density"] == pytest.approx(1.0)


def test_linear_rules_and_selection_compose_as_in_torch(tiny_llama, ids):
    teal = plan_for(tiny_llama, "teal", 0.5)
    plan = attention_plan(tiny_llama, parse_attention_spec("quest@0.25+page_size=4+dense_layers=1"), base=teal,
                          progress=False)
    want, achieved = torch_path(tiny_llama, plan, ids, PROMPT)
    engine = Engine(tiny_llama, plan, threads=2, max_seq=128)
    got = engine_path(engine, ids, PROMPT)
    assert_close(got, want, rtol=1e-3)  # as the linear-rule tests: a mask flips on fp noise now and then
    a = engine.achieved()
    assert a["overall"] == pytest.approx(achieved["overall"], abs=0.03) and a["overall"] > 0.3  # both ran
    assert_same_accounting(a["attention"], achieved["attention"])
    alone = engine_path(Engine(tiny_llama, _plan(tiny_llama, "quest@0.25+page_size=4+dense_layers=1"), max_seq=128),
                        ids, PROMPT)
    assert np.abs(alone - got).max() > 1e-2 * np.abs(alone).max()


@pytest.mark.parametrize("method", ["quest", "sketch"])
def test_tiny_gemma3_selects_in_its_global_layer_only(method):
    # layers 0 and 1 slide over 8 positions (untouched); layer 2 is global and selects
    gids = [int(t) for t in torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(2))]
    plan = _plan(tiny_gemma3(), SPECS[method])
    want, achieved = torch_path(tiny_gemma3(), plan, gids, 40)
    engine = Engine(tiny_gemma3(), plan, threads=2, max_seq=96)
    assert [engine._layers[i].attn_select for i in range(3)] == [0, 0, 1]
    assert_close(engine_path(engine, gids, 40), want)
    assert_same_accounting(engine.achieved()["attention"], achieved["attention"])
    assert engine.achieved()["attention"]["sparse_layers"] == [2]


def wide_llama(head_dim, n_heads, n_kv):
    """A random 2-layer Llama with the head shapes of real models (the kernels' vectorized row loops: head_dim 64 or
    128, up to 4 query heads per KV head); the tiny models' head_dim 16 takes the generic loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsen.models import LoadedModel, adapter_for
    from sparsen.models.tiny import byte_tokenizer

    cfg = LlamaConfig(vocab_size=258, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                      max_position_embeddings=512, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True)
    torch.manual_seed(head_dim * 100 + n_heads * 10 + n_kv)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.requires_grad_(False)
    return LoadedModel(spec=f"wide-llama-{head_dim}-{n_heads}-{n_kv}", model=model, tokenizer=byte_tokenizer(),
                       adapter=adapter_for(model), source="random init, seed fixed")


@pytest.mark.parametrize("shape", [(64, 6, 2), (64, 4, 1), (64, 2, 2), (128, 4, 2)], ids=str)
def test_vectorized_rows_of_real_head_shapes(ids, shape):
    lm = wide_llama(*shape)
    with torch.no_grad():
        hf = lm.model(torch.tensor([ids])).logits[0].numpy()[PROMPT - 1:]
    dense = engine_path(Engine(lm, threads=2, max_seq=128), ids, PROMPT)
    assert_close(dense, hf)
    half = engine_path(Engine(lm, threads=2, max_seq=128, kv_dtype="fp16"), ids, PROMPT)
    assert 0 < np.abs(half - dense).max() < 1e-2 * np.abs(dense).max()
    for spec in ("quest@0.25+page_size=4", "h2o@0.25+shared=false", "sketch@0.25" + CALIB):  # sketch: int8 tiles
        plan = attention_plan(lm, parse_attention_spec(spec), progress=False)
        want, achieved = torch_path(lm, plan, ids, PROMPT)
        engine = Engine(lm, plan, threads=2, max_seq=128)
        assert_close(engine_path(engine, ids, PROMPT), want)
        assert_same_accounting(engine.achieved()["attention"], achieved["attention"])


def test_long_rows_equal_the_torch_path(tiny_llama):
    # past 2,048 keys a small budget's threshold is searched among the values above a sampled bound (select.c)
    long = [int(t) for t in torch.randint(0, 256, (2200,), generator=torch.Generator().manual_seed(5))]
    for spec in ("oracle-topk@1/8", "double-sparsity@1/16+channels=4" + CALIB, "sketch@1/8+rank=4" + CALIB):
        plan = _plan(tiny_llama, spec)
        want, achieved = torch_path(tiny_llama, plan, long, 2192)
        engine = Engine(tiny_llama, plan, threads=2, max_seq=2208)
        assert_close(engine_path(engine, long, 2192, via="torch"), want)
        assert_same_accounting(engine.achieved()["attention"], achieved["attention"])


@pytest.mark.parametrize("method", [None, "h2o", "quest", "double-sparsity", "sketch"])
def test_torch_prefill_equals_stepping_the_prompt(tiny_llama, ids, method):
    plan = _plan(tiny_llama, SPECS[method] + "+dense_layers=1") if method else None
    stepped, forward = (Engine(tiny_llama, plan, threads=2, max_seq=128) for _ in range(2))
    a = engine_path(stepped, ids, PROMPT)
    b = engine_path(forward, ids, PROMPT, via="torch")
    assert_close(b, a)
    np.testing.assert_allclose(forward.k_cache, stepped.k_cache, atol=1e-5)
    if plan is not None:
        for name, arr in stepped.attn_state.items():
            if name not in ("held", "tally"):  # the same selections: the same state, to fp noise
                np.testing.assert_allclose(forward.attn_state[name], arr, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.array_equal(forward.attn_state["tally"], stepped.attn_state["tally"])


def test_fp16_kv_cache_is_close_to_fp32(tiny_llama, ids):
    for plan in (None, _plan(tiny_llama, SPECS["sink-window"])):  # a selection that does not depend on the values
        full, half = (Engine(tiny_llama, plan, threads=2, max_seq=128, kv_dtype=d) for d in ("fp32", "fp16"))
        assert half.k_cache.dtype == np.float16 and half.v_cache.dtype == np.float16
        a, b = engine_path(full, ids, PROMPT), engine_path(half, ids, PROMPT)
        err = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < err < 1e-2  # rounded to half, and close
        assert np.array_equal(half.k_cache[:, :, :N], half.k_cache[:, :, :N].astype(np.float32).astype(np.float16))


def test_bad_input_is_a_one_line_error(tiny_llama):
    for kwargs, message in (({"kv_dtype": "int8"}, "KV cache dtype 'int8'"),):
        with pytest.raises(SparsenError, match=message) as e:
            Engine(tiny_llama, **kwargs)
        assert "\n" not in str(e.value)
    unknown = Plan(method="x", target_sparsity=0.0, model=tiny_llama.spec, fingerprint=tiny_llama.fingerprint,
                   sites={}, attention={"method": "nosuch", "config": {}})
    with pytest.raises(SparsenError, match="cannot run the attention method 'nosuch'.*attn-eval") as e:
        Engine(tiny_llama, unknown)
    assert "\n" not in str(e.value)
    with pytest.raises(SparsenError, match="8-bit or fp32 sketches, not 4-bit") as e:
        Engine(tiny_llama, _plan(tiny_llama, "sketch@0.25+rank=4+bits=4" + CALIB))
    assert "\n" not in str(e.value)
    engine = Engine(tiny_llama, max_seq=8)
    with pytest.raises(SparsenError, match="via 'hf' is unknown"):
        engine.prefill([1, 2], via="hf")
    with pytest.raises(SparsenError, match="do not fit"):
        engine.prefill(list(range(9)), via="torch")


def test_bench_at_a_context_with_attention_methods(tmp_path, capsys):
    from sparsen.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-llama", "--context", "96", "--attn", "quest@1/4+page_size=4,sink-window@1/4",
                 "--kv-dtype", "fp16", "--new-tokens", "4", "--rounds", "1", "--vs", "", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["context"] == 96 and d["kv_dtype"] == "fp16" and d["engine_dense_tok_s"] > 0
    assert [m["spec"] for m in d["attention"]] == ["quest@1/4+page_size=4", "sink-window@1/4"]
    for m in d["attention"]:
        assert m["tok_s"] > 0 and m["speedup_vs_dense"] > 0 and m["bound_speedup"] > 1
        # one round: the median of the per-round ratios is that round's ratio, which is the ratio of the medians
        assert m["speedup_per_round"] == pytest.approx(m["speedup_vs_dense"])
        assert m["share_of_bound_per_round"] == pytest.approx(m["speedup_per_round"] / m["bound_speedup"])
        assert m["bytes_per_token"] < d["dense_bytes_per_token"] and 0 < m["density"] < 0.5
    text = capsys.readouterr().out
    assert "quest@1/4+page_size=4" in text and "bytes bound" in text


@pytest.mark.slow
def test_smollm2_selection_after_a_2k_prompt_equals_the_torch_path(smollm2):
    from sparsen.data import corpus_windows

    ids = corpus_windows(smollm2.tokenizer, "wikitext2-test", 2052, 1, bos=smollm2.window_bos)[0].tolist()
    prompt = 2048
    for spec in ("oracle-topk@1/8", "oracle-topp@p0.9", "sink-window@1/8", "h2o@1/8", "quest@1/8",
                 "double-sparsity@1/8+calib_tokens=2048", "sketch@1/8+calib_tokens=2048+calib_ctx=1024"):
        plan = attention_plan(smollm2, parse_attention_spec(spec), progress=False)
        want, achieved = torch_path(smollm2, plan, ids, prompt)
        engine = Engine(smollm2, plan, threads=2, max_seq=2056)
        got = engine_path(engine, ids, prompt, via="torch")
        assert_close(got, want, rtol=1e-3)
        assert_same_accounting(engine.achieved()["attention"], achieved["attention"])
        if "@1/8" in spec:
            assert engine.achieved()["attention"]["density"] < 0.2
