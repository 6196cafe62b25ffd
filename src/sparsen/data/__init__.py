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
    """Text of a bundled corpus (by name), of a user's UTF-8 text file, or of a folder's ``.txt`` and ``.html`` files
    (``read_folder``)."""
    if name_or_path in CORPORA:
        return resources.files(__package__).joinpath(CORPORA[name_or_path]).read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return read_folder(path)
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


TEXT_SUFFIXES = (".txt", ".html", ".htm")


_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BLOCK_TAGS = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "dt", "dd", "section", "br"}
_SKIP_TAGS = {"script", "style", "nav", "header", "footer"}
_SKIP_CLASSES = ("related", "sphinxsidebar", "footer", "navigation", "headerlink")  # Sphinx page furniture


def html_text(html: str) -> str:
    """The visible text of an HTML page, one paragraph per block element; scripts, styles and navigation (nav,
    header, footer, Sphinx's related/sidebar/footer blocks) dropped."""
    from html.parser import HTMLParser

    class _Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.depth = 0  # open non-void tags inside a skipped element (0: not skipping)

        def handle_starttag(self, tag, attrs):
            if tag in _VOID_TAGS:
                if tag == "br" and not self.depth:
                    self.parts.append("\n")
                return
            if self.depth:
                self.depth += 1
                return
            cls = dict(attrs).get("class") or ""
            if tag in _SKIP_TAGS or any(c in cls.split() for c in _SKIP_CLASSES):
                self.depth = 1
            elif tag in _BLOCK_TAGS:
                self.parts.append("\n")

        def handle_endtag(self, tag):
            if tag in _VOID_TAGS:
                return
            if self.depth:
                self.depth -= 1
            elif tag in _BLOCK_TAGS:
                self.parts.append("\n")

        def handle_data(self, data):
            if not self.depth:
                self.parts.append(data)

    p = _Text()
    p.feed(html)
    lines = [" ".join(line.split()) for line in "".join(p.parts).splitlines()]
    return "\n".join(line for line in lines if line)


def read_folder(path: Path) -> str:
    """Every ``.txt`` / ``.html`` file under a folder, in sorted path order, HTML reduced to its text, files apart by a
    blank line. Sub-folders named ``_*`` or ``.*`` (Sphinx's ``_sources`` copies, hidden folders) are skipped. E.g.
    Debian's python3.11-doc: ``/usr/share/doc/python3.11/html``, millions of tokens of prose."""
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(("_", ".")) for part in f.relative_to(path).parts[:-1]))
    if not files:
        raise SparsenError(f"folder '{path}' has no .txt or .html files: pass a folder of text, or a text file")
    parts = []
    for f in files:
        raw = f.read_text(encoding="utf-8", errors="replace")
        parts.append(html_text(raw) if f.suffix.lower() in (".html", ".htm") else raw)
    return "\n\n".join(p for p in parts if p.strip())


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
