"""Builds the engine's C kernels (src/sparsen/engine/kernels/) with the package; everything else is in pyproject.toml.

The library is plain C loaded with ctypes (no Python C-API); -march=native because it is built on the machine that
runs it (pip install -e . / make), and -fopenmp for the one parallel region per token. The build is optional: on a
machine without a C compiler or OpenMP the package installs with one warning line, everything but the engine
works, and the engine says what is missing when it is used.
"""

import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = Path("src/sparsen/engine/kernels")


class OptionalBuildExt(build_ext):
    """build_ext that warns (one line) instead of failing when the kernels cannot be compiled or linked."""

    failed = False

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all surfaces as several distutils error types
            self._warn(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # a compile or link failure (no gcc, no OpenMP, no libgomp)
            self._warn(e)

    def copy_extensions_to_source(self):
        if not self.failed:  # (editable installs) nothing to copy after a failed build
            super().copy_extensions_to_source()

    def _warn(self, e):
        if self.failed:
            return
        self.failed = True
        cc = getattr(getattr(self, "compiler", None), "compiler_so", None)
        if isinstance(cc, list) and cc:  # a compile or link command failed: its message is the whole command line
            reason = f"{type(e).__name__} with the compiler '{cc[0]}'"
        else:
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        print(f"WARNING: sparsen's engine kernels were not built ({reason}); everything but the engine works. "
              "Install gcc with OpenMP (libgomp) and rerun `pip install -e .` to build them.", file=sys.stderr)


setup(
    ext_modules=[
        Extension(
            "sparsen.engine._kernels",
            sources=sorted(str(p) for p in KERNELS.glob("*.c")),
            depends=sorted(str(p) for p in KERNELS.glob("*.h")),
            include_dirs=[str(KERNELS)],
            extra_compile_args=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-std=c11",
                                "-Werror=implicit-function-declaration"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
