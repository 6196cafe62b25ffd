"""sparsen attn-frontier: the grid, one calibration per method, the shared-prefix perplexity sweep equals a single
pass per plan, the record's tables and plots, bad grids refused before any model work."""

import math

import pytest

from sparsen.evaluation import evaluate
from sparsen.evaluation.attn_frontier import build_plans, format_markdown, grid_specs, perplexity
from sparsen.models.kv import cache_of, with_cache


def test_grid_specs_cross_methods_and_densities():
    assert grid_specs(["quest+dense_layers=2", "oracle-topp@p0.9"], [1 / 8, 0.3]) == [
        "quest@1/8+dense_layers=2", "quest@0.3+dense_layers=2", "oracle-topp@p0.9"]


def test_one_calibration_per_method_and_field_set(tiny_llama, monkeypatch):
    import dataclasses

    from sparsen.methods.attention import METHODS

    calls = []
    real = METHODS["double-sparsity"]

    def counting(lm, config, progress=True):
        calls.append(config.channels)
        return real.calibrate(lm, config, progress)

    monkeypatch.setitem(METHODS, "double-sparsity", dataclasses.replace(real, calibrate=counting))
    specs = grid_specs(["double-sparsity+calib_tokens=256+calib_ctx=128",
                        "double-sparsity+calib_tokens=256+calib_ctx=128+channels=4"], [1 / 4, 1 / 2])
    plans = build_plans(tiny_llama, specs, progress=False)
    assert len(plans) == 4 and calls == [8, 4]


@pytest.mark.parametrize("spec", ["quest@1/4", "h2o@1/4", "oracle-topk@1/8+dense_layers=1",
                                  "sketch@1/8+rank=8+calib_tokens=256+calib_ctx=128", "block-topk@1/4+block=16"])
def test_shared_prefix_sweep_equals_a_single_pass(tiny_llama, spec):
    lm = tiny_llama
    plans = build_plans(lm, [spec], progress=False)
    (label, plan), = plans.items()
    protocol = "full" if spec.startswith("block") else "decode"
    swept = perplexity(lm, plans, ctx=128, windows=2, progress=False)[protocol][label]
    single = evaluate(lm, ctx=128, n_windows=2, protocol=protocol, sparsifier=plan.build_sparsifier(lm), progress=False)
    assert swept["ppl"] == pytest.approx(single.ppl, rel=1e-4)
    assert swept["kl"] == pytest.approx(single.kl, rel=1e-3, abs=1e-6)
    att = single.sparsity["attention"]
    assert swept["density"] == pytest.approx(att["prefill_density" if protocol == "full" else "density"], rel=1e-6)
    assert swept["kl"] > 0 and 0 < swept["density"] < 1


def test_record_tables(tiny_llama, tmp_path):
    from sparsen.evaluation.attn_frontier import plot_attention_frontier, run_attention_frontier

    rec = run_attention_frontier(tiny_llama, ["sink-window", "quest", "block-topk+block=16"], [1 / 4, 1 / 2],
                                 lengths=[1024], samples=1, tasks=["passkey"], ppl_lengths=[128], ppl_windows=1,
                                 progress=False)
    md = format_markdown(rec)
    assert "| quest@1/4 |" in md and "| sink-window@1/2 |" in md and "windows of 128 (decode" in md
    assert "| block-topk@1/2+block=16 |" in md and "windows of 128 (full" in md
    assert "| 1024 | passkey | " in md and "| 1024 | mean | " in md  # the per-task table
    assert "Against dense on the same samples" in md and "| quest@1/4 | 1024 | +" in md  # the paired table
    ppl = rec["perplexity"]["128"]
    assert set(ppl) == {"decode", "full"} and "block-topk@1/4+block=16" in ppl["full"]
    assert all(not math.isnan(r["ppl"]) for by in ppl.values() for r in by.values())
    paths = plot_attention_frontier(rec, tmp_path)
    assert [p.name for p in paths] == ["attn_frontier_tasks.png", "attn_frontier_ppl.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize("argv, message", [
    (["--densities", "1/0"], "write fractions"),
    (["--densities", "2"], "outside (0, 1]"),
    (["--methods", "nope"], "unknown attention method"),
    (["--lengths", "100.5"], "whole numbers"),
    (["--methods", "quest,quest"], "twice"),
])
def test_bad_grids_are_one_line_errors_before_the_model_loads(tmp_path, capsys, argv, message):
    from sparsen.cli import main

    rc = main(["attn-frontier", "--model", "no-such-model", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "attn_frontier.json").exists()


def test_a_checkpoint_resumes_and_grows_a_run(tiny_llama, tmp_path):
    """Finished samples are kept (their texts are not recomputed), only missing configurations run, a torn last line
    is dropped, and another suite under the same ids is not mistaken for the checkpointed one."""
    import json

    from sparsen.evaluation.attention import run_tasks
    from sparsen.evaluation.tasks import generate_suite

    lm, ck = tiny_llama, tmp_path / "samples.jsonl"
    suite = generate_suite(lm.tokenizer, lengths=[1024], n=2, tasks=["passkey"])
    plans = build_plans(lm, ["sink-window@1/4", "quest@1/4"], progress=False)
    first = run_tasks(lm, suite, {"sink-window@1/4": plans["sink-window@1/4"]}, progress=False, checkpoint=ck)
    rows = [json.loads(x) for x in ck.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in suite] and list(rows[0]["results"]) == ["dense", "sink-window@1/4"]
    rows[0]["results"]["sink-window@1/4"]["text"] = "kept from the checkpoint"
    ck.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:40])  # the second row torn mid-write
    grown = run_tasks(lm, suite, plans, progress=False, checkpoint=ck)
    assert grown["samples"][0]["results"]["sink-window@1/4"]["text"] == "kept from the checkpoint"
    assert grown["samples"][1]["results"]["sink-window@1/4"] == first["samples"][1]["results"]["sink-window@1/4"]
    assert all(list(r["results"]) == ["dense", "sink-window@1/4", "quest@1/4"] for r in grown["samples"])
    other = generate_suite(lm.tokenizer, lengths=[1024], n=2, seed=5, tasks=["passkey"])  # same ids, other texts
    again = run_tasks(lm, other, {"sink-window@1/4": plans["sink-window@1/4"]}, progress=False, checkpoint=ck)
    assert again["samples"][0]["results"]["sink-window@1/4"]["text"] != "kept from the checkpoint"


def test_the_growing_cache_copy_equals_hf_dynamic_cache(tiny_llama):
    """The task suite's per-configuration cache (preallocated room, no concatenation per step) gives the logits of
    HF's own cache, also past the room it was given, and leaves the shared prompt cache untouched."""
    import copy

    import torch

    from sparsen.evaluation.attention import _growing_copy

    lm = tiny_llama
    ids = torch.randint(0, lm.adapter.vocab_size, (1, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        prompt = cache_of(lm.model(ids[:, :40], use_cache=True))
        before = [la.keys.clone() for la in prompt.layers]
        outs = []
        for cache in (copy.deepcopy(prompt), _growing_copy(prompt, 8)):  # 20 more positions than the room
            logits = [lm.model(ids[:, 40:45], **with_cache(lm.model, cache)).logits]
            logits += [lm.model(ids[:, t:t + 1], **with_cache(lm.model, cache)).logits for t in range(45, 60)]
            outs.append(torch.cat(logits, 1))
            assert cache.get_seq_length() == 60
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert all(torch.equal(la.keys, b) for la, b in zip(prompt.layers, before))
