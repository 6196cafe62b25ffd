"""Atomic artefact writing: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would keep a served report or dashboard from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    return _atomic(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return _atomic(path, write)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    try:
        return _atomic(path, write)
    finally:
        plt.close(fig)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_writable(path: str | os.PathLike, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work starts (SparsenError, one line).

    Tries a temporary file in the nearest existing folder on the way to ``path`` (and removes it): permission
    bits alone say nothing for root or for /proc-like file systems. Creates nothing that stays."""
    from sparsen.errors import SparsenError

    path = Path(path)
    what = "folder" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        raise SparsenError(f"output '{path}' exists and is not a {what}: pass another --out")
    target = path if directory else path.parent
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SparsenError(f"cannot write output '{path}': '{probe}' is a file, not a folder; pass another --out")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sparsen-probe.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SparsenError(f"cannot write output '{path}' ({e.strerror} in '{probe}'): pass a writable --out") from None
    return path
