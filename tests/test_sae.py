"""Sparse dictionaries: hook points, architectures against hand computations and against SAELens / sparsify
checkpoints, metric formulas, the activation cache (resume, refusals), the trainer (determinism, resume, planted
features recovered)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsen.errors import SparsenError
from sparsen.models.hookpoints import KINDS, attach, hook_point, read_activations
from sparsen.sae import build_sae, sae_config
from sparsen.sae.cache import ActivationCache, build_cache, write_cache
from sparsen.sae.formats import load_sae, save_saelens, save_sparsify
from sparsen.sae.metrics import ReconstructionStats, mean_activation, reconstruction_metrics, spliced_metrics
from sparsen.sae.trainer import TrainConfig, train

FIXTURES = Path(__file__).parent / "data" / "sae"
FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists())


# --- hook points ---------------------------------------------------------------------------------------------------
def test_hook_points_read_what_the_model_computes(tiny_llama):
    lm = tiny_llama
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    names = [f"blocks.1.{k}" for k in KINDS]
    acts = read_activations(lm.adapter, ids, [hook_point(lm.adapter, n) for n in names])
    hs = lm.model(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(acts["blocks.1.hook_resid_pre"], hs[1])
    assert torch.allclose(acts["blocks.1.hook_resid_post"], hs[2], atol=1e-6)
    b = lm.adapter.blocks[1]
    # resid_post = resid_pre + attention branch + mlp_out; attention branch = sum of head results (o has no bias)
    attn = acts["blocks.1.attn.hook_result"].sum(-2)
    assert torch.allclose(acts["blocks.1.hook_resid_pre"] + attn + acts["blocks.1.hook_mlp_out"],
                          acts["blocks.1.hook_resid_post"], atol=1e-5)
    assert torch.allclose(b.linears["o"](acts["blocks.1.attn.hook_z"]), attn, atol=1e-5)
    assert torch.allclose(b.mlp(acts["blocks.1.hook_mlp_in"]), acts["blocks.1.hook_mlp_out"], atol=1e-6)


def test_hook_replacement_by_itself_changes_nothing_and_zeros_change_logits(tiny_llama):
    lm = tiny_llama
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    clean = lm.model(ids).logits
    for kind in KINDS:
        h = attach(lm.adapter, f"blocks.0.{kind}", lambda a: a.clone())
        try:
            assert torch.allclose(lm.model(ids).logits, clean, atol=1e-5), kind
        finally:
            h.remove()
    h = attach(lm.adapter, "blocks.0.hook_mlp_out", torch.zeros_like)
    try:
        assert not torch.allclose(lm.model(ids).logits, clean, atol=1e-3)
    finally:
        h.remove()


def test_unknown_hook_is_a_one_line_error(tiny_llama):
    with pytest.raises(SparsenError, match="unknown hook 'blocks.9.hook_resid_post'.*N in 0..2"):
        hook_point(tiny_llama.adapter, "blocks.9.hook_resid_post")
    with pytest.raises(SparsenError, match="unknown hook"):
        hook_point(tiny_llama.adapter, "model.layers.0")


# --- architectures: hand computations -----------------------------------------------------------------------------
def _set(sae, **tensors):
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(sae, k).copy_(torch.as_tensor(v, dtype=torch.float32))
    return sae


def _hand_weights():
    W_enc = torch.tensor([[1.0, -1.0, 0.5, 2.0], [0.0, 1.0, -2.0, 1.0]])  # d_in 2, d_sae 4
    b_enc = torch.tensor([0.1, 0.0, -0.2, -1.0])
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]])
    b_dec = torch.tensor([0.5, -0.5])
    return dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)


X = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
# pre = X @ W_enc + b_enc, by hand:
# row 0: [1.1, 1.0, -3.7, 3.0]; row 1: [-0.9, 1.5, -1.7, -1.5]
PRE = torch.tensor([[1.1, 1.0, -3.7, 3.0], [-0.9, 1.5, -1.7, -1.5]])


@pytest.mark.parametrize("arch,fields,latents", [
    ("standard", {}, [[1.1, 1.0, 0.0, 3.0], [0.0, 1.5, 0.0, 0.0]]),
    ("topk", {"k": 2}, [[1.1, 0.0, 0.0, 3.0], [0.0, 1.5, 0.0, 0.0]]),
    ("abstopk", {"k": 2}, [[0.0, 0.0, -3.7, 2.4], [0.0, 0.0, -1.7, -3.1]]),  # b_enc[3] = -1.6 below
    ("jumprelu", {}, [[1.1, 0.0, 0.0, 3.0], [0.0, 1.5, 0.0, 0.0]]),
    ("batchtopk", {"k": 2}, [[1.1, 1.0, 0.0, 3.0], [0.0, 1.5, 0.0, 0.0]]),
])
def test_forward_equals_a_hand_computation(arch, fields, latents):
    sae = _set(build_sae(sae_config(arch, d_in=2, d_sae=4, **fields)), **_hand_weights())
    if arch == "jumprelu":
        sae.load_extra_state_tensors({"threshold": torch.tensor([1.05, 1.2, 0.1, 2.0])})  # 1.0 < 1.2 drops latent 1 of row 0
    if arch == "batchtopk":
        sae.threshold.fill_(0.95)
    if arch == "abstopk":  # with b_enc[3] = -1.0, row 1's |pre| ties (1.5, 1.5); -1.6 gives pre[:, 3] = 2.4, -3.1
        sae.b_enc.data[3] = -1.6
    out = sae(X)
    L = torch.tensor(latents)
    assert torch.allclose(out.latents, L, atol=1e-6)
    assert torch.allclose(out.recon, L @ _hand_weights()["W_dec"] + _hand_weights()["b_dec"], atol=1e-6)


def test_apply_b_dec_skip_and_transcoder_by_hand():
    w = _hand_weights()
    sae = _set(build_sae(sae_config("standard", d_in=2, d_sae=4, apply_b_dec_to_input=True)), **w)
    pre = (X - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert torch.allclose(sae(X).latents, pre.clamp_min(0))
    tc = build_sae(sae_config("topk", d_in=2, d_sae=4, d_out=3, k=1, skip=True))
    W_dec3 = torch.arange(12.0).reshape(4, 3) / 10
    W_skip = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    _set(tc, W_enc=w["W_enc"], b_enc=w["b_enc"], W_dec=W_dec3, b_dec=[0.0, 1.0, 2.0], W_skip=W_skip)
    f = torch.tensor([[0.0, 0.0, 0.0, 3.0], [0.0, 1.5, 0.0, 0.0]])
    assert torch.allclose(tc(X).latents, f)
    assert torch.allclose(tc(X).recon, f @ W_dec3 + torch.tensor([0.0, 1.0, 2.0]) + X @ W_skip.T)


def test_bad_configs_are_one_line_errors():
    with pytest.raises(SparsenError, match="unknown architecture 'gated'"):
        sae_config("gated", d_in=4, d_sae=8)
    with pytest.raises(SparsenError, match="k must be in 1..d_sae"):
        sae_config("topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(SparsenError, match="has no field 'width'"):
        sae_config("topk", d_in=4, width=8)
    with pytest.raises(SparsenError, match="apply_b_dec_to_input needs d_out == d_in"):
        sae_config("topk", d_in=4, d_sae=8, d_out=5, apply_b_dec_to_input=True)


# --- formats: checkpoints written by SAELens and sparsify themselves --------------------------------------------------
@pytest.mark.parametrize("folder", FIXTURE_DIRS, ids=lambda p: p.name)
def test_reference_library_checkpoints_give_their_latents(folder):
    """Each folder was written by SAELens 6.54.12 or eai-sparsify 1.3.3 (scripts/sae_reference_fixtures.py), with
    the latents and reconstruction that library computed for ``x``."""
    sae = load_sae(folder)
    ref = load_file(folder / "reference.safetensors")
    with torch.no_grad():
        out = sae(ref["x"])
    assert torch.allclose(out.latents, ref["latents"], atol=1e-5)
    assert torch.allclose(out.recon, ref["recon"], atol=1e-5)


@pytest.mark.parametrize("folder", FIXTURE_DIRS, ids=lambda p: p.name)
def test_saved_checkpoints_load_back_identical(folder, tmp_path):
    sae = load_sae(folder)
    x = load_file(folder / "reference.safetensors")["x"]
    save_saelens(sae, tmp_path / "saelens")
    again = load_sae(tmp_path / "saelens")
    assert torch.equal(again(x).latents, sae(x).latents) and torch.equal(again(x).recon, sae(x).recon)
    if folder.name.startswith("sparsify"):
        save_sparsify(sae, tmp_path / "sparsify")
        again = load_sae(tmp_path / "sparsify")
        assert torch.allclose(again(x).recon, sae(x).recon, atol=1e-6)
        assert (tmp_path / "sparsify" / "sae.safetensors").exists()


def test_checkpoint_refusals(tmp_path):
    folder = FIXTURES / "saelens-topk"
    with pytest.raises(SparsenError, match="reads 16-wide activations but the hook gives 576"):
        load_sae(folder, d_in=576)
    with pytest.raises(SparsenError, match="has no cfg.json"):
        load_sae(tmp_path)
    with pytest.raises(SparsenError, match="sparsify holds TopK dictionaries only"):
        save_sparsify(load_sae(FIXTURES / "saelens-standard"), tmp_path / "x")


# --- metrics --------------------------------------------------------------------------------------------------------
def test_fvu_identity_zero_and_mean_only_one():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(500, 8, generator=g) * 3 + 5
    f = torch.ones(500, 4)
    s = ReconstructionStats(4)
    s.update(t, t, f)
    assert s.result()["fvu"] == pytest.approx(0.0, abs=1e-12)
    m = ReconstructionStats(4)
    for chunk in t.split(128):  # batches: the mean is the whole set's, not each batch's
        m.update(chunk, t.mean(0).expand_as(chunk), torch.zeros(chunk.shape[0], 4))
    r = m.result()
    assert r["fvu"] == pytest.approx(1.0, abs=1e-6)
    assert r["l0"] == 0 and r["dead_fraction"] == 1.0
    assert s.result()["relative_reconstruction_bias"] == pytest.approx(1.0) and s.result()["l2_ratio"] == pytest.approx(1.0)


def _identity_dictionary(d):
    sae = build_sae(sae_config("abstopk", d_in=d, d_sae=d, k=d))  # signed, every latent kept: x_hat = x exactly
    return _set(sae, W_enc=torch.eye(d), W_dec=torch.eye(d))


def test_ce_loss_score_identity_one_and_zero_ablation_zero(tiny_llama):
    lm = tiny_llama
    wins = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    hook = "blocks.1.hook_resid_post"
    mean = mean_activation(lm, hook, wins)
    ident = _identity_dictionary(64)
    ident.cfg = sae_config("abstopk", d_in=64, d_sae=64, k=64, hook_name=hook)
    r = spliced_metrics(lm, ident, wins, mean, progress=False)
    assert r["ce_loss_score_zero"] == pytest.approx(1.0, abs=1e-4) and r["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_loss_score_mean"] == pytest.approx(1.0, abs=1e-4)
    zero = build_sae(sae_config("topk", d_in=64, d_sae=64, k=1, hook_name=hook))  # all weights 0: x_hat = 0
    r0 = spliced_metrics(lm, zero, wins, mean, progress=False)
    assert r0["ce_loss_score_zero"] == pytest.approx(0.0, abs=1e-6)
    assert r0["ce_sae"] == pytest.approx(r0["ce_zero_ablation"])
    rec = reconstruction_metrics(lm, ident, wins, progress=False)
    assert rec["fvu"] == pytest.approx(0.0, abs=1e-10) and rec["tokens"] == 2 * 31


# --- the activation cache ---------------------------------------------------------------------------------------------
HOOKS = ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]


def _cache(lm, out, tokens, **kw):
    return build_cache(lm, HOOKS, tokens, out, corpus="wikitext2-valid", ctx=64, shard_tokens=100, batch_windows=2,
                       progress=False, **kw)


def test_cache_resumes_without_duplicating_tokens(tiny_llama, tmp_path, monkeypatch):
    lm = tiny_llama
    _cache(lm, tmp_path / "fresh", 450)
    fresh = ActivationCache(tmp_path / "fresh")
    assert fresh.tokens == 450 and [s["tokens"] for s in fresh.shards] == [100, 100, 100, 100, 50]
    # an interrupted run: the third shard's write fails
    import sparsen.sae.cache as cache_mod

    real, calls = cache_mod._write_shard, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        _cache(lm, tmp_path / "cut", 450)
    monkeypatch.setattr(cache_mod, "_write_shard", real)
    assert ActivationCache(tmp_path / "cut").tokens == 200
    _cache(lm, tmp_path / "cut", 300)  # resumed, and a smaller ask first
    _cache(lm, tmp_path / "cut", 450)  # then grown
    cut = ActivationCache(tmp_path / "cut")
    assert cut.tokens == 450
    a = {k: torch.cat([fresh.load_shard(i, [k])[k] for i in range(len(fresh.shards))]) for k in [*HOOKS, "positions"]}
    b = {k: torch.cat([cut.load_shard(i, [k])[k] for i in range(len(cut.shards))]) for k in [*HOOKS, "positions"]}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(a["positions"].unique(), a["positions"])  # no token twice
    # the cached rows are the hook's activations of those positions (position 0 of each window skipped)
    ids = torch.tensor(lm.tokenizer(open(Path(cache_mod.__file__).parents[1] / "data" / "wikitext-2-valid-tokenized.txt")
                                    .read(), add_special_tokens=False)["input_ids"][:128]).view(2, 64)
    acts = read_activations(lm.adapter, ids, [hook_point(lm.adapter, HOOKS[0])])[HOOKS[0]]
    assert torch.allclose(a[HOOKS[0]][:63], acts[0, 1:], atol=1e-6)
    assert a["positions"][0] == 1 and a["positions"][63] == 65


def test_cache_refusals(tiny_llama, tiny_qwen2, tmp_path):
    _cache(tiny_llama, tmp_path / "c", 100)
    with pytest.raises(SparsenError, match="holds a cache with another model"):
        _cache(tiny_qwen2, tmp_path / "c", 100)
    with pytest.raises(SparsenError, match="unknown hook"):
        build_cache(tiny_llama, ["blocks.7.hook_mlp_in"], 10, tmp_path / "d", progress=False)
    with pytest.raises(SparsenError, match="lower --tokens"):
        _cache(tiny_llama, tmp_path / "e", 10**9)
    assert not (tmp_path / "e").exists()
    with pytest.raises(SparsenError, match="was made from model"):
        ActivationCache(tmp_path / "c").check_model(tiny_qwen2)
    with pytest.raises(SparsenError, match="is not an activation cache"):
        ActivationCache(tmp_path)


# --- training -----------------------------------------------------------------------------------------------------
def _planted(n=24576, d=32, n_feat=64, per_token=3, seed=12345):  # not the trainer's seed: its init draws the same normals
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:per_token] for _ in range(n)])
    mags = torch.rand(n, per_token, generator=g) * 2 + 0.5
    x = (mags[..., None] * feats[idx]).sum(1) + 0.3  # an offset: b_dec matters
    return x, feats


def _recovery(sae, feats, signed=False):
    """Mean over planted features of the best cosine with a decoder row (|cosine| for a signed latent)."""
    dec = sae.W_dec.detach()
    cos = feats @ (dec / dec.norm(dim=1, keepdim=True)).T
    return float((cos.abs() if signed else cos).max(1).values.mean())


@pytest.mark.parametrize("arch,fields,lr,max_fvu", [
    ("topk", {"k": 3}, 1e-2, 0.1),
    ("batchtopk", {"k": 3}, 1e-2, 0.1),
    ("abstopk", {"k": 3}, 1e-2, 0.1),
    ("standard", {"l1_coefficient": 0.3}, 5e-3, 0.2),  # the L1 term shrinks every latent: FVU pays for it
    ("jumprelu", {"target_l0": 3.0, "init_threshold": 0.1, "bandwidth": 0.1}, 1e-2, 0.1),
])
def test_training_recovers_planted_features(arch, fields, lr, max_fvu, tmp_path):
    x, feats = _planted()
    write_cache(tmp_path / "cache", {"h": x})
    cache = ActivationCache(tmp_path / "cache")
    sae = build_sae(sae_config(arch, d_in=32, d_sae=96, hook_name="h", **fields))
    summary = train(sae, cache, TrainConfig(tokens=24576 * 6, batch=512, lr=lr, dead_tokens=20000,
                                            checkpoint_tokens=10**9), tmp_path / "out", progress=False)
    rec = _recovery(sae, feats, signed=arch == "abstopk")
    assert rec >= 0.9, (arch, rec, summary["final"])
    assert summary["final"]["fvu"] < max_fvu
    untrained = build_sae(sae.cfg)
    untrained.initialize(x[:512], x[:512], torch.Generator().manual_seed(0))  # the trainer's start
    assert _recovery(untrained, feats) < 0.6  # it does not pass by chance
    again = load_sae(tmp_path / "out")
    assert torch.allclose(again(x[:64]).recon, sae(x[:64]).recon, atol=1e-5)


def test_training_is_seeded_and_resumes_to_the_same_weights(tmp_path):
    x, _ = _planted(n=4096)
    write_cache(tmp_path / "cache", {"h": x}, shard_tokens=1000)
    cache = ActivationCache(tmp_path / "cache")
    cfg = sae_config("topk", d_in=32, d_sae=64, k=3, hook_name="h")
    tc = dict(tokens=256 * 40, batch=256, lr=3e-3, dead_tokens=2048, checkpoint_tokens=256 * 15)
    a = build_sae(cfg)
    train(a, cache, TrainConfig(**tc), tmp_path / "a", progress=False)
    b = build_sae(cfg)
    train(b, cache, TrainConfig(**tc), tmp_path / "b", progress=False)
    assert torch.equal(a.W_dec, b.W_dec)
    # stop after the second checkpoint (step 30), then resume
    import sparsen.sae.trainer as trainer_mod

    c = build_sae(cfg)
    real = trainer_mod._save_checkpoint
    saves = []

    def stop_after_two(*args, **kw):
        real(*args, **kw)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    trainer_mod._save_checkpoint = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            train(c, cache, TrainConfig(**tc), tmp_path / "c", progress=False)
    finally:
        trainer_mod._save_checkpoint = real
    with pytest.raises(SparsenError, match="pass --resume"):
        train(build_sae(cfg), cache, TrainConfig(**tc), tmp_path / "c", progress=False)
    d = build_sae(cfg)
    s = train(d, cache, TrainConfig(**tc), tmp_path / "c", resume=True, progress=False)
    assert s["steps"] == 40
    assert torch.allclose(d.W_dec, a.W_dec, atol=1e-6) and torch.allclose(d.W_enc, a.W_enc, atol=1e-6)
    with pytest.raises(SparsenError, match="other settings"):
        train(build_sae(cfg), cache, TrainConfig(**{**tc, "lr": 1e-3}), tmp_path / "c", resume=True, progress=False)


def test_training_refuses_a_dictionary_of_another_width(tmp_path):
    write_cache(tmp_path / "cache", {"h": torch.randn(100, 8)})
    sae = build_sae(sae_config("topk", d_in=16, d_sae=32, k=2, hook_name="h"))
    with pytest.raises(SparsenError, match="'h' is 8 wide but the dictionary's d_in is 16"):
        train(sae, ActivationCache(tmp_path / "cache"), TrainConfig(tokens=100, batch=10), tmp_path / "o",
              progress=False)


def test_sparse_topk_gradients_equal_dense_autograd():
    from sparsen.sae.sparse_ops import sparse_decode, topk_encode

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 6, generator=g)
    W = torch.randn(6, 15, generator=g, requires_grad=True)
    b = torch.randn(15, generator=g, requires_grad=True)
    D = torch.randn(15, 6, generator=g, requires_grad=True)
    dead = torch.zeros(15, dtype=torch.bool)
    dead[::3] = True
    for signed in (False, True):
        vals, idx, av, ai = topk_encode(x, W, b, 4, 3, dead, signed)
        loss = sparse_decode(vals, idx, D).pow(2).sum() + sparse_decode(av, ai, D).sum()
        gs = torch.autograd.grad(loss, [W, b, D])
        pre = x @ W + b
        score = pre.abs() if signed else pre
        i = score.topk(4, dim=1).indices
        f = torch.zeros_like(pre).scatter(1, i, pre.gather(1, i) if signed else pre.gather(1, i).clamp_min(0))
        ia = pre.masked_fill(~dead, float("-inf")).topk(3, dim=1).indices
        fa = torch.zeros_like(pre).scatter(1, ia, pre.gather(1, ia).clamp_min(0))
        ref = (f @ D).pow(2).sum() + (fa @ D).sum()
        gd = torch.autograd.grad(ref, [W, b, D])
        for a, r in zip(gs, gd):
            assert torch.allclose(a, r, atol=1e-5)


# --- command line -------------------------------------------------------------------------------------------------
def test_cli_cache_train_eval_convert(tmp_path, capsys):
    from sparsen.cli import main
    from sparsen.cli_sae import ARCH_CHOICES
    from sparsen.sae import ARCHITECTURES

    assert set(ARCH_CHOICES) == set(ARCHITECTURES)
    c = str(tmp_path / "cache")
    assert main(["cache", "--model", "tiny-llama", "--hook", "blocks.1.hook_mlp_in", "--hook", "blocks.1.hook_mlp_out",
                 "--tokens", "1500", "--ctx", "128", "--shard-tokens", "500", "--out", c, "--quiet"]) == 0
    assert "cached 1,500 tokens" in capsys.readouterr().out
    assert main(["sae", "train", "--cache", c, "--hook-out", "blocks.1.hook_mlp_out", "--skip", "--width", "96", "--k",
                 "4", "--tokens", "3000", "--batch", "500", "--out", str(tmp_path / "tc"), "--quiet"]) == 0
    cfg = load_sae(tmp_path / "tc").cfg
    assert cfg.is_transcoder and cfg.skip and cfg.hook_name_out == "blocks.1.hook_mlp_out" and cfg.model == "tiny-llama"
    assert main(["sae", "eval", "--model", "tiny-llama", "--sae", str(tmp_path / "tc"), "--tokens", "500", "--ctx",
                 "128", "--ce-windows", "1", "--out", str(tmp_path / "ev.json"), "--quiet"]) == 0
    import json

    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["reconstruction"]["tokens"] == 4 * 127 and "ce_loss_score_zero" in ev["spliced"]
    assert main(["sae", "eval", "--model", "tiny-qwen2", "--sae", str(tmp_path / "tc"), "--quiet"]) == 2
    assert "trained on model 'tiny-llama'" in capsys.readouterr().err
    assert main(["sae", "train", "--cache", c, "--width", "96", "--arch", "topk", "--set", "k=200",
                 "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "k must be in 1..d_sae (96)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["sae", "train", "--cache", str(tmp_path), "--width", "8", "--out", str(tmp_path / "x")]) == 2
    assert "not an activation cache" in capsys.readouterr().err
    assert main(["sae", "convert", "--sae", str(tmp_path / "tc"), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 0
    assert (tmp_path / "sl" / "sae_weights.safetensors").exists()


def test_a_transcoders_start_spreads_the_first_batch_over_its_latents():
    """An input with a large mean (an MLP input's) must not hand every token the same top-k latents at the start."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 32, generator=g) + 20 * torch.randn(32, generator=g)
    tc = build_sae(sae_config("topk", d_in=32, d_sae=96, k=3, d_out=16))
    tc.initialize(x, torch.randn(512, 16, generator=g), torch.Generator().manual_seed(0))
    fired = (tc.encode(x) != 0).any(0).float().mean()
    assert fired > 0.8, float(fired)


def test_a_transcoder_starts_on_sampled_tokens():
    """Latent i's encoder column is a distinct sampled token's centred input and its decoder row that token's
    centred output; the token's own pre-activation is its input's distance from the mean."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 8, generator=g) + 3.0
    y = x[:, :4] * 2 - 1
    tc = build_sae(sae_config("topk", d_in=8, d_sae=50, k=2, d_out=4))
    tc.initialize(x, y, torch.Generator().manual_seed(0))
    xc, yc = x - x.mean(0), y - y.mean(0)
    enc = tc.W_enc.T  # [d_sae, d_in]
    match = (enc @ (xc / xc.norm(dim=1, keepdim=True)).T).argmax(1)  # the sample each latent starts on
    assert len(set(match.tolist())) == 50
    torch.testing.assert_close(enc, xc[match] / xc[match].norm(dim=1, keepdim=True))
    torch.testing.assert_close(tc.W_dec, yc[match] / yc[match].norm(dim=1, keepdim=True))
    torch.testing.assert_close(tc.pre_acts(x[match]).diagonal(), xc[match].norm(dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tc.b_dec, y.mean(0))
    few = build_sae(sae_config("topk", d_in=8, d_sae=50, k=2, d_out=4))  # fewer tokens than latents: jittered
    few.initialize(x[:20], y[:20], torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(few.W_enc.T) == 8 and len(torch.unique(few.W_enc.T, dim=0)) == 50
