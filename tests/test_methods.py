import json

import pytest
import torch

from sparsen import SparsenError, load_model
from sparsen.cli import main
from sparsen.core import GaussianTopKRule, Plan, Sparsifier
from sparsen.data import CALIB_CORPUS, corpus_windows
from sparsen.evaluation import evaluate
from sparsen.methods import calibrate as calibrate_config
from sparsen.methods import config_for, method_names
from sparsen.models.kv import cache_of, with_cache

CFG = {"tokens": 2048, "ctx": 256}


def calibrate(lm, method, sparsity, fields=CFG, progress=False):
    return calibrate_config(lm, config_for(method, sparsity=sparsity, **fields), progress=progress)


def applied(plan, lm, dense_prefix=0):
    """The plan's hooks on ``lm`` (not attached), after its weight transform, if any, was applied to ``lm``."""
    plan.transform_(lm)
    return plan.build_sparsifier(lm, dense_prefix=dense_prefix)


TARGET = {"cats": 0.4}  # CATS sparsifies only up and down: it cannot reach 0.5 model-wide
FIELDS = {"moefy": {"experts": 4}}  # tiny-llama's 160 MLP channels: 4 experts of 40


@pytest.fixture(scope="module")
def plans(tiny_llama):
    return {m: calibrate(tiny_llama, m, TARGET.get(m, 0.5), CFG | FIELDS.get(m, {}), progress=False)
            for m in method_names()}


@pytest.fixture
def fresh_lm():
    return load_model("tiny-llama")


@pytest.mark.parametrize("method", method_names())
def test_sparsity_zero_reproduces_dense_logits(method):
    lm = load_model("tiny-llama")  # a fresh model: a rotation plan transforms the model it is applied to
    plan = calibrate(lm, method, 0.0, CFG | FIELDS.get(method, {}))
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        dense = lm.model(x).logits
        sp = applied(plan, lm)
        with sp:
            sparse = lm.model(x).logits
    # the plan's hooks really ran on every site it covers, and skipped nothing there
    covered = [s for s, e in plan.sites.items() if e["rule"] != "dense"]
    assert covered and all(sp.entries[s] > 0 for s in covered)
    assert sp.achieved()["skipped"] == 0
    if plan.transform is None:
        assert torch.equal(dense, sparse)
    else:  # the folded rotation is the same function up to fp32 rounding of the rotated weights
        assert torch.allclose(dense, sparse, atol=1e-4, rtol=1e-4)
        assert not torch.equal(lm.adapter.blocks[0].linears["q"].weight, load_model("tiny-llama").adapter.blocks[0]
                               .linears["q"].weight)  # the weights really were rotated


# Measured here: teal, wina, chess land within 0.005 of 0.5 on the test text; rotate-wina 0.021 below it (its bases
# are fitted to the calibration text: the subject of the "sparsity that travels" issue), so its band is wider.
HELD_OUT_BAND = {"teal": 0.02, "wina": 0.02, "chess": 0.02, "rotate-wina": 0.04}


@pytest.mark.parametrize("method", sorted(HELD_OUT_BAND))
def test_achieved_sparsity_on_held_out_text_stays_near_target(plans, method):
    """Calibrated on WikiText-2 validation, measured on the decode halves of WikiText-2 *test* windows: a plan's
    target has to mean something on text it never saw (the band is wider than on the calibration text)."""
    from sparsen.data import EVAL_CORPUS

    lm = load_model("tiny-llama")
    plan = plans[method]
    sp = applied(plan, lm, dense_prefix=128)
    with sp, torch.no_grad():
        for w in corpus_windows(lm.tokenizer, EVAL_CORPUS, 256, 8):
            lm.model(w[None])
    assert abs(sp.achieved()["overall"] - plan.target_sparsity) < HELD_OUT_BAND[method]


# statistical top-k hits its target only on Gaussian inputs: tested on Gaussian rows below instead; moefy skips
# whole experts, so it lands on a multiple of 1 / E of the MLP (tests/test_moefy.py)
@pytest.mark.parametrize("method", [m for m in method_names() if m not in ("stat-topk", "moefy")])
def test_achieved_sparsity_on_calibration_data_is_near_target(fresh_lm, plans, method):
    plan = plans[method]
    wins = corpus_windows(fresh_lm.tokenizer, CALIB_CORPUS, 256, 8)
    sp = applied(plan, fresh_lm, dense_prefix=128)  # thresholds are set on the decode positions (second halves)
    with sp, torch.no_grad():
        for w in wins:
            fresh_lm.model(w[None])
    assert abs(sp.achieved()["overall"] - plan.target_sparsity) < 0.02
    assert abs(plan.calibrated_sparsity - plan.target_sparsity) < 0.02


def test_method_that_cannot_reach_the_target_says_so(tiny_llama):
    with pytest.raises(SparsenError, match="reaches at most 0.45 model-wide"):
        calibrate(tiny_llama, "cats", 0.5, CFG, progress=False)


def test_gaussian_topk_hits_target_on_gaussian_rows():
    x = torch.randn(200, 4096)
    for s in (0.3, 0.5, 0.7):
        assert ((GaussianTopKRule(s)(x) == 0).float().mean().item()) == pytest.approx(s, abs=0.01)


def hand_keep(entry, x, tensors):
    """The mask a plan entry means, computed by hand from its definition."""
    if entry["rule"] == "threshold":
        return x.abs() > entry["threshold"]
    if entry["rule"] == "channel_threshold":
        return x.abs() > tensors[entry["tensor"]]
    if entry["rule"] == "topk":
        k = round(entry["sparsity"] * x.shape[-1])
        return torch.ones_like(x, dtype=torch.bool).scatter(-1, x.abs().argsort(-1)[..., :k], False)
    assert entry["rule"] == "gaussian_topk"
    z = torch.special.ndtri(torch.tensor((1 + entry["sparsity"]) / 2, dtype=torch.float64)).item()
    return x.abs() > z * x.pow(2).mean(-1, keepdim=True).sqrt()


@pytest.mark.parametrize("method", method_names())
def test_masked_forward_equals_hand_computed_masked_linear(fresh_lm, plans, method):
    plan = plans[method]
    sp = applied(plan, fresh_lm)  # the plan's weight transform (if any) is applied before we read the weights
    block = fresh_lm.adapter.blocks[1]
    x = torch.randn(3, 5, block.linears["q"].in_features)
    checked = 0
    for name in ("q", "k", "o", "gate"):
        entry, lin = plan.sites[f"layers.1.{name}"], block.linears[name]
        if entry["rule"] == "dense":
            continue
        xi = torch.randn(3, 5, lin.in_features)
        keep = hand_keep(entry, xi, plan.tensors)
        expected = (xi * keep) @ lin.weight.T
        if "lowrank" in entry:  # R-Sparse: the dropped inputs through the low-rank factors
            A, B = plan.tensors[entry["lowrank"] + ".A"], plan.tensors[entry["lowrank"] + ".B"]
            expected = expected + ((xi * ~keep) @ A.T) @ B.T
        with sp:
            got = lin(xi)
        assert torch.allclose(got, expected, atol=1e-5), name
        checked += 1
    down = plan.sites["layers.1.down"]
    if down["rule"] == "gate_act":  # CATS / CHESS: the whole MLP, by hand
        W = {n: block.linears[n].weight for n in ("gate", "up", "down")}
        t = plan.tensors[down["tensor"]] if "tensor" in down else down["threshold"]
        a = torch.nn.functional.silu(x @ W["gate"].T)  # tiny-llama's MLP is SwiGLU
        keep = a.abs() > t
        assert 0.2 < 1 - keep.float().mean() < 0.98  # the mask really drops channels
        expected = ((a * keep) * (x @ W["up"].T)) @ W["down"].T
        sp.rules = {"layers.1.down": sp.rules["layers.1.down"]}  # isolate the MLP rule
        with sp:
            got = block.mlp(x)
        assert torch.allclose(got, expected, atol=1e-5)
        checked += 1
    if down["rule"] == "experts":  # MoEfication: the router's k best experts' channels, by hand
        W = {n: block.linears[n].weight for n in ("gate", "up", "down")}
        key = down["experts"]
        scores = x @ plan.tensors[key + ".router"].T + plan.tensors[key + ".bias"]
        chosen = scores.argsort(-1, descending=True)[..., : down["k"]]
        expert_of = plan.tensors[key + ".expert_of"].long()
        keep = (expert_of[None, None, :, None] == chosen[..., None, :]).any(-1)
        assert 0 < down["k"] < int(expert_of.max()) + 1 and keep.float().mean() == down["k"] / (int(expert_of.max()) + 1)
        expected = ((torch.nn.functional.silu(x @ W["gate"].T) * keep) * (x @ W["up"].T)) @ W["down"].T
        sp.rules = {"layers.1.down": sp.rules["layers.1.down"]}
        with sp:
            got = block.mlp(x)
        assert torch.allclose(got, expected, atol=1e-5)
        checked += 1
    assert checked


def test_plan_roundtrip_and_eval(tmp_path, tiny_llama, plans):
    path = plans["teal"].save(tmp_path / "plan.json")
    plan = Plan.load(path)
    assert plan.sites == plans["teal"].sites and plan.fingerprint == tiny_llama.fingerprint
    res = evaluate(tiny_llama, ctx=128, n_windows=2, protocol="decode", sparsifier=applied(plan, tiny_llama),
                   progress=False)
    assert res.kl > 0 and 0.4 < res.sparsity["overall"] < 0.6


def test_plan_for_another_model_is_refused(tiny_qwen2, plans):
    with pytest.raises(SparsenError, match="made for model 'tiny-llama'"):
        plans["teal"].build_sparsifier(tiny_qwen2)


def test_corrupt_plan_is_refused(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(SparsenError, match="corrupt"):
        Plan.load(bad)
    bad.write_text(json.dumps({"format": "sparsen-plan/1", "method": "teal"}))
    with pytest.raises(SparsenError, match="corrupt"):
        Plan.load(bad)
    with pytest.raises(SparsenError, match="not found"):
        Plan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(tiny_llama, s):
    with pytest.raises(SparsenError, match=r"outside \[0, 1\)"):
        calibrate(tiny_llama, "teal", s, CFG, progress=False)


def test_cli_calibrate_then_eval(tmp_path, capsys):
    plan, out = tmp_path / "plan.json", tmp_path / "e.json"
    assert main(["calibrate", "--model", "tiny-qwen2", "--method", "teal", "--sparsity", "0.4", "--tokens", "1024",
                 "--ctx", "256", "--out", str(plan), "--quiet"]) == 0
    assert main(["eval", "--model", "tiny-qwen2", "--plan", str(plan), "--ctx", "128", "--windows", "2",
                 "--protocol", "decode", "--out", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["plan"] == str(plan) and d["kl"] > 0 and abs(d["sparsity"]["overall"] - 0.4) < 0.1
    # bad inputs: one-line errors, nothing written
    assert main(["calibrate", "--model", "tiny-qwen2", "--method", "teal", "--sparsity", "1.2",
                 "--out", str(tmp_path / "p2.json")]) == 2
    assert main(["calibrate", "--model", "tiny-qwen2", "--method", "nope", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p2.json")]) == 2
    assert main(["eval", "--model", "tiny-llama", "--plan", str(plan), "--out", str(tmp_path / "e2.json")]) == 2
    err = capsys.readouterr().err
    assert "outside [0, 1)" in err and "unknown method 'nope'" in err and "made for model 'tiny-qwen2'" in err
    assert not (tmp_path / "p2.json").exists() and not (tmp_path / "e2.json").exists()


def test_rotation_plan_roundtrip_equals_in_memory_plan(tmp_path, plans):
    path = plans["rotate"].save(tmp_path / "rot.json")
    assert (tmp_path / "rot.safetensors").is_file()
    loaded = Plan.load(path)
    assert torch.equal(loaded.tensors["Q"], plans["rotate"].tensors["Q"])
    Q = loaded.tensors["Q"]
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[0]), atol=1e-5)  # orthogonal
    x = torch.randint(0, 256, (1, 30))
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    with torch.no_grad(), applied(plans["rotate"], a):
        la = a.model(x).logits
    with torch.no_grad(), applied(loaded, b):
        lb = b.model(x).logits
    assert torch.equal(la, lb)
    (tmp_path / "rot.safetensors").write_bytes(b"garbage")
    with pytest.raises(SparsenError, match="corrupt"):
        Plan.load(path)
    (tmp_path / "rot.safetensors").unlink()
    with pytest.raises(SparsenError, match="missing"):
        Plan.load(path)


def test_greedy_allocation_meets_budget_and_favours_cheap_groups():
    from sparsen.methods.allocation import LEVELS, greedy_levels

    cheap = [0.01 * s for s in LEVELS]
    costly = [1.0 * s for s in LEVELS]
    table = {"attn_in": costly, "o_in": cheap, "mlp_in": costly, "down_in": cheap}
    params = {"attn_in": 100, "o_in": 100, "mlp_in": 100, "down_in": 100}
    levels = greedy_levels(table, params, 0.5)
    assert sum(levels[g] * params[g] for g in params) / 400 == pytest.approx(0.5)
    assert levels["o_in"] == levels["down_in"] == pytest.approx(0.9)  # cheap groups go to the cap first
    assert levels["attn_in"] + levels["mlp_in"] == pytest.approx(0.2)


def test_a_layer_rerun_alone_is_repeatable_and_sees_a_k_or_v_mask():
    # TEAL's greedy re-runs one decoder layer on its captured inputs; a KV cache left in those inputs once
    # hid every k/v mask from it (k and v went to the maximum level in every block).
    from sparsen.core import ThresholdRule
    from sparsen.methods.allocation import layer_calls

    lm = load_model("tiny-llama")
    tokens = corpus_windows(lm.tokenizer, CALIB_CORPUS, 64, 1)[0]
    calls = layer_calls(lm, tokens)
    layer = lm.adapter.blocks[1].layer
    args, kwargs = calls[1]

    def run():
        out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        dense = run()
        assert torch.equal(dense, run())
        for name in ("k", "v"):
            with Sparsifier(lm.adapter, {f"layers.1.{name}": ThresholdRule(1e9)}):
                out = run()
            assert (out - dense).abs().max() > 1e-3, name


def achieved_on_calibration_windows(lm, plan) -> float:
    """Effective sparsity a plan achieves on the decode halves of the tiny model's 8 calibration windows."""
    wins = corpus_windows(lm.tokenizer, CALIB_CORPUS, 256, 8)
    sp = applied(plan, lm, dense_prefix=128)
    with sp, torch.no_grad():
        for w in wins:
            lm.model(w[None])
    return sp.achieved()["overall"]


def test_greedy_path_cut_at_a_target_is_the_greedy_run_to_that_target():
    # One greedy run per block serves every target up to its end (the global allocation relies on it).
    from sparsen.core import TopKRule
    from sparsen.methods.allocation import block_greedy_levels, block_greedy_paths, block_params, levels_on_path

    lm = load_model("tiny-llama")
    win = corpus_windows(lm.tokenizer, CALIB_CORPUS, 256, 1)[0]
    rule_for = lambda site, s: TopKRule(s)  # noqa: E731
    config = config_for("teal", sparsity=0.4, allocation="greedy")
    paths = block_greedy_paths(lm, win, 0.6, rule_for, config, progress=False)
    direct = block_greedy_levels(lm, win, 0.4, rule_for, config, progress=False)
    params = block_params(lm)
    for i, path in paths.items():
        assert path[-1][0] >= 0.6 - 1e-9
        cut = levels_on_path(path, 0.4, params[i])
        assert cut == pytest.approx({n: direct[f"layers.{i}.{n}"] for n in cut})
        assert sum(cut[n] * params[i][n] for n in cut) / sum(params[i].values()) == pytest.approx(0.4)


@pytest.mark.parametrize("method", ["teal", "rotate-wina"])
def test_global_allocation_sets_blocks_apart_and_hits_the_model_wide_target(method):
    from sparsen.methods.rotation import charged_share

    lm = load_model("tiny-llama")
    plan = calibrate(lm, method, 0.5, {**CFG, "allocation": "global"}, progress=False)
    levels = plan.params["block_levels"]
    assert len(levels) == lm.adapter.n_layers and max(levels) - min(levels) > 0.02  # blocks set apart
    charge = charged_share(lm, plan.tensors) if plan.transform else 0.0  # changes of basis are paid in extra skipping
    assert sum(levels) / len(levels) == pytest.approx(0.5 + charge)
    assert all(k > 0 for k in plan.params["block_kl_at_target"])
    assert abs(achieved_on_calibration_windows(lm, plan) - 0.5) < 0.02


def test_search_allocation_starts_from_global_and_only_keeps_moves_that_lower_the_kl():
    lm = load_model("tiny-llama")
    base = calibrate(lm, "teal", 0.5, {**CFG, "allocation": "global"}, progress=False)
    still = calibrate(lm, "teal", 0.5, {**CFG, "allocation": "search", "search_steps": 0}, progress=False)
    assert still.params["block_levels"] == pytest.approx(base.params["block_levels"])  # no moves: global's levels
    assert still.params["search"]["kl"] == still.params["search"]["kl_start"]
    plan = calibrate(lm, "teal", 0.5, {**CFG, "allocation": "search", "search_steps": 12}, progress=False)
    rec, levels = plan.params["search"], plan.params["block_levels"]
    assert rec["kl"] <= rec["kl_start"] and (rec["accepted"] > 0) == (rec["kl"] < rec["kl_start"])
    assert rec["kl_start"] == pytest.approx(still.params["search"]["kl_start"])
    assert sum(levels) / len(levels) == pytest.approx(0.5)  # moves keep the budget
    assert abs(achieved_on_calibration_windows(lm, plan) - 0.5) < 0.02


@pytest.mark.parametrize("method", ["teal", "rotate"])
def test_sensitivity_allocation_hits_the_model_wide_target(method):
    lm = load_model("tiny-llama")
    plan = calibrate(lm, method, 0.5, {**CFG, "allocation": "sensitivity"}, progress=False)
    levels = plan.params["group_levels"]
    assert len(set(round(v, 3) for v in levels.values())) > 1  # not uniform
    assert abs(achieved_on_calibration_windows(lm, plan) - 0.5) < 0.02


def test_segmented_rotation_is_the_same_function_and_its_basis_changes_are_charged():
    """Several residual bases (one per run of layers) with a change of basis between runs: the transformed model
    computes the same logits, and the changes of basis are charged against the achieved sparsity."""
    lm = load_model("tiny-llama")
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        dense = lm.model(x).logits
    plan = calibrate(lm, "rotate", 0.4, {**CFG, "segments": 3}, progress=False)
    assert plan.tensors["Q"].shape == (3, 64, 64) and plan.tensors["starts"].tolist() == [0, 1, 2]
    sp = applied(plan, lm)  # folds and rotates lm; the hooks are not attached yet
    with torch.no_grad():
        assert torch.allclose(dense, lm.model(x).logits, atol=1e-4, rtol=1e-4)
    charge = 2 * 64 * 64 / sum(sp.params.values())
    assert charge > 0.05
    sp.dense_prefix = 128  # thresholds are set on the decode positions (second halves) of the calibration windows
    wins = corpus_windows(lm.tokenizer, CALIB_CORPUS, 256, 8)
    with sp, torch.no_grad():
        for w in wins:
            lm.model(w[None])
    a = sp.achieved()
    assert a["skipped"] - a["overall"] == pytest.approx(charge)  # the skipped share pays for the changes of basis
    assert abs(a["overall"] - 0.4) < 0.02 and abs(plan.calibrated_sparsity - 0.4) < 0.02


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_value_head_rotation_is_the_same_function(spec):
    # o's input turned per value head (v rows by R^T, o's columns of every query head reading it by R): exact
    from sparsen.methods.rotation import head_groups, rotate_head_values

    lm = load_model(spec)
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        dense = lm.model(x).logits
        _, n_kv, hd = head_groups(lm)
        Qo = torch.linalg.qr(torch.randn(lm.adapter.n_layers, n_kv, hd, hd, generator=torch.Generator().manual_seed(0)))[0]
        rotate_head_values(lm, Qo)
        assert torch.allclose(dense, lm.model(x).logits, atol=1e-4, rtol=1e-4)


def test_rotate_wina_plan_carries_value_bases_and_refuses_misfit_ones(tmp_path):
    lm = load_model("tiny-llama")
    plan = calibrate(lm, "rotate-wina", 0.5, CFG, progress=False)
    assert plan.tensors["Qo"].shape[0] == lm.adapter.n_layers
    plan.tensors["Qo"] = plan.tensors["Qo"][:, :, :-1, :-1]
    with pytest.raises(SparsenError, match="does not fit"):
        applied(plan, load_model("tiny-llama"))


def rotated_in_segments(lm):
    """``lm`` folded and turned into three random residual bases (a change of basis before layers 1 and 2)."""
    from sparsen.methods.rotation import fold_norm_gains, rotate_residual

    g = torch.Generator().manual_seed(0)
    fold_norm_gains(lm)
    d = lm.adapter.hidden_size
    rotate_residual(lm, torch.linalg.qr(torch.randn(3, d, d, generator=g))[0], [0, 1, 2])
    return lm


def test_a_layer_rerun_alone_gives_its_output_in_the_pass_under_a_segmented_rotation():
    # The change of basis is a layer pre-hook; a capture behind it had the re-run turn the stream twice.
    from sparsen.methods.allocation import layer_calls

    lm = rotated_in_segments(load_model("tiny-llama"))
    tokens = torch.randint(0, 256, (48,))
    outs, layers = {}, [b.layer for b in lm.adapter.blocks]
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
               for i, layer in enumerate(layers)]
    calls = layer_calls(lm, tokens)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            out = layer(*calls[i][0], **calls[i][1])
            assert torch.allclose(out[0] if isinstance(out, tuple) else out, outs[i], atol=1e-5), i


def test_block_kl_from_recorded_layer_inputs_equals_a_whole_model_run():
    import copy

    import torch.nn.functional as F

    from sparsen.core import TopKRule
    from sparsen.methods.allocation import block_kls

    lm = rotated_in_segments(load_model("tiny-llama"))
    tokens = torch.randint(0, 256, (2, 64))
    levels = {i: {"q": 0.5, "gate": 0.3, "down": 0.6} for i in range(lm.adapter.n_layers)}
    rule_for = lambda site, s: TopKRule(s)  # noqa: E731
    fast = block_kls(lm, tokens, levels, rule_for, progress=False)

    def logprobs(w, prompt):  # the scored half, after a dense prompt
        return F.log_softmax(lm.model(w[None, 32:], **with_cache(lm.model, copy.deepcopy(prompt))).logits[0], -1)

    with torch.no_grad():
        prompts = [cache_of(lm.model(w[None, :32], use_cache=True)) for w in tokens]
        dense = [logprobs(w, p) for w, p in zip(tokens, prompts)]
        for i, kl in fast.items():
            with Sparsifier(lm.adapter, {f"layers.{i}.{n}": rule_for(None, s) for n, s in levels[i].items()}):
                slow = sum(float((d.exp() * (d - logprobs(w, p))).sum()) for d, w, p in zip(dense, tokens, prompts)) / 64
            assert kl > 1e-6 and kl == pytest.approx(slow, rel=1e-4, abs=1e-7), i


def test_rsparse_low_rank_term_at_full_rank_restores_the_dense_output_and_is_charged(tmp_path):
    """y = W (x*m) + B A (x*(1-m)): at full rank B A = W, so the sparse linear gives the dense output; at the
    default rank its bytes are charged against the achieved sparsity."""
    from sparsen.core import LowRankCompensated, ThresholdRule
    from sparsen.methods import rsparse

    lm = load_model("tiny-llama")
    lin = lm.adapter.blocks[0].linears["gate"]
    A, B = rsparse.low_rank_terms(lm, share=10.0)["layers.0.gate"]  # rank capped at min(in, out)
    assert A.shape[0] == min(lin.in_features, lin.out_features)
    x = torch.randn(4, lin.in_features)
    with torch.no_grad():
        dense = lin(x)
        with Sparsifier(lm.adapter, {"layers.0.gate": LowRankCompensated(ThresholdRule(0.8), A, B)}) as sp:
            full_rank = lin(x)
        with Sparsifier(lm.adapter, {"layers.0.gate": ThresholdRule(0.8)}):
            masked = lin(x)
    assert (masked - dense).abs().max() > 0.1 and torch.allclose(full_rank, dense, atol=1e-4)
    assert sp.added_params == A.numel() + B.numel()
    plan = calibrate(lm, "rsparse", 0.5, CFG, progress=False)
    charge = plan.params["charged_share"]
    factors = sum(t.numel() for k, t in plan.tensors.items() if k.startswith("lr."))
    assert charge > 0.01 and charge == pytest.approx(factors / sum(lm.adapter.linear_params().values()))
    assert sum("lowrank" in e for e in plan.sites.values()) == len(plan.sites)
    sp = applied(plan, lm, dense_prefix=128)
    with sp, torch.no_grad():
        for w in corpus_windows(lm.tokenizer, CALIB_CORPUS, 256, 8):
            lm.model(w[None])
    a = sp.achieved()
    assert a["skipped"] - a["overall"] == pytest.approx(charge) and abs(a["overall"] - 0.5) < 0.02
    # the factors travel in the plan's safetensors; a plan naming factors it does not carry is refused
    loaded = Plan.load(plan.save(tmp_path / "rs.json"))
    assert torch.equal(loaded.tensors["lr.layers.1.q.A"], plan.tensors["lr.layers.1.q.A"])
    d = json.loads((tmp_path / "rs.json").read_text())
    d["sites"]["layers.1.q"]["lowrank"] = "lr.nope"
    (tmp_path / "rs.json").write_text(json.dumps(d))
    with pytest.raises(SparsenError, match="corrupt"):
        Plan.load(tmp_path / "rs.json")
    loaded.tensors["lr.layers.1.q.A"] = loaded.tensors["lr.layers.1.q.A"][:, :-1]  # factors for another shape
    with pytest.raises(SparsenError, match="does not fit"):
        loaded.build_sparsifier(lm)
