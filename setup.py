"""Builds the engine's C kernels (src/sparsen/engine/kernels.c) with the package; everything else is in pyproject.toml.

The library is plain C loaded with ctypes (no Python C-API); -march=native because it is built on the
machine that runs it (pip install -e . / make), and -fopenmp for the one parallel region per token.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sparsen.engine._kernels",
            sources=["src/sparsen/engine/kernels.c"],
            extra_compile_args=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-std=c11"],
            extra_link_args=["-fopenmp"],
        )
    ]
)
