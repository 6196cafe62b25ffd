"""Cross-domain evaluation: the bundled held-out corpora, several corpora per eval and frontier, and the rule that no
calibration reads an evaluation corpus."""

import json

import pytest

import sparsen
from sparsen import SparsenError
from sparsen.cli import main
from sparsen.data import CALIB_CORPUS, EVAL_ONLY, eval_corpora, read_corpus
from sparsen.evaluation.frontier import run_frontier

HELD_OUT = [c for c in EVAL_ONLY if c != "wikitext2-test"]


def test_the_held_out_corpora_are_bundled_and_share_no_text_with_the_calibration_corpus():
    calib = read_corpus(CALIB_CORPUS)
    calib_lines = {ln.strip() for ln in calib.splitlines() if len(ln.strip()) > 50}
    kinds = {}
    for name in HELD_OUT:
        text = read_corpus(name)
        assert len(text) > 150_000, name  # room for 32+ windows of 1024 SmolLM2 tokens
        long_lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 50]
        assert long_lines and not calib_lines & set(long_lines), name
        kinds[name] = (text.count("def ") + text.count("return ")) / len(text)
    assert kinds["python-code"] > 20 * kinds["licences"]  # the code corpus is code, the legal text is not
    assert eval_corpora(["domains", "wikitext2-test"]) == list(EVAL_ONLY)


@pytest.mark.parametrize("corpus", ["domains", *EVAL_ONLY])
def test_no_calibration_reads_an_evaluation_corpus(corpus, tmp_path):
    with pytest.raises(SparsenError, match="is an evaluation corpus"):
        sparsen.TealConfig(sparsity=0.5, corpus=corpus)
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-llama", "--method", "teal", "--sparsity", "0.5", "--text", corpus,
                 "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_eval_on_several_corpora_reports_each_and_the_miss_of_the_target(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-llama", "--method", "teal", "--sparsity", "0.5", "--tokens", "2048",
                 "--ctx", "256", "--out", str(plan), "--quiet"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny-llama", "--plan", str(plan), "--text", "wikitext2-test", "--text", "licences",
                 "--windows", "2", "--ctx", "128", "--protocol", "decode", "--out", str(out), "--quiet"]) == 0
    rec = json.loads(out.read_text())
    assert rec["corpora"] == ["wikitext2-test", "licences"] and rec["target_sparsity"] == 0.5
    table = capsys.readouterr().out
    lm = sparsen.load_model("tiny-llama")
    sparsen.sparsify_(lm, sparsen.Plan.load(plan))
    for corpus in rec["corpora"]:
        alone = sparsen.evaluate(lm, protocol="decode", windows=2, ctx=128, corpus=corpus, progress=False)
        got = rec["results"][corpus]
        assert got["ppl"] == pytest.approx(alone.ppl, rel=1e-6) and got["kl"] == pytest.approx(alone.kl, rel=1e-6)
        miss = got["sparsity"]["overall"] - 0.5
        assert any(ln.startswith(corpus) and ln.split()[-1] == f"{miss:+.3f}" for ln in table.splitlines())
    bad = tmp_path / "bad.json"
    assert main(["eval", "--model", "tiny-llama", "--text", "licences", "--text", "/no/such.txt", "--out", str(bad),
                 "--quiet"]) == 2  # a missing second corpus fails before the first is evaluated
    assert not bad.exists()


def test_a_frontier_over_several_corpora_equals_one_frontier_per_corpus():
    lm = sparsen.load_model("tiny-llama")
    kw = dict(methods=["teal", "wina"], sparsities=[0.4, 0.5], protocols=("decode",), windows=2, ctx=128,
              calib={"tokens": 2048, "ctx": 256}, progress=False)
    multi = run_frontier(lm, corpus=["wikitext2-test", "python-code"], **kw)
    assert multi["corpora"] == ["wikitext2-test", "python-code"]
    for corpus in multi["corpora"]:
        alone = run_frontier(lm, corpus=corpus, **kw)
        rows = multi["by_corpus"][corpus]["rows"]
        assert [r["name"] for r in rows] == [r["name"] for r in alone["rows"]]
        for a, b in zip(rows, alone["rows"]):
            assert a["decode"]["ppl"] == pytest.approx(b["decode"]["ppl"], rel=1e-6)
            assert a["decode"]["achieved"] == pytest.approx(b["decode"]["achieved"], abs=1e-9)
    wiki, code = (multi["by_corpus"][c]["rows"][0]["decode"]["ppl"] for c in multi["corpora"])
    assert wiki != code


def test_a_frontier_method_can_set_config_fields(tmp_path):
    from sparsen.evaluation.frontier import parse_method

    assert parse_method("rotate-wina:global:2+basis=pca+rotate_values=false") == (
        "rotate-wina", "global", 2, {"basis": "pca", "rotate_values": False})
    with pytest.raises(SparsenError, match="has no field 'foo'"):
        parse_method("teal+foo=1")
    with pytest.raises(SparsenError, match="NAME:ALLOCATION:SEGMENTS"):
        parse_method("teal+allocation=greedy")
    lm = sparsen.load_model("tiny-llama")
    fr = run_frontier(lm, ["wina+greedy_step=0.1"], sparsities=[0.5], protocols=("decode",), windows=1, ctx=128,
                      calib={"tokens": 1024, "ctx": 256}, progress=False)
    assert [r["method"] for r in fr["rows"]] == ["wina+greedy_step=0.1"] and "decode" in fr["rows"][0]
