import copy
import ctypes
import ctypes.util
import dataclasses
import json

import numpy as np
import pytest
import torch

import sparsen
from sparsen import SparsenError, load_model
from sparsen.cli import main
from sparsen.core.rules import GaussianTopKRule, RuleKind, ThresholdRule, TopKRule
from sparsen.engine import (
    ABI_VERSION,
    STRUCTS,
    Engine,
    Model,
    c_weight,
    kernels,
    library_path,
    open_kernels,
    sample,
    weight_array,
)
from sparsen.methods import calibrate, config_for
from sparsen.models import LoadedModel, adapter_for
from sparsen.models.tiny import byte_tokenizer


def ptr(a):
    return a.ctypes.data


def plan_for(lm, method, sparsity, **fields):
    return calibrate(lm, config_for(method, sparsity=sparsity, tokens=2048, ctx=256, **fields), progress=False)


def tiny_gemma3(softcap=None, seed=0):
    """A random Gemma 3: 2 sliding layers (window 8) and 1 global, one KV head, QK-norm, random norm gains."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=258, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
                           sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=256,
                           eos_token_id=257, pad_token_id=0, final_logit_softcapping=softcap)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # std 0.05 (the embedding is scaled by 8): greedy decoding does not fall into a loop
        for p in model.parameters():
            p.normal_(0.0, 0.05 if p.dim() == 2 else 0.3)  # norm weights != 0: Gemma's 1 + w gains are exercised
    model.requires_grad_(False)
    return LoadedModel(spec="tiny-gemma3", model=model, tokenizer=byte_tokenizer(), adapter=adapter_for(model),
                       source="random init, seed fixed")


# --- kernels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (37, 53), (576, 192)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_axpy_gemv_equals_masked_dense_product(dtype, shape, sparsity):
    rng = np.random.default_rng(hash((dtype, shape, sparsity)) % 2**32)
    n_in, n_out = shape
    W = torch.randn(n_out, n_in)
    x = rng.standard_normal(n_in).astype(np.float32)
    act = np.sort(rng.permutation(n_in)[: n_in - int(round(sparsity * n_in))]).astype(np.int32)
    wt = weight_array(W.T, dtype)
    Wref = W.to(torch.bfloat16).float() if dtype == "bf16" else W  # the weights the kernel actually holds
    xm = np.zeros_like(x)
    xm[act] = x[act]
    expected = (Wref @ torch.from_numpy(xm)).numpy()
    for threads in (1, 2):
        y = np.full(n_out, np.nan, np.float32)
        cw = c_weight(wt)
        assert kernels().sp_test_gemv(ctypes.byref(cw), n_in, n_out, ptr(x), ptr(act), len(act), ptr(y), threads) == 0
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    if sparsity == 1.0:
        assert np.all(y == 0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_row_gemv_on_selected_rows(dtype):
    rng = np.random.default_rng(3)
    W = torch.randn(300, 70)
    x = rng.standard_normal(70).astype(np.float32)
    rows = np.array([0, 5, 6, 100, 299], np.int32)
    w = weight_array(W, dtype)
    Wref = (W.to(torch.bfloat16).float() if dtype == "bf16" else W).numpy()
    y = np.zeros(300, np.float32)
    cw = c_weight(w)
    kernels().sp_test_dot_rows(ctypes.byref(cw), 70, 300, ptr(x), ptr(rows), len(rows), ptr(y), 2)
    np.testing.assert_allclose(y[rows], Wref[rows] @ x, rtol=1e-4, atol=1e-4)
    assert np.all(np.delete(y, rows) == 0)
    kernels().sp_test_dot_rows(ctypes.byref(cw), 70, 300, ptr(x), None, 0, ptr(y), 2)  # all rows
    np.testing.assert_allclose(y, Wref @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_masks_equal_the_torch_rules(n):
    x = torch.randn(n) * torch.rand(n) * 3
    xs = x.numpy().copy()
    act = np.zeros(n, np.int32)
    cases = [(RuleKind.THRESHOLD, 0.0, np.full(n, 0.7, np.float32), ThresholdRule(0.7)),
             (RuleKind.THRESHOLD, 0.0, np.linspace(0, 2, n).astype(np.float32), ThresholdRule(torch.linspace(0, 2, n)))]
    for s in (0.0, 0.3, 0.5, 1.0):
        cases.append((RuleKind.TOPK, s, None, TopKRule(s)))
    for s in (0.3, 0.7):
        g = GaussianTopKRule(s)
        cases.append((RuleKind.GAUSSIAN_TOPK, g.z, None, g))
    for kind, param, thr, rule in cases:
        m = kernels().sp_test_mask(int(kind), param, ptr(thr) if thr is not None else None, ptr(xs), n, ptr(act))
        expected = torch.nonzero(rule(x[None])[0] != 0).flatten().numpy()
        assert m == len(expected) and np.array_equal(act[:m], expected), (kind, param)


# --- ABI and loading -------------------------------------------------------------------------------
def test_kernel_abi_agrees_with_the_ctypes_structs():
    lib = kernels()
    assert lib.sp_abi_version() == ABI_VERSION
    for which, cls in STRUCTS.values():
        assert lib.sp_struct_size(which) == ctypes.sizeof(cls) > 0
    assert lib.sp_struct_size(99) == -1
    assert lib.sp_rule_kinds().decode() == "".join(f"{k.name}={k.value}," for k in RuleKind)


def test_a_stale_kernel_build_is_refused(monkeypatch, tmp_path):
    path = library_path()
    expected = rf"stale build \(ABI {ABI_VERSION}, this sparsen needs {ABI_VERSION + 1}\).*pip install -e \."
    with pytest.raises(SparsenError, match=expected) as e:
        open_kernels(path, abi_version=ABI_VERSION + 1)
    assert "\n" not in str(e.value)

    class Bigger(ctypes.Structure):
        _fields_ = [*STRUCTS["sp_layer"][1]._fields_, ("extra", ctypes.c_void_p)]

    monkeypatch.setitem(STRUCTS, "sp_layer", (STRUCTS["sp_layer"][0], Bigger))
    with pytest.raises(SparsenError, match=r"sizeof\(sp_layer\).*pip install -e \."):
        open_kernels(path)
    monkeypatch.undo()
    libm = ctypes.util.find_library("m")  # a library without the ABI symbol: a build from before ABI versions
    if libm:
        with pytest.raises(SparsenError, match="stale build"):
            open_kernels(libm)
    junk = tmp_path / "_kernels.so"
    junk.write_bytes(b"not a library")
    with pytest.raises(SparsenError, match="could not be loaded"):
        open_kernels(junk)


def test_kernels_without_their_openmp_runtime_are_a_one_line_error(tmp_path):
    # a build whose libgomp is missing on this machine: the same library, its NEEDED entry renamed
    data = library_path().read_bytes()
    if b"libgomp.so.1" not in data:
        pytest.skip("the kernels are not linked against libgomp.so.1 here")
    broken = tmp_path / "_kernels_nogomp.so"
    broken.write_bytes(data.replace(b"libgomp.so.1", b"libgomx.so.1"))
    with pytest.raises(SparsenError, match=r"could not be loaded \(libgomx.so.1.*install the OpenMP runtime") as e:
        open_kernels(broken)
    assert "\n" not in str(e.value)


def test_engine_without_built_kernels_says_how_to_build(monkeypatch, tiny_llama):
    import sparsen.engine as eng

    monkeypatch.setattr(eng, "_LIB", None)
    monkeypatch.setattr(eng, "library_path", lambda: None)
    with pytest.raises(SparsenError, match="not built.*pip install -e") as e:
        Engine(tiny_llama)
    assert "\n" not in str(e.value)


# --- bounds ---------------------------------------------------------------------------------------
def test_out_of_range_tokens_and_positions_are_errors_not_crashes(tiny_llama):
    engine = Engine(tiny_llama, threads=2, max_seq=4)
    for bad in (engine.vocab, engine.vocab + 1000, -1):
        with pytest.raises(SparsenError, match="outside the vocabulary"):
            engine.step(bad)
    # the C step checks too, whatever Python passes it
    lib, m, logits = engine.lib, ctypes.byref(engine._model), ptr(engine.logits)
    assert lib.sp_decode_step(m, engine._ws, 0, engine.vocab, logits, 1, 0) == -2
    assert lib.sp_decode_step(m, engine._ws, 0, -5, logits, 1, 0) == -2
    assert lib.sp_decode_step(m, engine._ws, 4, 1, logits, 1, 0) == -1
    assert lib.sp_decode_step(m, engine._ws, -1, 1, logits, 1, 0) == -1
    assert lib.sp_decode_step(m, engine._ws, 3, 1, logits, 1, 0) == 0
    for t in (1, 2, 3, 4):
        engine.step(t)
    with pytest.raises(SparsenError, match="context is full"):
        engine.step(5)
    with pytest.raises(SparsenError, match="larger max_seq"):
        engine.generate([1, 2, 3], 8)


def test_workspace_refuses_bad_shapes(tiny_llama):
    engine = Engine(tiny_llama, threads=2, max_seq=8)
    lib, status = engine.lib, ctypes.c_int(0)
    for field, value, code in (("n_heads", 3, -4), ("head_dim", 15, -3), ("vocab", 0, -3), ("activation", 7, -3)):
        m = Model.from_buffer_copy(engine._model)
        setattr(m, field, value)
        assert not lib.sp_workspace_create(ctypes.byref(m), 2, ctypes.byref(status))
        assert status.value == code, field
    assert not lib.sp_workspace_create(ctypes.byref(engine._model), 0, ctypes.byref(status))
    ws = lib.sp_workspace_create(ctypes.byref(engine._model), 2, ctypes.byref(status))
    assert ws and status.value == 0
    lib.sp_workspace_free(ws)


# --- dense engine against HF -------------------------------------------------------------------------
def assert_matches_hf(lm, ids, new_tokens, dtype="fp32", ref_model=None, rtol=1e-4):
    """Engine logits at every prompt position and its greedy tokens equal the torch model's (``ref_model``: the
    model the engine should equal, default lm's own)."""
    ref_model = ref_model or lm.model
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        hf = ref_model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False)
    engine = Engine(lm, dtype=dtype, threads=2, max_seq=256)
    engine.reset()
    worst = 0.0
    for i, t in enumerate(ids):
        got = engine.step(t, dense=True)
        worst = max(worst, float(np.abs(got - ref[i]).max() / np.abs(ref[i]).max()))
    assert worst <= rtol
    assert engine.generate(ids, new_tokens) == hf[0, len(ids):].tolist()
    return engine, ref


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_dense_engine_matches_hf_logits_and_greedy_tokens(spec):
    assert_matches_hf(load_model(spec), list(range(60, 90)), 64)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_tiny_gemma3_dense_engine_matches_hf(softcap):
    lm = tiny_gemma3(softcap)
    ad = lm.adapter
    assert [b.sliding_window for b in ad.blocks] == [8, 8, None] and ad.n_kv_heads == 1
    ids = list(range(60, 90))  # 30 prompt positions and 64 generated: far beyond the window of 8
    engine, ref = assert_matches_hf(lm, ids, 64)
    # the window is what makes it match: the same engine attending to every position does not
    for i in range(engine.n_layers):
        engine._layers[i].window = 0
    engine.reset()
    last = [engine.step(t, dense=True).copy() for t in ids][-1]
    assert np.abs(last - ref[-1]).max() > 1e-2 * np.abs(ref[-1]).max()


def bf16_rounded(lm):
    """lm with every weight the bf16 engine holds rounded to bf16 (block linears, lm_head; not the embedding,
    norms or biases, which the engine keeps in fp32); the lm_head is untied for that."""
    model = copy.deepcopy(lm.model)
    ad = adapter_for(model)
    with torch.no_grad():
        for b in ad.blocks:
            for lin in b.linears.values():
                lin.weight.copy_(lin.weight.to(torch.bfloat16).float())
        ad.lm_head.weight = torch.nn.Parameter(ad.lm_head.weight.to(torch.bfloat16).float(), requires_grad=False)
    return dataclasses.replace(lm, model=model, adapter=ad, _fingerprint=lm.fingerprint)


@pytest.mark.parametrize("make", [lambda: load_model("tiny-llama"), tiny_gemma3], ids=["tiny-llama", "tiny-gemma3"])
def test_bf16_engine_matches_the_model_with_bf16_rounded_weights(make):
    lm = make()
    ref_lm = bf16_rounded(lm)
    ids = list(range(60, 90))
    # Same tolerance as fp32: the engine widens each bf16 weight exactly and computes in fp32, as the reference
    # does on the same rounded values, so only the order of the fp32 sums differs (~1e-6 relative here).
    engine, ref = assert_matches_hf(lm, ids, 32, dtype="bf16", ref_model=ref_lm.model)
    # and the rounding is visible: the fp32 model is much further away than the tolerance
    with torch.no_grad():
        full = lm.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(full - ref).max() > 10 * 1e-4 * np.abs(ref).max()


# --- sparse engine against the masked torch computation ------------------------------------------------
def reference_logits(lm, plan, ids, prompt):
    """The plan applied as ``sparsen.sparsify_`` does (transform, then hooks), positions >= prompt sparse."""
    plan.transform_(lm)
    sp = plan.build_sparsifier(lm, dense_prefix=prompt)
    with torch.no_grad(), sp:
        return lm.model(torch.tensor([ids])).logits[0].numpy(), sp.achieved()


def engine_logits(engine, ids, prompt):
    engine.prefill(ids[:prompt])
    out = [engine.logits.copy()]
    for t in ids[prompt:-1]:
        out.append(engine.step(t).copy())
    return np.stack(out)


def hand_plan(lm, kind):
    """Plans for the rule kinds whose methods need more calibration than a unit test should spend."""
    plan = plan_for(lm, "teal", 0.0)
    d, inter = lm.adapter.hidden_size, lm.adapter.intermediate_size
    g = torch.Generator().manual_seed(0)
    for b in range(lm.adapter.n_layers):
        if kind == "gate_act":
            plan.tensors[f"g{b}"] = torch.rand(inter, generator=g) * 0.3
            plan.sites[f"layers.{b}.down"] = {"rule": "gate_act", "tensor": f"g{b}"}
            plan.sites[f"layers.{b}.up"] = {"rule": "dense"}
        else:  # per-linear channel thresholds: q, k, v get different masks
            for n in ("q", "k", "v", "gate", "up"):
                plan.tensors[f"{n}{b}"] = torch.rand(d, generator=g) * 1.2
                plan.sites[f"layers.{b}.{n}"] = {"rule": "channel_threshold", "tensor": f"{n}{b}"}
    return plan


def method_plan(lm, method, cats=0.4):
    """A plan of ``method`` (``rotate:3``: 3 runs of layers; ``hand:...``: hand_plan; ``...+tune``: weights tuned
    to it) at 0.5, CATS at ``cats`` (it reaches only what the MLP's share of the weights allows)."""
    if method.startswith("hand:"):
        return hand_plan(lm, method.split(":")[1])
    method, tuned, _ = method.partition("+tune")  # weights tuned to the plan: a second transform
    name, _, segments = method.partition(":")
    return plan_for(lm, name, cats if name == "cats" else 0.5, **({"segments": int(segments)} if segments else {}),
                    **({"tune_steps": 4, "tune_rank": 4, "tune_lr": 1e-2, "tune_rank_lr": 1e-3} if tuned else {}))


def state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("method", ["teal", "topk", "stat-topk", "rotate", "rotate:3", "rotate-wina", "rotate-topk",
                                    "wina", "rsparse", "chess", "cats", "moefy", "hand:gate_act", "hand:channel",
                                    "teal+tune", "rotate:3+tune"])
def test_sparse_engine_equals_masked_dense_computation(method):
    source = load_model("tiny-llama")
    plan = method_plan(source, method)
    ids = [int(t) for t in torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(1))]
    prompt = 20
    ref, ref_sparsity = reference_logits(load_model("tiny-llama"), plan, ids, prompt)
    before = state(source)
    engine = Engine(source, plan, threads=2, max_seq=64)
    # the engine leaves the caller's model as it was (a rotation plan is applied to its own copy)
    assert source.transform_key is None and all(torch.equal(v, before[k]) for k, v in state(source).items())
    got = engine_logits(engine, ids, prompt)
    np.testing.assert_allclose(got, ref[prompt - 1: len(ids) - 1], rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    # the engine skips what the reference zeroes (the reference also counts the first sparse position's input)
    assert engine.achieved()["overall"] == pytest.approx(ref_sparsity["overall"], abs=0.03)
    assert engine.achieved()["overall"] > 0.1  # the plan really skips weights


@pytest.mark.parametrize("method", ["teal", "cats", "wina", "moefy", "teal+tune"])
def test_sparse_engine_on_tiny_gemma3(method):
    # gelu_tanh gate activations (CATS), the branch-output norms and QK-norm under masks
    plan = method_plan(tiny_gemma3(), method, cats=0.3)
    ids = [int(t) for t in torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2))]
    prompt = 16
    ref, ref_sparsity = reference_logits(tiny_gemma3(), plan, ids, prompt)
    engine = Engine(tiny_gemma3(), plan, threads=2, max_seq=64)
    got = engine_logits(engine, ids, prompt)
    np.testing.assert_allclose(got, ref[prompt - 1: len(ids) - 1], rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert engine.achieved()["overall"] == pytest.approx(ref_sparsity["overall"], abs=0.03)
    assert engine.achieved()["overall"] > 0.1


def test_engine_takes_the_plan_sparsify_applied(tiny_llama):
    plan = plan_for(tiny_llama, "rotate", 0.5, segments=3)
    ids = [int(t) for t in torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))]
    expected = engine_logits(Engine(load_model("tiny-llama"), plan, max_seq=64), ids, 16)
    lm = load_model("tiny-llama")
    sparsen.sparsify_(lm, plan)  # lm now carries the rotation: the engine reads it as it is
    engine = Engine(lm, max_seq=64)
    assert engine.plan is plan
    np.testing.assert_allclose(engine_logits(engine, ids, 16), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    sparsen.unsparsify_(lm)  # the rotation stays in lm's weights; its changes of basis are only the plan's
    with pytest.raises(SparsenError, match="carries a plan's weight transform but no plan"):
        Engine(lm)
    with pytest.raises(SparsenError, match="carries another plan's weight transform"):
        Engine(lm, plan_for(tiny_llama, "teal", 0.5))


def test_engine_refuses_a_plan_for_another_model(tiny_llama, tiny_qwen2):
    plan = plan_for(tiny_llama, "teal", 0.5)
    with pytest.raises(SparsenError, match="made for model"):
        Engine(tiny_qwen2, plan)


# --- generation --------------------------------------------------------------------------------------
def test_generate_text_decodes_the_greedy_tokens(tiny_llama):
    engine = Engine(tiny_llama, max_seq=64)
    ids = tiny_llama.tokenizer("Hello", add_special_tokens=False)["input_ids"]
    tokens = engine.generate(ids, 12, eos_token_id=tiny_llama.tokenizer.eos_token_id)
    text = engine.generate_text("Hello", max_new_tokens=12)
    assert text == tiny_llama.tokenizer.decode(tokens, skip_special_tokens=True) and text
    assert engine.generate_text("Hello", max_new_tokens=12, temperature=1.0, seed=5) == \
        engine.generate_text("Hello", max_new_tokens=12, temperature=1.0, seed=5)
    with pytest.raises(SparsenError, match="no chat template"):
        engine.generate_text("Hello", chat=True)


def test_greedy_steps_end_on_generates_last_token(tiny_llama):
    engine = Engine(tiny_llama, plan_for(tiny_llama, "teal", 0.5), max_seq=64)
    ids = tiny_llama.tokenizer("Hello", add_special_tokens=False)["input_ids"]
    tokens = engine.generate(ids, 12)
    first = int(np.argmax(engine.prefill(ids)))
    assert first == tokens[0] and engine.greedy_steps(first, 11) == tokens[-1]
    assert engine.pos == len(ids) + 11 and engine.greedy_steps(tokens[-1], 0) == tokens[-1]


def test_sampling_is_seeded_and_respects_top_p():
    logits = np.array([5.0, 4.9, -10, -10], np.float32)
    picks = {sample(logits, 1.0, 0.5, np.random.default_rng(s)) for s in range(20)}
    assert picks == {0}  # top-p 0.5 keeps only the most likely token
    a = [sample(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(5)]
    assert a == [sample(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(5)]
    assert sample(logits, 0.0, 1.0, None) == 0


# --- command line ------------------------------------------------------------------------------------
def test_cli_generate_and_bench(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-llama", "--method", "teal", "--sparsity", "0.5", "--tokens", "1024",
                 "--ctx", "256", "--out", str(plan), "--quiet"]) == 0
    assert main(["generate", "--model", "tiny-llama", "--plan", str(plan), "--prompt", "Hello", "--max-new-tokens",
                 "8"]) == 0
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-llama", "--plan", str(plan), "--vs", "hf", "--profile", "--prompt-tokens",
                 "16", "--new-tokens", "8", "--rounds", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    for key in ("engine_dense_tok_s", "engine_sparse_tok_s", "hf_tok_s", "llamacpp_tok_s", "achieved_sparsity",
                "speedup_vs_dense", "bound_speedup", "threads", "weights_dtype"):
        assert key in d
    assert d["engine_dense_tok_s"] > 0 and d["hf_tok_s"] > 0 and d["llamacpp_tok_s"] is None
    assert 0.3 < d["achieved_sparsity"] < 0.7 and d["bound_speedup"] > 1
    assert d["profile"]["dense_ms"] > 0 and d["profile"]["rest_ms"] > 0  # (too small a model to split reliably)
    assert main(["generate", "--model", "tiny-qwen2", "--plan", str(plan), "--prompt", "Hi"]) == 2
    assert main(["bench", "--model", "tiny-llama", "--plan", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "made for model 'tiny-llama'" in err and "not found" in err


def test_cli_generate_with_a_rotation_plan(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-llama", "--method", "rotate", "--sparsity", "0.5", "--tokens", "1024",
                 "--ctx", "256", "--out", str(plan), "--quiet"]) == 0
    assert main(["generate", "--model", "tiny-llama", "--plan", str(plan), "--prompt", "Hello", "--max-new-tokens",
                 "4"]) == 0
    assert "achieved sparsity" in capsys.readouterr().err


def test_timing_the_linears_counts_every_product_and_changes_no_logit(tiny_llama):
    plan = plan_for(tiny_llama, "teal", 0.5)
    ids = [3, 14, 15, 92, 65]
    logits = {}
    for timed in (False, True):
        engine = Engine(tiny_llama, plan, threads=2, max_seq=16)
        timing = engine.time_linears() if timed else None
        engine.prefill(ids)
        logits[timed] = np.stack([engine.step(t).copy() for t in (7, 8, 9)])
    np.testing.assert_array_equal(logits[True], logits[False])  # the clock reads change nothing computed
    layers = engine.n_layers
    assert timing.shape == (2, 7, 3) and (timing[:, :, 2] == layers * (len(ids) + 3)).all()  # prefill steps too
    assert (timing[:, :, 0] > 0).all() and (timing[:, :, 1] >= 0).all()
    engine.time_linears(False)
    engine.step(10)
    assert (timing[:, :, 2] == layers * (len(ids) + 3)).all()  # off: no longer written


def test_bench_ratio_quartiles_are_numpys_over_the_same_rounds():
    from sparsen.engine.commands import _per_round, _per_round_quartiles

    rng = np.random.default_rng(0)
    runs = {"a": list(rng.uniform(150, 250, 11)), "b": list(rng.uniform(100, 140, 11))}
    ratios = np.array(runs["a"]) / np.array(runs["b"])
    assert _per_round(runs, "a", "b") == pytest.approx(np.median(ratios))
    assert _per_round_quartiles(runs, "a", "b") == pytest.approx(np.quantile(ratios, [0.25, 0.75]))
    assert _per_round_quartiles({"a": runs["a"][:3], "b": runs["b"][:3]}, "a", "b") is None


def test_profile_line_survives_a_noisy_split():
    # A run without block linears can time slower than the dense run on a tiny model (CI failed on this once).
    from sparsen.engine.commands import profile_line

    pr = {"dense_ms": 1.0, "rest_ms": 1.1, "block_linears_ms": -0.1, "block_linears_gb_s": None,
          "block_linear_mb": 1.0, "lm_head_mb": 0.1}
    assert "not measurable" in profile_line(pr, 20)
    assert "10.0 GB/s" in profile_line({**pr, "block_linears_gb_s": 10.0}, 20)


# --- real models -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_dense_engine_matches_hf_generate(smollm2):
    ids = smollm2.tokenizer("The history of the city begins", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf = smollm2.model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
        ref = smollm2.model(hf[:, :-1]).logits[0].numpy()
    engine = Engine(smollm2, threads=2, max_seq=128)
    tokens = engine.generate(ids, 64)
    assert tokens == hf[0, len(ids):].tolist()
    engine.reset()
    for i, t in enumerate(hf[0, :-1].tolist()):
        got = engine.step(t, dense=True)
        assert np.abs(got - ref[i]).max() <= 1e-3 * np.abs(ref[i]).max()


@pytest.mark.slow
def test_gemma3_270m_engine_greedy_equals_hf_generate():
    from sparsen.engine import prompt_ids

    lm = load_model("gemma3")
    ids = prompt_ids(lm, "The history of the city begins", chat=False)
    assert ids[0] == lm.tokenizer.bos_token_id  # Gemma's tokenizer adds BOS; without it the model degenerates
    with torch.no_grad():
        hf = lm.model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    engine = Engine(lm, threads=2, max_seq=128)
    assert engine.vocab == 262144 and engine.head_dim == 256 and engine.n_kv == 1
    tokens = engine.generate(ids, 32)
    assert tokens == hf[0, len(ids):].tolist()
    assert len(set(tokens)) > 8  # a real continuation, not one token repeated


def test_prompt_ids_keep_the_bos_a_tokenizer_adds():
    from types import SimpleNamespace

    from tokenizers import processors

    from sparsen.engine import prompt_ids

    plain = byte_tokenizer()
    text = plain("Hi", add_special_tokens=False)["input_ids"]
    assert prompt_ids(SimpleNamespace(tokenizer=plain, spec="t"), "Hi", chat=False) == text
    with_bos = byte_tokenizer()  # a tokenizer that adds BOS, as Gemma's does
    bos = with_bos.bos_token_id
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert with_bos("Hi")["input_ids"] == [bos, *text]
    assert prompt_ids(SimpleNamespace(tokenizer=with_bos, spec="t"), "Hi", chat=False) == [bos, *text]


@pytest.mark.parametrize("method", ["teal", "rotate-wina"])
def test_sparse_engine_holds_a_prompt_hold_plan_as_the_torch_hooks_do(method):
    # hold='prompt': the thresholds are rescaled on the prompt's dense inputs before the continuation runs
    plan = plan_for(load_model("tiny-llama"), method, 0.5, hold="prompt")
    ids = [int(t) for t in torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(3))]
    prompt = 24
    ref, ref_sparsity = reference_logits(load_model("tiny-llama"), plan, ids, prompt)
    engine = Engine(load_model("tiny-llama"), plan, threads=2, max_seq=64)
    got = engine_logits(engine, ids, prompt)
    np.testing.assert_allclose(got, ref[prompt - 1: len(ids) - 1], rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert engine.achieved()["overall"] == pytest.approx(ref_sparsity["overall"], abs=0.03)
    calibrated = Engine(load_model("tiny-llama"), plan_for(load_model("tiny-llama"), method, 0.5), threads=2, max_seq=64)
    assert not np.allclose(engine_logits(calibrated, ids, prompt), got)  # the rescaling changed something
