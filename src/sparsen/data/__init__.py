"""Corpora and token windows.

Bundled (sources and licences in ATTRIBUTION.md): WikiText-2 (Merity et al., 2016; CC BY-SA 3.0), whose raw *test*
split is for evaluation and *validation* split for calibration; and three held-out evaluation domains of other
kinds that no calibration reads: technical prose (the Python 3.11 tutorial), source code (CPython 3.11 stdlib
modules) and legal text (free-software licences). ``domains`` names all four evaluation corpora. ``mixed-calib``
is calibration text of three kinds (WikiText-2 validation, other Python docs pages, other stdlib modules) that
shares no passage with any evaluation corpus; it has no legal text, so the licences stay a kind it never saw.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from sparsen.errors import SparsenError

CORPORA = {
    "wikitext2-test": "wikitext-2-raw-test.txt",
    "wikitext2-valid": "wikitext-2-valid-tokenized.txt",
    "python-docs": "python-docs-tutorial.txt",
    "python-code": "cpython-stdlib-code.txt",
    "licences": "free-software-licences.txt",
    "mixed-calib": "mixed-calibration.txt",
}
EVAL_CORPUS = "wikitext2-test"
CALIB_CORPUS = "wikitext2-valid"
EVAL_ONLY = ("wikitext2-test", "python-docs", "python-code", "licences")  # never read by a calibration
CORPUS_SETS = {"domains": EVAL_ONLY}


def eval_corpora(names) -> list[str]:
    """Evaluation corpora from names, paths and set names (``domains``), in order, without repeats."""
    out: list[str] = []
    for n in ([names] if isinstance(names, str) else list(names)):
        for c in CORPUS_SETS.get(n, (n,)):
            if c not in out:
                out.append(c)
    if not out:
        raise SparsenError("no evaluation corpus given: pass --text NAME_OR_FILE (repeatable) or --text domains")
    return out


def read_corpus(name_or_path: str) -> str:
    """Text of a bundled corpus (by name) or of a user's UTF-8 text file."""
    if name_or_path in CORPORA:
        return resources.files(__package__).joinpath(CORPORA[name_or_path]).read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise SparsenError(f"text file '{name_or_path}' not found: pass an existing UTF-8 text file or one of "
                           f"{', '.join(CORPORA)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SparsenError(f"'{name_or_path}' is not UTF-8 text: pass a plain UTF-8 text file") from None
    if not text.strip():
        raise SparsenError(f"text file '{name_or_path}' is empty: pass a file with enough text for the windows asked")
    return text


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_CACHED_CORPORA = 6  # a cross-domain run reads five corpora in turn, again and again


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once, with no special tokens added; returns a 1-D int64 tensor."""
    key = (id(tokenizer), len(text), hash(text))
    if key in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = _TOKEN_CACHE.pop(key)  # most recently used last
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(_TOKEN_CACHE) >= _CACHED_CORPORA:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def windows(ids: torch.Tensor, ctx: int, n: int | None = None, source: str = "corpus", bos: int | None = None
            ) -> torch.Tensor:
    """Non-overlapping windows: window i is tokens [i*ctx, (i+1)*ctx). Returns [n, ctx].

    With ``bos`` (for a model trained with a BOS token at the start of every sequence, like Gemma), window i is
    that token followed by corpus tokens [i*(ctx-1), (i+1)*(ctx-1)). ``n=None`` takes every whole window. Asking
    for more than the corpus holds is an error, never a silently shorter run.
    """
    if ctx < 2:
        raise SparsenError(f"context length {ctx} is too short: use --ctx 2 or more")
    body = ctx if bos is None else ctx - 1
    available = ids.numel() // body
    if n is None:
        n = available
    if n < 1 or n > available:
        raise SparsenError(
            f"{source} has {ids.numel()} tokens: {available} whole window(s) of {ctx}, but {n} were asked; "
            "lower --windows/--ctx/--tokens or pass a longer --text"
        )
    wins = ids[: n * body].view(n, body)
    if bos is not None:
        wins = torch.cat([torch.full((n, 1), bos, dtype=wins.dtype), wins], dim=1)
    return wins


def corpus_windows(tokenizer, corpus: str, ctx: int, n: int | None = None, bos: int | None = None) -> torch.Tensor:
    """``windows`` of a corpus tokenized once with no special tokens (``bos``: see ``windows``)."""
    return windows(tokenize(tokenizer, read_corpus(corpus)), ctx, n, source=f"'{corpus}'", bos=bos)
