"""The engine on a GGUF file's own quantized weights (models/gguf_weights.py, engine/quant.py, kernels/quant.c)."""

import ctypes
import json

import numpy as np
import pytest
import torch

from sparsen import SparsenError, load_model
from sparsen.cli import main
from sparsen.core.rules import RuleKind
from sparsen.engine import Engine, c_weight, choose_weights, kernels
from sparsen.engine.quant import W_Q4, W_Q4_RUNS, W_Q8, head_bound, head_bound_refusal, pack
from sparsen.models.gguf_weights import DECODERS, QuantTensor, read_gguf_weights

TINY_TYPES = {"q": "Q4_0", "k": "Q5_0", "v": "Q5_1", "o": "Q8_0", "gate": "Q4_K", "up": "Q4_1", "down": "Q6_K"}
# random fp16 scales of this size give weights of roughly 0.05 (K-quants multiply them by sub-block scales)
WEIGHT_SCALE = {"IQ4_NL": 0.005, "Q4_0": 0.01, "Q4_1": 0.005, "Q5_0": 0.005, "Q5_1": 0.003, "Q8_0": 4e-4, "Q4_K": 5e-5,
                "Q6_K": 2e-5}
HALF_FIELDS = {"IQ4_NL": (0,), "Q4_0": (0,), "Q8_0": (0,), "Q5_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q6_K": (208,)}  # byte offsets of a block's fp16 fields


def ptr(a):
    return a.ctypes.data


def random_raw(qtype: str, rows: int, n_in: int, rng, scale: float = 0.01, positive: bool = False) -> np.ndarray:
    """A tensor's bytes as a GGUF stores them: random codes, random (finite) fp16 scales and minima (``positive``:
    scales >= 0, as ggml's Q8_0 writes them)."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    nb = n_in // block
    raw = rng.integers(0, 256, (rows, nb, nbytes), dtype=np.uint8)
    for k in HALF_FIELDS[qtype]:
        half = (rng.standard_normal((rows, nb)) * scale).astype(np.float16)
        half = np.abs(half) if positive else half
        raw[:, :, k:k + 2] = half.view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * nbytes)


def check_against_hf(lm, engine, ids, n_new: int) -> None:
    """The engine's greedy tokens are HF `generate`'s, and its logits along them HF's within 1e-4 relative."""
    with torch.no_grad():
        hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        ref = lm.model(hf[:, :-1]).logits[0].numpy()
    assert engine.generate(ids, n_new) == hf[0, len(ids):].tolist()
    engine.reset()
    for i, t in enumerate(hf[0, :-1].tolist()):
        got = engine.step(t, dense=True)
        assert np.abs(got - ref[i]).max() <= 1e-4 * np.abs(ref[i]).max(), i


def random_tensor(qtype, rows, n_in, seed=0) -> QuantTensor:
    rng = np.random.default_rng(seed)
    return QuantTensor("t", qtype, *DECODERS[qtype](random_raw(qtype, rows, n_in, rng), rows))


# --- decoding and kernels ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", sorted(DECODERS))
def test_decoding_equals_gguf_py_dequantization(qtype):
    import gguf

    rng = np.random.default_rng(7)
    raw = random_raw(qtype, 9, 512, rng)
    qt = QuantTensor("t", qtype, *DECODERS[qtype](raw, 9))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(qt.dequantize(), ref)  # bit for bit: the fp32 model sparsen loads is this


@pytest.mark.parametrize("qtype", sorted(DECODERS))
@pytest.mark.parametrize("n_out", [37, 70, 576])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_quantized_gemv_equals_the_dequantized_product(qtype, n_out, sparsity):
    n_in = 512
    qt = random_tensor(qtype, n_out, n_in, seed=n_out)
    W = qt.dequantize().astype(np.float64)
    rng = np.random.default_rng(int(sparsity * 10) + n_out)
    x = rng.standard_normal(n_in).astype(np.float32)
    act = np.sort(rng.permutation(n_in)[: n_in - int(round(sparsity * n_in))]).astype(np.int32)
    xm = np.zeros_like(x)
    xm[act] = x[act]
    expected = W @ xm
    scale = np.abs(W).max() * np.abs(xm).sum() + 1e-30
    for runs in (False, True) if qt.bits == 4 else (False,):  # 4-bit: tile-major and runs
        p = pack(qt, transposed=True, runs=runs)
        cw = c_weight(p)
        for threads in (1, 2):
            y = np.full(p.stride, np.nan, np.float32)
            assert kernels().sp_test_gemv(ctypes.byref(cw), n_in, n_out, ptr(x), ptr(act), len(act), ptr(y), threads) == 0
            assert np.abs(y[:n_out] - expected).max() <= 1e-6 * scale
    if sparsity == 1.0:
        assert np.all(y[:n_out] == 0)


def test_runs_refuse_what_they_cannot_hold():
    """Runs are a layout of transposed 4-bit codes, with at most SP_Q4_RUNS_MAX_OUT outputs (their block sums)."""
    with pytest.raises(ValueError, match="4-bit"):
        pack(random_tensor("Q8_0", 64, 64, seed=1), transposed=True, runs=True)
    with pytest.raises(ValueError, match="transposed"):
        pack(random_tensor("Q4_1", 64, 64, seed=1), transposed=False, runs=True)
    p = pack(random_tensor("Q4_1", 64, 64, seed=1), transposed=True, runs=True)  # held: cw points into it
    cw = c_weight(p)
    cw.stride = 8192 + 64
    x, act, y = np.ones(64, np.float32), np.arange(64, dtype=np.int32), np.zeros(8192 + 64, np.float32)
    assert kernels().sp_test_gemv(ctypes.byref(cw), 64, 64, ptr(x), ptr(act), 64, ptr(y), 1) == -3  # SP_ERR_SHAPE


@pytest.mark.parametrize("qtype", sorted(DECODERS))
@pytest.mark.parametrize("n_in", [256, 768])  # 768: 24 blocks of 32, a 16-block vector pass and a tail
def test_quantized_rows_equal_the_dequantized_product(qtype, n_in):
    n_out = 300
    qt = random_tensor(qtype, n_out, n_in, seed=3)
    W = qt.dequantize().astype(np.float64)
    x = np.random.default_rng(4).standard_normal(n_in).astype(np.float32)
    p = pack(qt, transposed=False)  # held: the struct points into its arrays
    cw = c_weight(p)
    rows = np.array([0, 5, 6, 100, 299], np.int32)
    y = np.zeros(n_out, np.float32)
    kernels().sp_test_dot_rows(ctypes.byref(cw), n_in, n_out, ptr(x), ptr(rows), len(rows), ptr(y), 2)
    scale = np.abs(W).max() * np.abs(x).sum()
    assert np.abs(y[rows] - W[rows] @ x).max() <= 1e-6 * scale and np.all(np.delete(y, rows) == 0)
    kernels().sp_test_dot_rows(ctypes.byref(cw), n_in, n_out, ptr(x), None, 0, ptr(y), 2)  # every row
    assert np.abs(y - W @ x).max() <= 1e-6 * scale


def random_head(vocab: int, d: int, seed: int) -> QuantTensor:
    """A Q8_0 lm_head as ggml writes one (scales >= 0), with a few rows of extreme codes and two equal rows."""
    rng = np.random.default_rng(seed)
    qt = QuantTensor("h", "Q8_0", *DECODERS["Q8_0"](random_raw("Q8_0", vocab, d, rng, 0.01, positive=True), vocab))
    qt.codes[3], qt.codes[4], qt.codes[5] = 127, -128, np.where(rng.random(d) < 0.5, 127, -128)
    qt.codes[vocab - 1], qt.scale[vocab - 1] = qt.codes[7], qt.scale[7]  # a tie with row 7
    return qt


def head_inputs(d: int, seed: int):
    """Inputs a final norm might give, and harder ones: outliers, zeros, a block of zeros, one sign, tiny and
    subnormal values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d).astype(np.float32)
    spiky = x.copy()
    spiky[rng.choice(d, 3, replace=False)] = [40.0, -25.0, 60.0]
    holes = x * (rng.random(d) < 0.3)
    holes[:32] = 0
    subnormal = (rng.integers(-300, 300, d) * 2.0**-149).astype(np.float32)
    return [x, spiky, holes, np.abs(x), np.zeros(d, np.float32), np.full(d, 1e-30, np.float32), subnormal]


def head_runs(lib, p, x, cap: float = 0.0):
    """(every logit, the bound, a greedy step's logits) of the int8 head ``p`` on ``x`` through the kernels, the
    logits softcapped with cap > 0."""
    from sparsen.engine import HeadBoundC

    hb, cw = head_bound(p), c_weight(p)
    chb = HeadBoundC(hb.rows, ptr(hb.nib), ptr(hb.bits), ptr(hb.scale))
    vocab, d = p.shape
    outs = [np.full(vocab, np.nan, np.float32) for _ in range(3)]
    for mode, out in zip((2, 0, 1), outs):
        assert lib.sp_test_head(ctypes.byref(cw), ctypes.byref(chb), vocab, d, ptr(x), ptr(out), mode, cap, 2) == 0
    return outs


def check_greedy(full, greedy, pruning: bool) -> None:
    """A greedy step's logits are the full ones where finite, -inf elsewhere, with the same first largest."""
    kept = np.isfinite(greedy)
    assert np.all(greedy[~kept] == -np.inf) and np.array_equal(greedy[kept], full[kept])
    assert int(np.argmax(greedy)) == int(np.argmax(full)) and np.all(full[~kept] < full.max())
    if pruning:  # the bound leaves few rows on a random head
        assert kept.mean() < 0.5


def check_greedy_head(lib, vocab: int, d: int, seed: int) -> None:
    """The bound is at least every row's logit (as the rows product computes it), and a greedy head's logits are the
    rows product's where finite, -inf elsewhere, with the same first largest; that too with the largest logit on
    two rows (the first one wins) and under a softcap that merges the largest logits."""
    qt = random_head(vocab, d, seed)
    p = pack(qt, transposed=False)
    assert head_bound(p).rows % 64 == 0 and head_bound(p).rows >= vocab and head_bound_refusal(p) is None
    for x in head_inputs(d, seed):
        full, bound, greedy = head_runs(lib, p, x)
        assert np.all(bound >= full), float((full - bound).max())
        check_greedy(full, greedy, pruning=np.abs(x).max() > 1e-20)  # zero or tiny inputs bound loosely
    x = head_inputs(d, seed)[0]
    full = head_runs(lib, p, x)[0]
    top = int(np.argmax(full))
    tied = QuantTensor("h", "Q8_0", 8, 32, qt.codes.copy(), qt.scale.copy(), None)
    for r in (0, vocab - 1):  # the largest row copied to the first and the last row
        tied.codes[r], tied.scale[r] = qt.codes[top], qt.scale[top]
    full, _, greedy = head_runs(lib, pack(tied, transposed=False), x)
    assert np.argmax(full) == 0 and full[0] == full[vocab - 1] == full.max()
    check_greedy(full, greedy, pruning=vocab >= 256)
    cap = float(np.abs(full).max()) / 20  # the largest logits all round to the cap
    full, _, greedy = head_runs(lib, p, x, cap)
    assert (full == full.max()).sum() > 1
    check_greedy(full, greedy, pruning=False)
    huge = x.copy()
    huge[::32] = 1e30  # beyond the bound's range: every row is dotted
    full, bound, greedy = head_runs(lib, p, huge)
    assert np.isnan(bound).all() and np.isfinite(full).all() and np.array_equal(greedy, full)


@pytest.mark.parametrize("vocab,d", [(1000, 96), (4096, 576), (64, 32)])
def test_greedy_head_bounds_every_logit_and_keeps_the_largest(vocab, d):
    check_greedy_head(kernels(), vocab, d, seed=vocab + d)


def test_greedy_head_refuses_what_it_cannot_bound():
    p = pack(random_head(128, 64, 0), transposed=False)
    p.scale[5, 1] = -p.scale[5, 1] - 1e-3
    assert "negative" in head_bound_refusal(p)
    assert "int8 rows" in head_bound_refusal(pack(random_tensor("Q4_1", 128, 64), transposed=False))
    assert "int8 rows" in head_bound_refusal(pack(random_tensor("Q8_0", 128, 64), transposed=True))


# --- a tiny Llama written as a GGUF ----------------------------------------------------------------------
def write_tiny_llama_gguf(path, types: dict, seed: int = 0):
    """A random 2-layer Llama (hidden 256, 4 heads, 2 KV heads, MLP 512: the K-quants' blocks of 256 fit) with
    SmolLM2's tokenizer, its block linears of the GGML types ``types`` ({linear name: type}; Q4_1 otherwise), the
    tied embedding Q8_0."""
    import gguf

    from sparsen.models.gguf_weights import GGUF_LINEARS
    from sparsen.models.loading import _bundled_gguf

    src = gguf.GGUFReader(_bundled_gguf("smollm2"))
    rng = np.random.default_rng(seed)
    d, inter, heads, kv, layers, vocab = 256, 512, 4, 2, 2, 49152
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(vocab)
    f = src.fields
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def quantized(name, qtype, rows, n_in, scale=None, positive=False):
        t = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, random_raw(qtype, rows, n_in, rng, scale or WEIGHT_SCALE[qtype], positive),
                     raw_shape=(rows, gguf.quant_shape_to_byte_shape((n_in,), t)[0]), raw_dtype=t)

    quantized("token_embd.weight", "Q8_0", vocab, d, 0.004, positive=True)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
    dims = {"q": (d, d), "k": (kv * d // heads, d), "v": (kv * d // heads, d), "o": (d, d), "gate": (inter, d),
            "up": (inter, d), "down": (d, inter)}
    for b in range(layers):
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{b}.{name}.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        for n, (rows, n_in) in dims.items():
            quantized(f"blk.{b}.{GGUF_LINEARS[n]}.weight", types.get(n, "Q4_1"), rows, n_in)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """Every type the engine runs, one per linear."""
    path = write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", TINY_TYPES)
    return load_model(str(path))


def test_a_gguf_of_another_shape_loads_and_matches_its_dequantized_reference(tiny_gguf):
    lm = tiny_gguf
    ad = lm.adapter
    gw = read_gguf_weights(lm.source, ad.n_layers, ad.n_heads, ad.n_kv_heads)
    types = {n: gw.linears[0, n].qtype for n in ("q", "k", "v", "o", "gate", "up", "down")}
    assert types == TINY_TYPES
    for b in ad.blocks:  # the file's tensors, rows in HF's order (q and k un-permuted), are the model's weights
        for n, lin in b.linears.items():
            assert np.array_equal(gw.linears[b.index, n].dequantize(), lin.weight.numpy()), (b.index, n)
    assert np.array_equal(gw.lm_head.dequantize(), ad.lm_head.weight.numpy())
    ids = lm.tokenizer("The history of the city begins", add_special_tokens=False)["input_ids"]
    engine = Engine(lm, dtype="gguf", max_seq=64)
    assert (engine.head_bound is not None) == bool(kernels().sp_head_bound_vectorized())
    check_against_hf(lm, engine, ids, 16)  # greedy generate with the head's bound where it is on
    full = Engine(lm, dtype="gguf", max_seq=64, greedy_head=False)
    assert full.head_bound is None and full.generate(ids, 16) == engine.generate(ids, 16)


def test_gguf_weights_refuse_what_they_cannot_run(tiny_gguf, tiny_llama, tmp_path):
    with pytest.raises(SparsenError, match="not loaded from a .gguf file.*use --weights bf16 or fp32"):
        Engine(tiny_llama, dtype="gguf")
    assert choose_weights(tiny_llama, None) == ("fp32", None)
    assert choose_weights(tiny_gguf, None) == ("gguf", None)
    from sparsen.methods import calibrate, config_for

    rot = calibrate(tiny_gguf, config_for("rotate", sparsity=0.5, tokens=512, ctx=64), progress=False)
    with pytest.raises(SparsenError, match="changes the weights \\(a rotation"):
        Engine(tiny_gguf, rot, dtype="gguf")
    assert choose_weights(tiny_gguf, rot)[0] == "bf16"
    # an unsupported tensor type: one line naming the tensor and the type, suggesting --weights fp32
    path = write_tiny_llama_gguf(tmp_path / "iq.gguf", {"up": "IQ4_NL"})
    with pytest.raises(SparsenError) as e:
        read_gguf_weights(path, 2, 4, 2)  # blk.0.ffn_up comes first in the file
    msg = str(e.value)
    assert "\n" not in msg and "'blk.0.ffn_up.weight'" in msg and "IQ4_NL" in msg and "--weights fp32" in msg
    lm = load_model(str(path))
    assert choose_weights(lm, None)[0] == "bf16"  # auto falls back, saying why


def test_bench_rows_for_several_weights(tiny_gguf, tmp_path):
    out = tmp_path / "bench.json"
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--model", tiny_gguf.source, "--method", "teal", "--sparsity", "0.5", "--tokens", "1024",
                 "--ctx", "128", "--out", str(plan), "--quiet"]) == 0
    assert main(["bench", "--model", tiny_gguf.source, "--plan", str(plan), "--weights", "gguf,bf16,fp32", "--vs", "",
                 "--profile", "--prompt-tokens", "16", "--new-tokens", "8", "--rounds", "1", "--out", str(out),
                 "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["weights"] == ["gguf", "bf16", "fp32"] and d["weights_dtype"] == "gguf"
    g, f = d["by_weights"]["gguf"], d["by_weights"]["fp32"]
    assert g["engine_dense_tok_s"] > 0 and g["engine_sparse_tok_s"] > 0 and g["profile"]["dense_ms"] > 0
    for w in d["weights"]:  # the block linears' table: each linear's product time, dense and sparse
        lin = d["by_weights"][w]["profile"]["linears"]
        assert set(lin) == {"dense", "sparse"} and list(lin["dense"]) == ["q", "k", "v", "o", "gate", "up", "down"]
        assert all(t["product_ms"] > 0 and t["wait_ms"] >= 0 for r in lin.values() for t in r.values())
    assert g["achieved_sparsity"] == pytest.approx(f["achieved_sparsity"], abs=0.02)  # the same masks, near enough
    # greedy steps on the int8 lm_head read its bound and a few rows (where the bound has its vector kernel)
    assert g["greedy_head"] == bool(kernels().sp_head_bound_vectorized()) and not f["greedy_head"]
    assert (g["lm_head_rows_dotted"] is not None) == g["greedy_head"] and f["lm_head_rows_dotted"] is None
    # bytes: Q4_1 codes are 1/8 of fp32's; the blocks' scales come on top
    assert g["dense_mb_per_token"] < f["dense_mb_per_token"] / 3 and g["bound_speedup"] > 1


# --- the bundled model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_engine_matches_hf_generate(smollm2):
    ids = smollm2.tokenizer("The history of the city begins", add_special_tokens=False)["input_ids"]
    engine = Engine(smollm2, dtype="gguf", max_seq=128)
    assert engine.packed["layers.0.q"].type == W_Q4 and engine.packed["lm_head"].type == W_Q8  # Q4_1, Q8_0
    assert (engine.head_bound is not None) == bool(kernels().sp_head_bound_vectorized())
    check_against_hf(smollm2, engine, ids, 64)  # greedy generate reads the head's bound where it is on


def checked_gguf_engine(lm, plan) -> Engine:
    """Each sparse step from the same dense prefix: where the GGUF engine chose the fp32 engine's masks (its inputs
    differ by float rounding, so a channel within ~1e-6 of its threshold may flip), its logits are the fp32 ones
    within 1e-4. Returns the GGUF engine."""
    engines = [Engine(lm, plan, dtype=w, max_seq=64) for w in ("gguf", "fp32")]
    sums = [e.record_masks() for e in engines]
    text = "The history of the city begins with a small settlement on the river, where traders from the north met"
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    same = 0
    for n in range(8, len(ids)):
        before = [s.copy() for s in sums]
        logits = []
        for e in engines:
            e.prefill(ids[:n])
            logits.append(e.step(ids[n]).copy())
        if np.array_equal(sums[0] - before[0], sums[1] - before[1]):
            same += 1
            assert np.abs(logits[0] - logits[1]).max() <= 1e-4 * np.abs(logits[1]).max(), n
    assert same >= (len(ids) - 8) // 2, same  # most steps choose the same masks
    return engines[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["teal", "wina", "cats", "chess", "stat-topk", "topk"])
def test_smollm2_gguf_engine_under_activation_only_plans(smollm2, method):
    from sparsen.methods import calibrate, config_for

    plan = calibrate(smollm2, config_for(method, sparsity=0.4 if method == "cats" else 0.5, tokens=1024, ctx=128),
                     progress=False)
    assert checked_gguf_engine(smollm2, plan).achieved()["overall"] > 0.3


@pytest.mark.slow
def test_smollm2_gguf_engine_stores_sparse_linears_as_runs(smollm2):
    """A 75% TEAL plan keeps a quarter of each linear's inputs: with the runs kernel built (AVX-512), every 4-bit
    block linear is stored as runs, and the logits are still the fp32 engine's."""
    from sparsen.methods import calibrate, config_for

    plan = calibrate(smollm2, config_for("teal", sparsity=0.75, tokens=1024, ctx=128), progress=False)
    engine = checked_gguf_engine(smollm2, plan)
    types = {p.type for site, p in engine.packed.items() if site != "lm_head"}
    assert types == ({W_Q4_RUNS} if kernels().sp_q4_runs_vectorized() else {W_Q4})
    assert engine.achieved()["overall"] > 0.6


@pytest.mark.slow
def test_gemma3_engine_on_its_q5_0_q4_k_q6_k_q8_0_weights_equals_hf_generate():
    from sparsen.engine import prompt_ids

    lm = load_model("gemma3")
    engine = Engine(lm, dtype="gguf", max_seq=96)
    assert {p.type for p in engine.packed.values()} == {W_Q4, W_Q8}  # Q4_K; Q5_0, Q6_K, Q8_0
    assert any(p.block == 16 for p in engine.packed.values()) and any(p.scale.dtype == np.float32 for p in engine.packed.values())
    check_against_hf(lm, engine, prompt_ids(lm, "The history of the city begins", chat=False), 32)


# The kernels built for each x86-64 level this CPU runs, whatever the machine's own build uses: the scalar fallback
# (plain x86-64), AVX2 without AVX-512 (v3), AVX-512 (v4). {level: (flags it must run, an ISA name its build has or
# lacks)}
ISA_LEVELS = {"x86-64": ((), "-avx2"), "x86-64-v3": (("avx2", "fma", "f16c"), "-avx512f"),
              "x86-64-v4": (("avx512f", "avx512bw", "avx512dq", "avx512vl"), "avx512f")}


@pytest.fixture(scope="module", params=sorted(ISA_LEVELS))
def isa_kernels(request, tmp_path_factory):
    import shutil
    import subprocess
    from pathlib import Path

    from sparsen.engine import _isa, open_kernels
    from sparsen.engine.cpu import cpu_flags

    level = request.param
    needs, isa = ISA_LEVELS[level]
    if not cpu_flags().issuperset(needs):
        pytest.skip(f"this CPU cannot run {level} code")
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("no gcc to build the kernels")
    src = Path(__file__).parents[1] / "src" / "sparsen" / "engine" / "kernels"
    out = tmp_path_factory.mktemp(level) / "kernels.so"
    subprocess.run([cc, "-O2", f"-march={level}", "-fopenmp", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC",
                    f"-I{src}", *sorted(str(p) for p in src.glob("*.c")), "-o", str(out), "-lm"], check=True)
    lib = open_kernels(out)
    built = _isa(lib)
    assert (isa[1:] not in built) if isa.startswith("-") else (isa in built)
    return lib


@pytest.mark.parametrize("qtype", sorted(DECODERS))
@pytest.mark.parametrize("n_out", [37, 70, 576])
def test_every_isa_build_equals_the_dequantized_product(qtype, n_out, isa_kernels):
    """The transposed product (every tile shape: 64 only, 128 only, 128s and a 64; 4-bit codes tile-major and as
    runs) at a random eighth of the inputs, a random half and all of them, and the rows product."""
    n_in = 512
    qt = random_tensor(qtype, n_out, n_in, seed=5 + n_out)
    W = qt.dequantize().astype(np.float64)
    rng = np.random.default_rng(6)
    x = rng.standard_normal(n_in).astype(np.float32)
    t, r = pack(qt, transposed=True), pack(qt, transposed=False)
    ct, cr = c_weight(t), c_weight(r)
    layouts = [(t, ct)]
    if qt.bits == 4:  # and as runs
        u = pack(qt, transposed=True, runs=True)
        layouts.append((u, c_weight(u)))
    for act in (np.sort(rng.permutation(n_in)[: n_in // 2]).astype(np.int32), np.arange(n_in, dtype=np.int32),
                np.sort(rng.permutation(n_in)[: n_in // 8]).astype(np.int32)):
        xm = np.zeros_like(x)
        xm[act] = x[act]
        for p, cp in layouts:
            y = np.full(p.stride, np.nan, np.float32)
            assert isa_kernels.sp_test_gemv(ctypes.byref(cp), n_in, n_out, ptr(x), ptr(act), len(act), ptr(y), 2) == 0
            assert np.abs(y[:n_out] - W @ xm).max() <= 1e-6 * np.abs(W).max() * np.abs(xm).sum()
    z = np.zeros(n_out, np.float32)
    isa_kernels.sp_test_dot_rows(ctypes.byref(cr), n_in, n_out, ptr(x), None, 0, ptr(z), 2)
    assert np.abs(z - W @ x).max() <= 1e-6 * np.abs(W).max() * np.abs(x).sum()


def test_every_isa_build_bounds_the_greedy_head(isa_kernels):
    """The bound's scalar form (builds without AVX-512 VNNI) and its vector form alike."""
    check_greedy_head(isa_kernels, 1000, 96, seed=11)


@pytest.mark.parametrize("n", [7, 37, 576, 1539])
def test_every_isa_build_masks_equal_numpy(n, isa_kernels):
    """The threshold mask (vector compares, the indices packed) at every density, tails shorter than a vector."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.random(n) * 3).astype(np.float32)
    act = np.full(n, -1, np.int32)
    for thr in (np.full(n, 0.7, np.float32), np.linspace(0, 2, n).astype(np.float32), np.zeros(n, np.float32),
                np.full(n, np.inf, np.float32)):
        m = isa_kernels.sp_test_mask(int(RuleKind.THRESHOLD), 0.0, ptr(thr), ptr(x), n, ptr(act))
        expected = np.flatnonzero(np.abs(x) > thr)
        assert m == len(expected) and np.array_equal(act[:m], expected)
