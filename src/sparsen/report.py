"""The HTML report of `make demo` / `sparsen demo`: tables and the plots, one page."""

from __future__ import annotations

import html
from pathlib import Path

from sparsen.io import write_text


def write_report(out_dir: str | Path, sections: list[tuple[str, str, list[str]]]) -> Path:
    """sections: (title, preformatted text, [png file names relative to out_dir])."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sparsen report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}pre{background:#f4f4f4;"
             "padding:1em;overflow-x:auto}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}</style>",
             "</head><body><h1>sparsen report</h1>"]
    for title, text, images in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><pre>{html.escape(text)}</pre>")
        parts.extend(f"<img src='{html.escape(img)}' alt='{html.escape(img)}'>" for img in images)
    parts.append("</body></html>")
    return write_text(Path(out_dir) / "index.html", "\n".join(parts))
