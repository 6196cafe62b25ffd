import json
import subprocess
import sys

import pytest

from sparsen.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "sparsen", *args], capture_output=True, text=True)


def assert_real_plot(path, min_width=400, min_height=300, panels_colours=3):
    """A PNG that shows something: big enough, mostly background but with lines in several colours."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    h, w = img.shape[:2]
    assert w >= min_width and h >= min_height, (w, h)
    ink = (img < 0.9).any(-1)
    assert 0.01 < ink.mean() < 0.6, ink.mean()  # drawn on, and not a solid block
    saturated = img[(img.max(-1) - img.min(-1)) > 0.3]  # coloured pixels: data lines, not black text or grey grid
    colours = {tuple(c) for c in (saturated * 4).round().astype(int)}
    assert len(colours) >= panels_colours, colours


@pytest.mark.parametrize("cmd", [[], ["profile"], ["eval"], ["calibrate"], ["frontier"], ["demo"], ["attn-eval"]])
def test_help_explains_flags(cmd):
    p = run(*cmd, "--help")
    assert p.returncode == 0
    for flag in {"profile": ["--model", "--tokens", "--out"], "eval": ["--ctx", "--windows", "--protocol", "--plan"],
                 "calibrate": ["--method", "--sparsity", "--allocation", "--out"],
                 "frontier": ["--methods", "--sparsities", "--protocols", "--windows", "--out"],
                 "demo": ["--out", "--sparsity"],
                 "attn-eval": ["--methods", "--tasks", "--lengths", "--samples"]}.get(
                     cmd[0] if cmd else "", ["profile", "eval", "calibrate", "frontier"]):
        assert flag in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "/no/such/model"], "not found"),
        (["eval", "--model", "tiny-llama", "--windows", "99999", "--ctx", "64"], "whole window"),
        (["profile", "--model", "tiny-llama", "--text", "/no/such.txt"], "not found"),
    ],
)
def test_bad_input_gives_one_line_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out.json" if args[0] == "eval" else tmp_path / "prof"
    p = run(*args, "--out", str(out), "--quiet")
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()


def test_wrong_file_type_and_empty_corpus(tmp_path, capsys):
    bad = tmp_path / "model.txt"
    bad.write_text("hi")
    assert main(["eval", "--model", str(bad), "--out", str(tmp_path / "e.json")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "--model", "tiny-llama", "--text", str(empty), "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert ".gguf file or a Hugging Face model directory" in err and "is empty" in err
    assert not (tmp_path / "e.json").exists()


def test_eval_writes_json_with_required_keys(tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", "tiny-llama", "--ctx", "64", "--windows", "3", "--protocol", "decode",
                 "--out", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    for key in ("model", "ctx", "windows", "protocol", "tokens_scored", "nll", "ppl"):
        assert key in d
    assert (d["ctx"], d["windows"], d["protocol"], d["tokens_scored"]) == (64, 3, "decode", 3 * 31)


def test_profile_writes_json_and_plots(tmp_path):
    out = tmp_path / "prof"
    assert main(["profile", "--model", "tiny-qwen2", "--tokens", "256", "--ctx", "128", "--out", str(out),
                 "--quiet"]) == 0
    d = json.loads((out / "profile.json").read_text())
    assert d["tokens"] == 256 and len(d["layers"]) == 3
    layer = d["layers"][0]
    assert set(layer["sites"]) == {"attn_in", "o_in", "mlp_in", "gate_act", "down_in"}
    assert len(layer["attention"]["cover90"]) == 4
    assert all(0 < v <= 1 for v in layer["attention"]["cover95"])
    assert_real_plot(out / "profile_layers.png")
    assert_real_plot(out / "profile_attention.png", min_width=300, min_height=200, panels_colours=2)
    sens = d["sensitivity"]["groups"]
    assert set(sens) == {"attn_in", "o_in", "mlp_in", "down_in"}
    for row in sens.values():  # more sparsity, more damage
        assert 0 < row["0.5"]["kl"] < row["0.7"]["kl"]


def test_frontier_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "fr"
    assert main(["frontier", "--model", "tiny-llama", "--methods", "teal,cats,rotate-wina", "--sparsities", "0.25,0.5",
                 "--windows", "2", "--ctx", "128", "--tokens", "1024", "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "frontier.json").read_text())
    assert set(d["dense"]) == {"full", "decode"}
    rows = {(r["method"], r["target"]): r for r in d["rows"]}
    assert "reaches at most" in rows[("cats", 0.5)]["skipped"]  # CATS covers only up/down
    for key in (("teal", 0.25), ("teal", 0.5), ("cats", 0.25), ("rotate-wina", 0.5)):
        for protocol in ("full", "decode"):
            r = rows[key][protocol]
            assert abs(r["achieved"] - key[1]) < 0.05 and r["kl"] > 0 and 0 < r["top1_agree"] < 1
    assert rows[("teal", 0.5)]["decode"]["kl"] > rows[("teal", 0.25)]["decode"]["kl"]  # more sparsity, more damage
    # the reference also runs one step beyond the grid, so a method landing below its lowest target still gets a ratio
    assert rows[("teal", 0.15)]["reference_range"] and rows[("teal", 0.6)]["reference_range"]
    assert "reference_range" not in rows[("teal", 0.5)] and ("cats", 0.15) not in rows
    table = [line.split(" | ") for line in (out / "frontier.md").read_text().splitlines()[2:]]
    assert [(r[0].strip("| "), r[1]) for r in table] == [("dense", "0"), ("teal", "0.25"), ("teal", "0.5"), ("cats", "0.25"),
                                                          ("cats", "0.5"), ("rotate-wina", "0.25"), ("rotate-wina", "0.5"),
                                                          ("teal", "0.15 (reference range)"), ("teal", "0.6 (reference range)")]
    assert table[4][2] == "unreachable"
    assert all(len(r) == len(table[0]) for r in table)  # 2 + 6 columns per protocol
    assert_real_plot(out / "frontier.png", min_width=800, min_height=600)


def test_frontier_bad_input(tmp_path, capsys):
    out = tmp_path / "fr"
    assert main(["frontier", "--model", "tiny-llama", "--methods", "teal,nope", "--out", str(out)]) == 2
    assert main(["frontier", "--model", "tiny-llama", "--sparsities", "0.5,1.5", "--out", str(out)]) == 2
    assert main(["frontier", "--model", "tiny-llama", "--methods", "cats:sensitivity", "--out", str(out)]) == 2
    assert main(["frontier", "--model", "tiny-llama", "--methods", "teal:uniform:3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "outside [0, 1)" in err and "supports allocation" in err
    assert "only for rotation methods" in err
    assert not out.exists()


def test_calibrate_takes_the_greedy_allocation(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "tiny-llama", "--method", "teal", "--allocation", "greedy", "--sparsity", "0.4",
                 "--tokens", "512", "--ctx", "256", "--out", str(out), "--quiet"]) == 0
    plan = json.loads(out.read_text())
    assert plan["params"]["allocation"] == "greedy" and "greedy_mean_level" in plan["params"]


def test_calibrate_offers_every_allocation():
    # The command line's list is written apart from the methods' (the CLI does not import torch): keep them equal.
    from sparsen.cli import build_parser
    from sparsen.methods import ALLOCATIONS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["calibrate"]
    assert tuple(next(a for a in sub._actions if a.dest == "allocation").choices) == ALLOCATIONS


def _task_file(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def test_attn_eval_runs_a_user_task_file(tmp_path):
    prompt = "Some text here.\n\nWhat is the colour?"
    tasks = _task_file(tmp_path / "t.jsonl", [
        {"id": "a", "task": "mine", "prompt": prompt, "answers": ["blue"], "metric": "exact", "max_new_tokens": 3,
         "query_start": prompt.index("What"), "extra": 1},
        {"id": "b", "task": "mine", "prompt": "x y z", "answers": ["q", "r"], "metric": "contains_all",
         "answer_prefix": "Answer:", "max_new_tokens": 2}])
    out = tmp_path / "ae"
    assert main(["attn-eval", "--model", "tiny-llama", "--tasks", str(tasks), "--methods", "quest@1/2,h2o@4t",
                 "--out", str(out), "--quiet"]) == 0
    d = json.loads((out / "attn_eval.json").read_text())
    assert d["labels"] == ["dense", "quest@1/2", "h2o@4t"]
    a = d["samples"][0]
    assert a["sparse_tokens"] > 0 and 0 < a["results"]["quest@1/2"]["density"] <= 1
    assert all(g["n"] == 2 and 0 <= g["ci95"][0] <= g["accuracy"] <= g["ci95"][1] for g in d["groups"])
    assert "| mean |" in (out / "attn_eval.md").read_text()


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2"), ({"id": "z", "task": "t", "prompt": "p", "metric": "exact"}, "missing field 'answers'"),
])
def test_attn_eval_bad_task_file(tmp_path, capsys, line, message):
    tasks = _task_file(tmp_path / "t.jsonl", [{"id": "a", "task": "t", "prompt": "p", "answers": ["x"],
                                              "metric": "exact"}, line])
    out = tmp_path / "ae"
    assert main(["attn-eval", "--model", "tiny-llama", "--tasks", str(tasks), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_attn_eval_bad_methods_and_budgets(tmp_path, capsys):
    tasks = _task_file(tmp_path / "t.jsonl", [{"id": "a", "task": "t", "prompt": "p q", "answers": ["x"],
                                              "metric": "exact", "max_new_tokens": 2}])
    out = tmp_path / "ae"
    for methods, message in (("quest@2", "outside (0, 1]"), ("nosuch", "unknown attention method"),
                             ("h2o@100000t", "no larger than the context")):
        assert main(["attn-eval", "--model", "tiny-llama", "--tasks", str(tasks), "--methods", methods,
                     "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())
