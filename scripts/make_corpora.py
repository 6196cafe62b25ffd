"""Write the bundled held-out evaluation corpora and the mixed calibration corpus (src/sparsen/data/*.txt) from
files a Debian machine has offline.

No calibration reads the evaluation corpora (sparsen.data.EVAL_ONLY). The mixed calibration corpus interleaves
WikiText-2 validation, other chapters of the Python docs (the library reference) and other stdlib modules, and
shares no 64-character run with any evaluation corpus (checked here). Sources and licences:
src/sparsen/data/ATTRIBUTION.md. Run as
root on Debian 12 after `apt-get install python3.11-doc` (the docs) with CPython 3.11's stdlib at /usr/lib/python3.11:
    python3 scripts/make_corpora.py src/sparsen/data
"""

import re
import sys
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources/tutorial")
LIBRARY_DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
STDLIB = Path("/usr/lib/python3.11")
LICENSES = Path("/usr/share/common-licenses")
TUTORIAL = ["appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
            "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix"]
MODULES = ["textwrap", "shlex", "heapq", "bisect", "fractions", "statistics", "dataclasses", "difflib"]
LICENCE_TEXTS = ["GPL-3", "GPL-2", "LGPL-2.1", "LGPL-3", "Apache-2.0", "MPL-2.0", "MPL-1.1", "GFDL-1.3", "Artistic",
                 "CC0-1.0", "BSD"]

# calibration only: none of these is, documents, or is quoted by an evaluation text (the tutorial quotes the re and
# datetime pages)
CALIB_LIBRARY = ["functions", "itertools", "collections", "pathlib", "json", "subprocess", "csv"]
CALIB_MODULES = ["argparse", "configparser", "calendar", "contextlib", "csv", "fnmatch", "functools", "glob", "pprint",
                 "string"]
CALIB_WIKITEXT = Path(__file__).resolve().parents[1] / "src/sparsen/data/wikitext-2-valid-tokenized.txt"
CHUNK = 4000  # characters per interleaved piece: a 1,024-token window sees one or two kinds of text
SHARED_RUN = 64  # no run of this many characters (whitespace collapsed) is in both calibration and evaluation text


def plain_rst(text: str) -> str:
    """reStructuredText read as prose: labels, index entries and directive lines dropped, roles reduced to their
    text (:func:`len` -> len), section underlines dropped; code examples kept."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if re.fullmatch(r"\.\. _[^:]+:", s) or s.startswith((".. index::", ".. sectionauthor::", ".. highlight::")):
            continue
        if s and len(s) >= 3 and len(set(s)) == 1 and s[0] in "=-~*^#+":
            continue
        line = re.sub(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", line)
        line = re.sub(r"`([^`<]+?)\s*<[^>]*>`_", r"\1", line)
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def chunks(text: str, size: int = CHUNK) -> list[str]:
    """``text`` cut at blank lines (whitespace only) into pieces of about ``size`` characters."""
    out, cur, n = [], [], 0
    for line in text.split("\n"):
        if n >= size and not line.strip():
            out.append("\n".join(cur).strip("\n"))
            cur, n = [], 0
        cur.append(line)
        n += len(line) + 1
    if "".join(cur).strip():
        out.append("\n".join(cur).strip("\n"))
    return out


def interleave(texts: list[str]) -> str:
    """Round-robin pieces of each text until the shortest runs out (each kind gets the same share)."""
    pieces = [chunks(t) for t in texts]
    n = min(map(len, pieces))
    return "\n\n".join(p[i] for i in range(n) for p in pieces) + "\n"


BOILERPLATE = re.compile(r'^\s*(Traceback \(most recent call last\):|File "<stdin>", line \d+, in .*|(\S)\2{2,}( +\2+)*)\s*$')


def runs(text: str, k: int = SHARED_RUN) -> set[int]:
    """Hashes of every ``k``-character run of ``text`` with whitespace collapsed, boilerplate lines (traceback
    headers, rules such as ====) left out."""
    flat = " ".join(" ".join(line for line in text.split("\n") if not BOILERPLATE.match(line)).split())
    return {hash(flat[i:i + k]) for i in range(0, max(1, len(flat) - k + 1))}


def docs_text(folder: Path, pages: list[str]) -> str:
    return "\n\n".join(plain_rst((folder / f"{n}.rst.txt").read_text(encoding="utf-8")) for n in pages)


def stdlib_text(modules: list[str]) -> str:
    return "\n\n".join(f"# ---- Lib/{n}.py (CPython 3.11)\n" + (STDLIB / f"{n}.py").read_text(encoding="utf-8")
                       for n in modules)


def main(out: Path) -> None:
    docs, code = docs_text(DOCS, TUTORIAL), stdlib_text(MODULES)
    legal = "\n\n".join((LICENSES / n).read_text(encoding="utf-8") for n in LICENCE_TEXTS)
    mixed = interleave([CALIB_WIKITEXT.read_text(encoding="utf-8"), docs_text(LIBRARY_DOCS, CALIB_LIBRARY),
                        stdlib_text(CALIB_MODULES)])
    wikitext_test = (out / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    held_out = set().union(*(runs(t) for t in (docs, code, legal, wikitext_test)))
    if runs(mixed) & held_out:
        sys.exit("the mixed calibration text repeats evaluation text: change CALIB_LIBRARY / CALIB_MODULES")
    for name, text in (("python-docs-tutorial.txt", docs), ("cpython-stdlib-code.txt", code),
                       ("free-software-licences.txt", legal), ("mixed-calibration.txt", mixed)):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(text):,} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
