import importlib.util
from pathlib import Path

import pytest
import torch

from sparsen import SparsenError
from sparsen.data import CORPORA, EVAL_ONLY, corpus_windows, read_corpus, tokenize, windows

ROOT = Path(__file__).resolve().parents[1]


def test_windows_are_contiguous_slices():
    ids = torch.arange(1000)
    w = windows(ids, 128, 5)
    assert w.shape == (5, 128)
    for i in range(5):
        assert torch.equal(w[i], ids[i * 128:(i + 1) * 128])
    assert windows(ids, 128).shape == (7, 128)  # all whole windows


def test_too_short_corpus_is_an_error_not_a_shorter_run():
    with pytest.raises(SparsenError, match="1 whole window"):
        windows(torch.arange(300), 256, 2)
    with pytest.raises(SparsenError, match="0 whole window"):
        windows(torch.arange(10), 256)


def test_bundled_corpora_ship_with_the_package():
    for name in CORPORA:  # WikiText's two splits and the mixed calibration text are over 1 MB; the held-out
        big = name.startswith("wikitext") or name == "mixed-calib"  # domains hold 150-300 kB each
        assert len(read_corpus(name)) > (1_000_000 if big else 150_000), name
    from sparsen.cli import CALIB_CORPUS_NAMES  # the CLI's help names every bundled calibration text
    assert CALIB_CORPUS_NAMES.split(", ") == [n for n in CORPORA if n not in EVAL_ONLY]


def test_mixed_calibration_text_repeats_no_evaluation_passage():
    # the check scripts/make_corpora.py makes when it writes the file, made on the file the package ships
    spec = importlib.util.spec_from_file_location("make_corpora", ROOT / "scripts" / "make_corpora.py")
    make_corpora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpora)
    mixed = read_corpus("mixed-calib")
    calib = make_corpora.runs(mixed)
    for name in EVAL_ONLY:
        assert not calib & make_corpora.runs(read_corpus(name)), name
    assert mixed.count("# ---- Lib/") == 10 and "Homarus gammarus" in mixed[:2000]  # code and WikiText both in it


def test_tokenize_adds_no_special_tokens(tiny_llama):
    ids = tokenize(tiny_llama.tokenizer, "ab c")
    assert ids.tolist() == tiny_llama.tokenizer("ab c", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and tiny_llama.tokenizer.bos_token_id not in ids.tolist()


def test_user_text_file(tmp_path, tiny_llama):
    f = tmp_path / "mine.txt"
    f.write_text("x" * 100)
    w = corpus_windows(tiny_llama.tokenizer, str(f), 10, 10)
    assert w.shape == (10, 10)
    with pytest.raises(SparsenError, match="100 tokens"):
        corpus_windows(tiny_llama.tokenizer, str(f), 10, 11)


def test_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SparsenError, match="empty"):
        read_corpus(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    with pytest.raises(SparsenError, match="not UTF-8"):
        read_corpus(str(binary))
    with pytest.raises(SparsenError, match="not found"):
        read_corpus(str(tmp_path / "missing.txt"))


def test_windows_for_a_model_that_needs_bos_start_with_it():
    ids = torch.arange(100)
    w = windows(ids, 10, 3, bos=7)
    assert w.shape == (3, 10) and torch.equal(w[:, 0], torch.full((3,), 7))
    assert torch.equal(w[:, 1:].reshape(-1), ids[:27])  # 9 corpus tokens a window, contiguous
    assert windows(ids, 10, bos=7).shape[0] == 11
