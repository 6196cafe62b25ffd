"""Weights tuned to a sparse plan (``tune_steps``): the 'tuned_weights' transform."""

import pytest
import torch

from sparsen import SparsenError, load_model
from sparsen.core import Plan
from sparsen.evaluation import evaluate
from sparsen.methods import calibrate, config_for
from sparsen.methods.tuning import GAINS, LINEARS, norm_gains

CFG = {"tokens": 2048, "ctx": 256}
TUNE = {"tune_steps": 12, "tune_lr": 1e-2, "tune_rank": 4, "tune_rank_lr": 1e-3}


def plan_for(method, **fields):
    return calibrate(load_model("tiny-llama"), config_for(method, sparsity=0.5, **CFG, **fields), progress=False)


def logits_under(plan, x):
    lm = load_model("tiny-llama")
    plan.transform_(lm)
    with torch.no_grad(), plan.build_sparsifier(lm):
        return lm.model(x).logits


@pytest.mark.parametrize("method", ["teal", "rotate-wina"])
def test_identity_tuning_reproduces_the_untuned_plan(method):
    plan = plan_for(method)
    lm = load_model("tiny-llama")
    plan.transform_(lm)  # the gains the tuning starts from (a rotation folds them to 1)
    ident = Plan(**{**plan.__dict__, "sites": dict(plan.sites), "params": dict(plan.params),
                    "tensors": dict(plan.tensors)})
    tensors = {GAINS: torch.stack([p.detach().clone() for p in norm_gains(lm)])}
    for name in LINEARS:
        lin = lm.adapter.blocks[0].linears[name]
        tensors[f"tune.A.{name}"] = torch.randn(len(lm.adapter.blocks), 3, lin.in_features)
        tensors[f"tune.B.{name}"] = torch.zeros(len(lm.adapter.blocks), lin.out_features, 3)
    ident.add_transform("tuned_weights", tensors)
    assert ident.transforms == plan.transforms + ["tuned_weights"]
    x = torch.randint(0, 256, (1, 40))
    assert torch.allclose(logits_under(ident, x), logits_under(plan, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["teal", "rotate-wina"])
def test_tuning_lowers_the_kl_on_text_it_did_not_see(method, tmp_path):
    plan = plan_for(method)
    tuned = plan_for(method, **TUNE)
    assert tuned.transforms == plan.transforms + ["tuned_weights"]
    assert tuned.params["tuning"]["held_out_kl_after"] < tuned.params["tuning"]["held_out_kl_before"]
    # the thresholds are the untuned plan's; only the weights moved
    assert tuned.sites == plan.sites
    results = {}
    for name, p in (("plan", plan), ("tuned", tuned)):
        lm = load_model("tiny-llama")
        p.transform_(lm)
        with p.build_sparsifier(lm, dense_prefix=128) as sp:
            results[name] = evaluate(lm, corpus="wikitext2-test", ctx=256, n_windows=4, protocol="decode",
                                     sparsifier=sp, progress=False)
    assert results["tuned"].kl < 0.95 * results["plan"].kl
    # saved and loaded, the plan computes what it computed in memory
    tuned.save(tmp_path / "tuned.json")
    loaded = Plan.load(tmp_path / "tuned.json")
    assert loaded.transforms == tuned.transforms
    x = torch.randint(0, 256, (1, 40))
    assert torch.equal(logits_under(loaded, x), logits_under(tuned, x))


def test_tuned_weights_refuse_what_does_not_fit(tmp_path):
    tuned = plan_for("teal", **TUNE | {"tune_steps": 1})
    bad = dict(tuned.tensors)
    bad[GAINS] = bad[GAINS][:, :10]
    with pytest.raises(SparsenError, match="do not fit this model"):
        Plan(**{**tuned.__dict__, "tensors": bad}).transform_(load_model("tiny-llama"))
    lm = load_model("tiny-llama")
    before = lm.adapter.final_norm.weight.clone()
    bad = dict(tuned.tensors)
    bad["tune.A.down"] = bad["tune.A.down"][:, :, :7]
    with pytest.raises(SparsenError, match="'down' does not fit"):
        Plan(**{**tuned.__dict__, "tensors": bad}).transform_(lm)
    assert torch.equal(lm.adapter.final_norm.weight, before)  # nothing half-applied
    del bad["tune.B.down"]
    Plan(**{**tuned.__dict__, "tensors": bad}).save(tmp_path / "p.json")
    with pytest.raises(SparsenError, match="corrupt.*one factor of two"):
        Plan.load(tmp_path / "p.json")
    for field, value in (("tune_steps", -1), ("tune_rank", 0), ("tune_lr", 0), ("tune_schedule", "linear")):
        with pytest.raises(SparsenError, match=field):
            config_for("teal", sparsity=0.5, **{field: value})


def test_cli_calibrates_a_tuned_rotation_plan_that_eval_and_generate_run(tmp_path, capsys):
    from sparsen.cli import main

    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-llama", "--method", "rotate", "--sparsity", "0.5", "--tokens", "1024",
                 "--ctx", "256", "--tune-steps", "2", "--out", str(plan), "--quiet"]) == 0
    assert "weights tuned for 2 steps on 2 window(s): KL to dense on the next window" in capsys.readouterr().out
    assert Plan.load(plan).transforms == ["residual_rotation", "tuned_weights"]
    assert main(["eval", "--model", "tiny-llama", "--plan", str(plan), "--ctx", "256", "--windows", "1",
                 "--protocol", "decode", "--out", str(tmp_path / "e.json")]) == 0
    assert main(["generate", "--model", "tiny-llama", "--plan", str(plan), "--prompt", "Hello", "--max-new-tokens",
                 "4"]) == 0
    assert main(["calibrate", "--model", "tiny-llama", "--method", "teal", "--sparsity", "0.5", "--tune-steps", "-1",
                 "--out", str(tmp_path / "bad.json")]) == 2
    assert "tune_steps -1" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_a_frontier_runs_a_tuned_plan_beside_the_untuned_one_from_one_calibration(monkeypatch):
    import dataclasses

    from sparsen.evaluation.frontier import run_frontier
    from sparsen.methods import rotation

    calls, inner = [], rotation.METHOD.calibrate
    monkeypatch.setattr(rotation, "METHOD", dataclasses.replace(
        rotation.METHOD, calibrate=lambda *a, **k: calls.append(1) or inner(*a, **k)))
    fr = run_frontier(load_model("tiny-llama"), ["rotate", "rotate+tune_steps=3+tune_lr=0.01+tune_rank_lr=0.001"],
                      sparsities=[0.5], protocols=("decode",), windows=2, ctx=128, calib={"tokens": 1024, "ctx": 256},
                      progress=False, model_loader=lambda: load_model("tiny-llama"))
    plain, tuned = fr["rows"]
    assert len(calls) == 1  # the tuned spec tuned a copy of the untuned plan
    assert "tuning" not in plain["params"] and tuned["params"]["tuning"]["steps"] == 3
    # each plan ran on its own transformed copy: the rotation alone, the rotation and the tuned weights
    assert tuned["decode"]["kl"] != plain["decode"]["kl"]
    assert abs(tuned["decode"]["achieved"] - plain["decode"]["achieved"]) < 0.05


def test_cosine_schedule_starts_at_the_full_rate_and_still_tunes():
    one = {**TUNE, "tune_steps": 1}
    constant, cosine = plan_for("teal", **one), plan_for("teal", **one, tune_schedule="cosine")
    for key, t in constant.tensors.items():  # the first step is taken at the full rate either way
        assert torch.equal(cosine.tensors[key], t), key
    tuned = plan_for("teal", **TUNE, tune_schedule="cosine")
    assert tuned.params["tuning"]["held_out_kl_after"] < tuned.params["tuning"]["held_out_kl_before"]
    assert not torch.equal(tuned.tensors[GAINS], plan_for("teal", **TUNE).tensors[GAINS])


def test_tuning_a_given_untuned_plan_equals_calibrating_with_the_tuning():
    from sparsen.methods.registry import calibrate as calibrate_from

    lm = load_model("tiny-llama")
    config = config_for("teal", sparsity=0.5, **CFG, **TUNE)
    base = calibrate(lm, config_for("teal", sparsity=0.5, **CFG), progress=False)
    tuned, whole = calibrate_from(lm, config, progress=False, untuned=base), calibrate(lm, config, progress=False)
    assert tuned.config == whole.config and tuned.sites == whole.sites and "tuning" not in base.params
    for key, t in whole.tensors.items():
        assert torch.equal(tuned.tensors[key], t), key
    with pytest.raises(SparsenError, match="not calibrated with this config"):
        calibrate_from(lm, config_for("teal", sparsity=0.4, **CFG, **TUNE), progress=False, untuned=base)
