"""Write the bundled held-out evaluation corpora (src/sparsen/data/*.txt) from files a Debian machine has offline.

No calibration reads them (sparsen.data.EVAL_ONLY). Sources and licences: src/sparsen/data/ATTRIBUTION.md. Run as
root on Debian 12 after `apt-get install python3.11-doc` (the docs) with CPython 3.11's stdlib at /usr/lib/python3.11:
    python3 scripts/make_corpora.py src/sparsen/data
"""

import re
import sys
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources/tutorial")
STDLIB = Path("/usr/lib/python3.11")
LICENSES = Path("/usr/share/common-licenses")
TUTORIAL = ["appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
            "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix"]
MODULES = ["textwrap", "shlex", "heapq", "bisect", "fractions", "statistics", "dataclasses", "difflib"]
LICENCE_TEXTS = ["GPL-3", "GPL-2", "LGPL-2.1", "LGPL-3", "Apache-2.0", "MPL-2.0", "MPL-1.1", "GFDL-1.3", "Artistic",
                 "CC0-1.0", "BSD"]


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


def main(out: Path) -> None:
    docs = "\n\n".join(plain_rst((DOCS / f"{n}.rst.txt").read_text(encoding="utf-8")) for n in TUTORIAL)
    code = "\n\n".join(f"# ---- Lib/{n}.py (CPython 3.11)\n" + (STDLIB / f"{n}.py").read_text(encoding="utf-8")
                       for n in MODULES)
    legal = "\n\n".join((LICENSES / n).read_text(encoding="utf-8") for n in LICENCE_TEXTS)
    for name, text in (("python-docs-tutorial.txt", docs), ("cpython-stdlib-code.txt", code),
                       ("free-software-licences.txt", legal)):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{name}: {len(text):,} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
