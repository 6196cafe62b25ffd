"""sparsen.train: the small transformer, the trainer (seeded, resumable to the same bits, refusing bad input) and the
experiments' measures."""

import json

import pytest
import torch

from sparsen.errors import SparsenError
from sparsen.nn import BlockFFN, PredictorFFN, TopKMLP
from sparsen.train import ByteVocab, LMConfig, LMTask, TinyLM, TokenData, TrainConfig, build_model, load_trained, train
from sparsen.train.experiments import ece, lm_quality
from sparsen.train.trainer import activation_stats

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 40) * 3
TINY = dict(d_model=16, n_layers=2, n_heads=2, ctx=16, d_ff=32)


def _data(ctx=16):
    return TokenData(ByteVocab().encode(TEXT), ctx)


def _tcfg(**kw):
    return TrainConfig(**{"steps": 6, "batch": 4, "warmup": 2, "evals": 3, "eval_windows": 4, "checkpoint_every": 2,
                          "threads": 1, **kw})


def test_any_module_sits_in_any_block():
    m = TinyLM(LMConfig(**TINY, mlp="topk", k=4, sparse_layers=(1,), attention="topk", attn_k=4))
    assert type(m.blocks[0].mlp).__name__ == "DenseMLP" and isinstance(m.blocks[1].mlp, TopKMLP)
    assert m.blocks[0].attn.cfg.pattern == "dense" and m.blocks[1].attn.cfg.pattern == "topk"
    for kind, cls in (("predictor", PredictorFFN), ("blockffn", BlockFFN)):
        m = TinyLM(LMConfig(**TINY, mlp=kind, k=8, r=4, experts=4))
        assert all(isinstance(b.mlp, cls) for b in m.blocks)
        assert m(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 256)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_the_language_model_is_causal_and_the_classifier_sees_every_position(pool):
    torch.manual_seed(0)
    lm = TinyLM(LMConfig(**TINY))
    x = torch.randint(256, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 256
    assert torch.equal(lm(x)[0, :10], lm(y)[0, :10])
    clf = TinyLM(LMConfig(**TINY, classes=3, pool=pool))
    emb = clf.embed(x).detach().requires_grad_(True)
    h = torch.cat([clf.cls, emb], 1) if pool == "cls" else emb
    for b in clf.blocks:
        h = b(h)
    clf.classifier(clf.norm(h)[:, 0]).sum().backward()  # position 0's output depends on the last position's input
    assert emb.grad[0, -1].abs().sum() > 0
    assert clf(x).shape == (1, 3)
    if pool == "cls":  # the readout is the prepended token's output
        with torch.no_grad():
            assert torch.allclose(clf(x), clf.classifier(clf.norm(h)[:, 0]), atol=1e-6)


def test_relu_mlps_start_near_half_nonzero():
    model = build_model(LMConfig(), seed=0)
    stats = activation_stats(model, torch.randint(256, (8, 128), generator=torch.Generator().manual_seed(0)))
    assert all(0.45 < v < 0.55 for v in stats["nnz"])


def test_resume_gives_bit_identical_weights_to_an_uninterrupted_run(tmp_path):
    cfg, tcfg = LMConfig(**TINY), _tcfg()
    full = train(build_model(cfg, 0), LMTask(_data()), tcfg, tmp_path / "a", progress=False)
    part = train(build_model(cfg, 0), LMTask(_data()), tcfg, tmp_path / "b", progress=False, stop_at=3)
    assert part["stopped"] and not (tmp_path / "b" / "model.safetensors").exists()
    resumed = train(build_model(cfg, 0), LMTask(_data()), tcfg, tmp_path / "b", resume=True, progress=False)
    a, b = load_trained(tmp_path / "a"), load_trained(tmp_path / "b")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert [h["heldout_loss"] for h in full["history"]] == [h["heldout_loss"] for h in resumed["history"]]
    assert full["history"][0]["step"] == 0 and full["history"][-1]["step"] == 6
    again = train(build_model(cfg, 0), LMTask(_data()), tcfg, tmp_path / "c", progress=False)
    drop = lambda h: {k: v for k, v in h.items() if k != "seconds"}
    assert drop(again["final"]) == drop(full["final"])  # seeded
    other = train(build_model(cfg, 1), LMTask(_data()), _tcfg(seed=1), None, progress=False)
    assert other["final"]["heldout_loss"] != full["final"]["heldout_loss"]


def test_resuming_a_checkpoint_of_another_config_is_refused(tmp_path):
    train(build_model(LMConfig(**TINY), 0), LMTask(_data()), _tcfg(), tmp_path, progress=False, stop_at=2)
    with pytest.raises(SparsenError, match=r"another config \(model.d_ff is 32 there, 64 here\)"):
        train(build_model(LMConfig(**{**TINY, "d_ff": 64}), 0), LMTask(_data()), _tcfg(), tmp_path, resume=True,
              progress=False)
    with pytest.raises(SparsenError, match="already holds a training run"):
        train(build_model(LMConfig(**TINY), 0), LMTask(_data()), _tcfg(), tmp_path, progress=False)


def test_a_corpus_too_short_for_the_steps_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(SparsenError, match=r"training windows of 17 tokens but 400 steps x batch 4 need 1600"):
        train(build_model(LMConfig(**TINY), 0), LMTask(_data()), _tcfg(steps=400), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(SparsenError, match="too short"):
        TokenData(ByteVocab().encode("tiny"), 16)


def test_label_noise_replaces_that_share_of_targets_reproducibly():
    task = LMTask(_data())
    clean = task.batch(0, _tcfg())[1]
    noisy = task.batch(0, _tcfg(label_noise=0.5))[1]
    assert 0.3 < float((noisy != clean).float().mean()) < 0.6
    assert torch.equal(noisy, task.batch(0, _tcfg(label_noise=0.5))[1])


def test_ece_and_corruption_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert ece(probs, torch.tensor([0, 1])) == pytest.approx(0.5 * 0.1 + 0.5 * 0.6)
    model = build_model(LMConfig(**TINY), 0)
    w = _data().heldout(4)
    q = lm_quality(model, w, corruptions=(0.0, 0.5))
    assert q["loss_corrupt_0.0"] == pytest.approx(q["loss"])
    assert 0 <= q["ece"] <= 1 and 0 <= q["accuracy"] <= 1


def test_cli_train_and_experiment(tmp_path, capsys):
    from sparsen.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--text", "wikitext2-valid", "--steps", "3", "--d-model", "16", "--layers", "1",
          "--heads", "2", "--ctx", "32", "--d-ff", "32", "--mlp", "stat-topk", "--k", "8", "--quiet"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    summary = json.loads((out / "train.json").read_text())
    assert summary["steps"] == 3 and summary["configs"]["model"]["mlp"] == "stat-topk"
    for argv, message in ((["train", "--out", str(tmp_path / "x"), "--mlp", "bogus"], "unknown --mlp 'bogus'"),
                          (["train", "--out", str(tmp_path / "x"), "--mlp", "topk", "--k", "9999"], "k must be"),
                          (["train", "--out", str(tmp_path / "x"), "--steps", "100000"], "training windows"),
                          (["experiment", "nope"], "unknown experiment 'nope'")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert main(["experiment", "emergence", "--out", str(tmp_path / "exp"), "--steps", "2", "--seeds", "1", "--quiet"]) == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / "exp" / f"emergence.{suffix}").stat().st_size > 0
    res = json.loads((tmp_path / "exp" / "emergence.json").read_text())
    assert len(res["runs"]) == 1 and len(res["init_nnz"]) == 4
    assert main(["experiment", "random", "--out", str(tmp_path / "exp"), "--steps", "2", "--quiet"]) == 0
    res = json.loads((tmp_path / "exp" / "random.json").read_text())
    for variant in ("text", "random-bytes"):  # the language model itself, a label per position
        run = res["variants"][variant]["runs"][0]
        assert len(res["variants"][variant]["runs"]) == 1 and len(run["final"]["nnz_heldout"]) == 4
        assert 0 <= run["train_accuracy"] <= 1 and run["history"][-1]["step"] == 2
    assert (tmp_path / "exp" / "random.png").stat().st_size > 0


@pytest.mark.slow
def test_the_bpe_vocabulary_is_smollm2s_and_trains(tmp_path):
    from sparsen.train import load_data

    data = load_data("wikitext2-valid", "bpe", 32)
    assert data.vocab_size == 49152 and data.train_ids.max() < 49152
    cfg = LMConfig(vocab=data.vocab_size, d_model=16, n_layers=1, n_heads=2, ctx=32, d_ff=32)
    s = train(build_model(cfg, 0), LMTask(data), _tcfg(steps=2), None, progress=False)
    assert s["final"]["heldout_loss"] < s["history"][0]["heldout_loss"] + 1
    with pytest.raises(SparsenError, match="vocab is 256 but the data's is 49152"):
        train(build_model(LMConfig(d_model=16, n_layers=1, n_heads=2, ctx=32, d_ff=32), 0), LMTask(data),
              _tcfg(steps=2), None, progress=False)


def test_the_clis_mlp_kinds_are_the_nn_layers():
    from sparsen.cli_train import MLP_KINDS
    from sparsen.nn import MLP_KINDS as NN_KINDS

    assert set(MLP_KINDS) == set(NN_KINDS)


def test_a_moe_language_model_trains_and_records_expert_loads(tmp_path):
    cfg = LMConfig(**{**TINY, "d_ff": 8}, mlp="moe", experts=4, k=2, activation="silu", moe_aux=0.01, moe_z=0.001,
                   capacity_factor=1.0)
    s = train(build_model(cfg, 0), LMTask(_data()), _tcfg(), None, progress=False)
    loads = s["final"]["experts_heldout"]
    assert len(loads) == 2 and all(abs(sum(x["load"]) - 1) < 1e-6 and 0 <= x["dropped"] < 1 for x in loads)
    with pytest.raises(SparsenError, match="k \\(experts per token\\) must be an integer in 1..4"):
        LMConfig(mlp="moe", experts=4, k=5)


def test_the_clis_experiments_are_the_runners():
    from sparsen.cli_train import EXPERIMENTS
    from sparsen.train.experiments import RUNNERS
    from sparsen.train.gating import RUNNERS as GATING
    from sparsen.train.routing import RUNNERS as ROUTING

    assert set(EXPERIMENTS) == set(RUNNERS) | set(ROUTING) | set(GATING)


def test_a_classifier_fits_a_handful_of_random_labels():
    from sparsen.train.trainer import ClassifyTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(256, (24, 16), generator=g), torch.randint(4, (24,), generator=g)
    task = ClassifyTask(x[:16], y[:16], x[16:], y[16:], "random bytes x random labels")
    r = train(build_model(LMConfig(**TINY, classes=4), 0), task, _tcfg(steps=150, batch=16, lr=1e-2, warmup=5, evals=3),
              None, progress=False)
    assert r["history"][0]["train_accuracy"] < 0.6 and r["final"]["train_accuracy"] == 1.0
    assert 0 <= r["final"]["heldout_accuracy"] <= 1


def test_a_language_model_fits_a_random_label_per_position():
    from sparsen.train.experiments import random_label_task
    from sparsen.train.trainer import ClassifyTask

    task = random_label_task(None, "random-bytes", 8, 16, 4, 0, "per position", per_token=True)
    assert task.y.shape == task.x.shape == (8, 16) and int(task.y.max()) < 4
    logits = torch.randn(2, 16, 256)
    assert ClassifyTask.loss(logits, task.y[:2]) == pytest.approx(float(LMTask.loss(logits, task.y[:2])))
    r = train(build_model(LMConfig(**TINY), 0), task, _tcfg(steps=150, batch=8, lr=1e-2, warmup=5, evals=3), None,
              progress=False)
    assert r["history"][0]["train_accuracy"] < 0.5 and r["final"]["train_accuracy"] > 0.9
    assert len(r["final"]["nnz_train"]) == TINY["n_layers"]


def test_distillation_arms_are_paired_and_the_kl_weight_ramps(tmp_path):
    from sparsen.train.experiments import _distill_run, kl_weight

    assert [kl_weight(s, 10, 2.0, 0.5) for s in (0, 1, 5, 9)] == [0.0, 0.4, 2.0, 2.0]
    assert kl_weight(0, 10, 2.0, 0.0) == 2.0
    data, tcfg = _data(), _tcfg(steps=5)
    student = LMConfig(**TINY, attention="topk", attn_k=4)
    teacher = LMConfig(**{**TINY, "d_model": 32, "d_ff": 64})
    # weight 0: the jointly trained student is the student trained alone (same init, batches and optimizer)
    joint = _distill_run(tmp_path, {"s": student}, teacher, data, tcfg, 0.0, 0.0, False, "w0")
    alone = build_model(student, tcfg.seed)
    train(alone, LMTask(data), tcfg, None, progress=False)
    assert joint["s"]["loss"] == pytest.approx(lm_quality(alone, data.heldout(128), corruptions=())["loss"], abs=1e-5)
    distilled = _distill_run(tmp_path, {"s": student}, teacher, data, tcfg, 1.0, 0.0, False, "w1")
    assert abs(distilled["s"]["loss"] - joint["s"]["loss"]) > 1e-4
    assert distilled["teacher"] == joint["teacher"]  # the teacher never sees the students
    assert _distill_run(tmp_path, {"s": student}, teacher, data, tcfg, 1.0, 0.0, False, "w1") == distilled  # cached
