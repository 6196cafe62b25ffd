import json

import pytest

from sparsen import SparsenError
from sparsen.evaluation.tasks import (
    METRICS,
    TASKS,
    Difficulty,
    TaskSample,
    generate_suite,
    load_tasks,
    normalise,
    prompt_tokens,
    save_tasks,
    score,
)

LENGTHS = (1024, 2048)
N = 2


def sample(answers, metric="exact", **kw):
    return TaskSample("s-1", "t", "Some context.\n\nA question?", answers, metric, **kw)


def test_normalise_lowercases_and_keeps_only_alphanumeric_words():
    assert normalise("  Hello, World!!  58-213_x\n") == "hello world 58 213 x"
    assert normalise("...") == ""


def test_exact_matches_a_prefix_at_a_word_boundary():
    s = sample(["58213"])
    assert score(s, " 58213.") == score(s, "58213 is the pass key") == score(s, ": 58213") == 1.0
    assert score(s, " 582130") == score(s, " The key is 58213") == score(s, "") == 0.0
    assert score(sample(["12"]), "123") == 0.0 and score(sample(["12"]), "12-3") == 1.0
    town = sample(["Millbrook", "Ashford"])
    assert score(town, " ASHFORD!") == score(town, " millbrook, of course") == 1.0


def test_contains_all_needs_every_answer_as_whole_words():
    s = sample(["ABCDE", "FGHIJ"], "contains_all")
    assert score(s, " fghij, and abcde.") == 1.0
    assert score(s, " ABCDE only") == 0.0
    assert score(s, " ABCDEF, FGHIJ") == 0.0  # a longer word is not the answer
    assert score(sample(["quiet river"], "contains_all"), "the Quiet-River!") == 1.0
    assert set(METRICS) == {"exact", "contains_all"}


def test_save_and_load_round_trip(tmp_path):
    samples = [sample(["1"]), TaskSample("s-2", "vt", "ctx\n\nQ?", ["A", "B"], "contains_all", "Answer:", 30, 5,
                                         {"length": 1024, "depths": [0.1, 0.5], "knobs": {"vt_hops": 2}})]
    path = save_tasks(samples, tmp_path / "sub" / "tasks.jsonl")
    assert load_tasks(path) == samples


def test_load_skips_blank_lines_and_ignores_unknown_keys(tmp_path):
    path = tmp_path / "tasks.jsonl"
    row = {"id": "a", "task": "t", "prompt": "p", "answers": ["x"], "metric": "exact", "extra": 1}
    path.write_text("\n" + json.dumps(row) + "\n\n   \n")
    assert load_tasks(path) == [TaskSample("a", "t", "p", ["x"], "exact")]


GOOD = {"id": "b", "task": "t", "prompt": "abc", "answers": ["x"], "metric": "exact"}


@pytest.mark.parametrize("line, says", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "answers"}), "missing field 'answers'"),
    (json.dumps({**GOOD, "answers": "x"}), "'answers' must be a non-empty list"),
    (json.dumps({**GOOD, "answers": []}), "'answers' must be a non-empty list"),
    (json.dumps({**GOOD, "prompt": 3}), "'prompt' must be a string"),
    (json.dumps({**GOOD, "metric": "fuzzy"}), "metric 'fuzzy' is unknown"),
    (json.dumps({**GOOD, "max_new_tokens": 0}), "'max_new_tokens'"),
    (json.dumps({**GOOD, "query_start": 4}), "'query_start'"),
    (json.dumps({**GOOD, "query_start": -1}), "'query_start'"),
    (json.dumps({**GOOD, "meta": []}), "'meta' must be an object"),
    (json.dumps({**GOOD, "id": "a"}), "duplicate id 'a' (first on line 1)"),
])
def test_malformed_line_is_a_one_line_error_naming_the_line(tmp_path, line, says):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({**GOOD, "id": "a"}) + "\n\n" + line + "\n")
    with pytest.raises(SparsenError) as e:
        load_tasks(path)
    msg = str(e.value)
    assert "\n" not in msg and "tasks.jsonl line 3: " in msg and says in msg


def test_missing_or_empty_task_file_is_an_error(tmp_path):
    with pytest.raises(SparsenError, match="not found"):
        load_tasks(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SparsenError, match="no samples"):
        load_tasks(tmp_path / "empty.jsonl")


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="module")
def suite(tok):
    return generate_suite(tok, LENGTHS, n=N, seed=0)


def test_suite_has_n_samples_per_task_and_length_and_is_deterministic(tok, suite):
    assert [s.id for s in suite] == [f"{t}-{L}-{i:03d}" for t in TASKS for L in LENGTHS for i in range(N)]
    assert generate_suite(tok, LENGTHS, n=N, seed=0) == suite
    other = generate_suite(tok, (1024,), n=1, seed=1, tasks="passkey")[0]
    assert other.id == suite[0].id and other.prompt != suite[0].prompt


def test_suite_fills_90_to_100_percent_of_each_length(tok, suite):
    for s in suite:
        ids, _ = prompt_tokens(tok, s)
        assert 0.9 * s.meta["length"] <= len(ids) + s.max_new_tokens <= s.meta["length"], s.id
        assert s.meta["tokens"] == len(ids)


def test_questions_trail_and_answers_sit_in_the_context(suite):
    for s in suite:
        assert s.prompt[s.query_start:] == s.meta["question"] and s.answer_prefix, s.id
        context = s.prompt[:s.query_start]
        assert s.meta["question"] not in context
        assert all(a in context for a in s.answers), s.id
        assert score(s, " " + ", ".join(s.answers) + ".") == 1.0
        assert all(0 <= d < 1 for d in s.meta.get("depths", [s.meta.get("depth", 0)]))


def test_prompt_tokens_split_at_the_trailing_question(tok, suite):
    for s in suite:
        ids, q = prompt_tokens(tok, s)
        assert 0 < q < len(ids)
        tail, head = tok.decode(ids[q:]), tok.decode(ids[:q])
        assert tail.startswith(s.meta["question"]) and tail.endswith(s.answer_prefix), s.id
        assert s.prompt[:s.query_start].rstrip() in head
    ids, q = prompt_tokens(tok, TaskSample("x", "t", "no question", ["a"], "exact"))
    assert q == len(ids)


def test_needle_statements(suite):
    for s in suite:
        if s.task == "passkey":
            assert s.prompt.count(f"The pass key is {s.answers[0]}. Remember it.") == 1
        if s.task == "niah":
            key = s.meta["key"]
            assert s.prompt.count(f"for {key} is: {s.answers[0]}.") == 1 and s.prompt.count(f"for {key} is:") == 1
        if s.task == "vt":  # the chain, in order
            names = s.answers
            value = s.meta["question"].split()[-1].rstrip(".")
            lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
            at = [s.prompt.index(line) for line in lines]
            assert at == sorted(at) and s.prompt.count(f"= {value}.") == 1
        if s.task == "cwe":  # every common word outnumbers every other word
            items = s.prompt[s.prompt.index("\n\n") + 2:s.query_start].split()[1::2]  # "1. word 2. word ..."
            assert len(items) == s.meta["items"]
            least_common = min(items.count(w) for w in s.answers)
            assert all(items.count(w) < least_common for w in set(items) - set(s.answers))
        if s.task == "story":
            assert s.prompt.count(f"Arion bought the {s.meta['item']} from") == 1


def test_knobs_shape_the_samples_and_are_recorded(tok):
    d = Difficulty(niah_keys=5, vt_hops=3, cwe_words=4, cwe_ratio=5, story_chapters=6, question_first=True)
    by_task = {s.task: s for s in generate_suite(tok, (1024,), n=1, difficulty=d, passkey_digits=7)}
    assert len(by_task["passkey"].answers[0]) == 7 and by_task["passkey"].meta["knobs"]["passkey_digits"] == 7
    assert by_task["niah"].prompt.count("The special magic number for") == 5  # in filler prose
    assert len(by_task["vt"].answers) == 4 and len(by_task["cwe"].answers) == 4
    assert by_task["story"].prompt.count("Chapter ") == 6
    for s in by_task.values():
        assert s.prompt.count(s.meta["question"]) == 2 and s.prompt[s.query_start:] == s.meta["question"]
        assert s.meta["knobs"]["question_first"] is True


def test_bad_requests_are_errors(tok):
    with pytest.raises(SparsenError, match="unknown difficulty knob"):
        generate_suite(tok, (1024,), n=1, niah_hops=3)
    with pytest.raises(SparsenError, match="vt_hops"):
        Difficulty(vt_hops=-1)
    with pytest.raises(SparsenError, match="unknown task"):
        generate_suite(tok, (1024,), n=1, tasks=["nope"])
    with pytest.raises(SparsenError, match="too short"):
        generate_suite(tok, (64,), n=1, tasks="niah")


def test_sign_test_matches_the_binomial_by_hand():
    from sparsen.evaluation.attention import sign_test

    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(1, 4) == pytest.approx(2 * (1 + 5) / 32)
    assert sign_test(13, 0) == pytest.approx(2 / 2**13)


def test_paired_table_counts_wins_and_losses_on_the_same_samples():
    from sparsen.evaluation.attention import paired_table

    def row(task, dense, sparse):
        return {"task": task, "length": 1024, "results": {"dense": {"score": dense}, "m": {"score": sparse}}}

    rows = [row("a", 1, 1), row("a", 0, 1), row("a", 0, 1), row("b", 1, 0), row("b", 0, 0)]
    md = paired_table({"labels": ["dense", "m"], "samples": rows})
    assert "| m | 1024 | +2 -0 | +0 -1 | +2 -1 | 1 |" in md
    assert paired_table({"labels": ["m"], "samples": rows}) == ""  # no reference, no table
