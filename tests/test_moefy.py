"""MoEfication: experts split from a dense MLP, learned and oracle routers, exactness at k = E, bad input."""

import pytest
import torch

from sparsen import SparsenError, load_model
from sparsen.cli import main
from sparsen.core import Plan
from sparsen.methods import calibrate, config_for
from sparsen.methods.moefy import balanced_kmeans, expert_contributions, k_for, plan_at_k

FIELDS = {"tokens": 2048, "ctx": 256, "experts": 4}


@pytest.fixture(scope="module")
def plan(tiny_llama):
    return calibrate(tiny_llama, config_for("moefy", sparsity=0.3, **FIELDS), progress=False)


def logits(lm, plan, x, dense_prefix=0):
    sp = plan.build_sparsifier(lm, dense_prefix=dense_prefix) if plan is not None else None
    with torch.no_grad():
        if sp is None:
            return lm.model(x).logits, None
        with sp:
            return lm.model(x).logits, sp


def test_every_expert_read_is_the_dense_model(tiny_llama, plan):
    x = torch.randint(0, 256, (2, 48))
    dense, _ = logits(tiny_llama, None, x)
    full, sp = logits(tiny_llama, plan_at_k(plan, 4), x)
    assert torch.equal(dense, full)
    assert sp.achieved()["skipped"] == 0 and sp.achieved()["added_params"] == 0  # no router read at k = E
    sparse, sp = logits(tiny_llama, plan, x)
    assert not torch.allclose(dense, sparse)


def test_k_follows_the_target_and_accounting_is_exact(tiny_llama, plan):
    # 0.3 model-wide is 0.42 of the MLP (71% of tiny-llama's block weights): 2 of 4 experts skip 0.5 >= 0.42
    assert plan.params["k"] == k_for(tiny_llama, 0.3, 4) == 2
    x = torch.randint(0, 256, (3, 64))
    _, sp = logits(tiny_llama, plan, x, dense_prefix=16)
    a = sp.achieved()
    for b in range(3):
        for n in ("gate", "up", "down"):
            assert a["per_site"][f"layers.{b}.{n}"] == pytest.approx(0.5)
        assert a["per_site"][f"layers.{b}.q"] == 0
    assert a["added_params"] == 3 * 4 * 64  # the routers, charged
    assert a["overall"] == pytest.approx(plan.calibrated_sparsity, abs=1e-9)
    with pytest.raises(SparsenError, match="reads at least one of 4 experts"):
        k_for(tiny_llama, 0.7, 4)


def test_oracle_router_keeps_the_experts_with_the_largest_outputs(tiny_llama):
    plan = calibrate(tiny_llama, config_for("moefy", sparsity=0.3, router="oracle", **FIELDS), progress=False)
    assert not any(k.endswith(".router") for k in plan.tensors)
    block = tiny_llama.adapter.blocks[2]
    W = {n: block.linears[n].weight for n in ("gate", "up", "down")}
    expert_of = plan.tensors["moe.layers.2.expert_of"].long()
    x = torch.randn(7, 64)
    mid = torch.nn.functional.silu(x @ W["gate"].T) * (x @ W["up"].T)
    norms = torch.stack([(mid * (expert_of == e)) @ W["down"].T for e in range(4)], 1).norm(dim=-1)  # [7, 4]
    keep = (expert_of[None, :, None] == norms.topk(2, -1).indices[:, None, :]).any(-1)  # [7, 160]
    expected = (mid * keep) @ W["down"].T
    assert torch.allclose(norms, expert_contributions(mid, W["down"], expert_of, 4), atol=1e-5)
    sp = plan.build_sparsifier(tiny_llama)
    sp.rules = {"layers.2.down": sp.rules["layers.2.down"]}
    with sp, torch.no_grad():
        got = block.mlp(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_learned_router_beats_chance_on_held_out_tokens(plan):
    for layer in plan.params["layers"]:
        assert layer["recall_k1"] > 0.5  # a random expert holds ~1/4 of the best one's output on average
        assert layer["recall_k2"] >= layer["recall_k1"] - 1e-6 or layer["recall_k2"] > 0.6


def test_balanced_kmeans_recovers_planted_groups_in_equal_sizes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g)
    truth = torch.arange(64) % 4
    rows = centres[truth] + 0.3 * torch.randn(64, 32, generator=g)
    got = balanced_kmeans(rows, 4, 20, seed=1)
    assert torch.bincount(got, minlength=4).tolist() == [16] * 4
    # the same partition up to the clusters' names
    pairs = {(int(a), int(b)) for a, b in zip(truth, got)}
    assert len(pairs) == 4


@pytest.mark.parametrize("clustering", ["coactivation", "gate", "contiguous"])
def test_every_clustering_gives_equal_experts(tiny_llama, clustering):
    plan = calibrate(tiny_llama, config_for("moefy", sparsity=0.3, clustering=clustering, router_steps=5, **FIELDS),
                     progress=False)
    for b in range(3):
        sizes = torch.bincount(plan.tensors[f"moe.layers.{b}.expert_of"].long(), minlength=4)
        assert sizes.tolist() == [40] * 4


def test_plan_round_trip_gives_the_same_logits(tmp_path, tiny_llama, plan):
    path = plan.save(tmp_path / "moe.json")
    again = Plan.load(path)
    x = torch.randint(0, 256, (1, 40))
    assert torch.equal(logits(tiny_llama, plan, x)[0], logits(tiny_llama, again, x)[0])


def test_bad_input_is_one_line(tmp_path, tiny_llama, plan):
    with pytest.raises(SparsenError, match="k 5: give a whole number of experts per token from 1 to 4"):
        config_for("moefy", sparsity=0.3, experts=4, k=5)
    with pytest.raises(SparsenError, match="7 experts do not divide the MLP's 160 channels"):
        calibrate(tiny_llama, config_for("moefy", sparsity=0.3, tokens=512, ctx=256, experts=7), progress=False)
    with pytest.raises(SparsenError, match="from 1 to 4"):
        plan_at_k(plan, 0)
    # a router checkpoint (the plan) of another model
    with pytest.raises(SparsenError, match="calibrate a plan for this model"):
        plan.build_sparsifier(load_model("tiny-qwen2"))
    # routers of the wrong width for their model
    bad = plan_at_k(plan, 2)
    bad.tensors = {**plan.tensors, "moe.layers.0.router": torch.zeros(4, 63)}
    with pytest.raises(SparsenError, match="do not fit its MLP"):
        bad.build_sparsifier(tiny_llama)
    # a corrupt file: k above the experts
    path = plan.save(tmp_path / "moe.json")
    text = path.read_text().replace('"k": 2', '"k": 9', 1)
    path.write_text(text)
    with pytest.raises(SparsenError, match="is corrupt"):
        Plan.load(path)


def test_cli_calibrates_a_moefy_plan(tmp_path, tiny_llama):
    out = tmp_path / "p.json"
    main(["calibrate", "--model", "tiny-llama", "--method", "moefy", "--sparsity", "0.3", "--tokens", "1024",
          "--ctx", "256", "--set", "experts=4", "--set", "k=3", "--out", str(out), "--quiet"])
    p = Plan.load(out)
    assert p.params["k"] == 3 and p.sites["layers.0.down"]["rule"] == "experts"


def test_engine_reads_only_the_routed_experts_and_refuses_the_oracle(tiny_llama):
    from sparsen.engine import Engine

    oracle = calibrate(tiny_llama, config_for("moefy", sparsity=0.3, router="oracle", **FIELDS), progress=False)
    with pytest.raises(SparsenError, match="cannot run the oracle router"):
        Engine(tiny_llama, oracle, max_seq=32)


def test_cli_moefy_writes_the_table_plot_and_json(tmp_path, capsys):
    import json

    out = tmp_path / "m"
    main(["moefy", "--model", "tiny-llama", "--experts", "4", "--ks", "2,4", "--contiguous-ks", "2", "--windows", "2",
          "--tokens", "1024", "--rounds", "1", "--new-tokens", "4", "--out", str(out), "--quiet"])
    res = json.loads((out / "moefy.json").read_text())
    names = [r["name"] for r in res["quality"]["rows"]]
    assert names == ["moefy k=2", "moefy-oracle k=2", "moefy k=4", "moefy-oracle k=4", "moefy-contiguous k=2",
                     "teal-mlp L=0.5", "cats L=0.5"]
    by = {r["name"]: r for r in res["quality"]["rows"]}
    assert by["moefy k=4"]["kl"] == 0 and by["moefy k=4"]["ppl"] == pytest.approx(res["quality"]["dense"]["ppl"])
    for name in ("moefy k=2", "teal-mlp L=0.5", "cats L=0.5"):  # equal MLP bytes skipped, as compared
        assert by[name]["mlp_skipped"] == pytest.approx(0.5, abs=0.03)
    assert set(res["bench"]["engines"]) == {"dense", *[n for n in names if "oracle" not in n]}
    assert (out / "moefy.png").stat().st_size > 10_000 and "| moefy k=2 | 2 |" in (out / "moefy.md").read_text()
    assert Plan.load(out / "plans" / "moefy_k2.json").params["k"] == 2  # the plans it evaluated, for eval / bench
    assert main(["moefy", "--model", "tiny-llama", "--experts", "4", "--ks", "5", "--contiguous-ks", "2", "--out",
                 str(tmp_path / "bad"), "--quiet"]) == 2
    assert "take experts per token from 1 to 4" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_moefy_is_small_by_default_and_full_on_request(monkeypatch):
    import sparsen.cli_moefy as cli_moefy

    seen = {}

    def record(lm, ks, experts, calib, contiguous_ks, progress):
        seen.update(ks=ks, contiguous_ks=contiguous_ks, tokens=calib["tokens"])
        raise SparsenError("stop here")

    monkeypatch.setattr("sparsen.evaluation.moefy.moefy_plans", record)
    assert main(["moefy", "--model", "tiny-llama", "--experts", "16", "--quiet"]) == 2
    assert seen == {"ks": cli_moefy.SMALL["ks"], "contiguous_ks": (8,), "tokens": 4096}
    assert main(["moefy", "--model", "tiny-llama", "--experts", "16", "--full", "--tokens", "2048", "--quiet"]) == 2
    assert seen == {"ks": (4, 6, 8, 10, 12, 14, 16), "contiguous_ks": (8, 12), "tokens": 2048}  # a flag still wins
