"""Build llama.cpp (llama-cpp-python) for the CPU it is installed on, without the AMX path, and check it runs.

`make` runs ``python -m sparsen.engine.llamacpp_build``. pip's own build compiles ggml with -march=native, and on
the Intel machines with AMX that build's AMX matrix product crashes (signal 11) in our virtual machines. Here the
build flags are the CPU's own instruction-set extensions, named one by one (GGML_NATIVE off, every AMX flag off),
so the same commands give a working build on the AMD and the Intel machines. The wheel is built without pip's cache
(a cached wheel may come from the other kind of machine), then a child process loads the bundled GGUF and decodes
a few tokens: if that child crashes, the build is redone with AVX2 only. What was built and how the check went is
written to ``<venv>/llamacpp-build.json``; `sparsen bench` copies it into bench.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sparsen.engine.cpu import cpu_flags, cpu_model

VERSION = "0.3.36"
RECORD = Path(sys.prefix) / "llamacpp-build.json"

# ggml's CMake option -> the /proc/cpuinfo flags it needs (all of them)
GGML_FLAGS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
CONSERVATIVE = ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C")  # the fallback: AVX2 only


def cmake_args(flags: set[str], only: tuple[str, ...] | None = None) -> str:
    """CMAKE_ARGS for ggml: each option ON where the CPU has what it needs (and, with ``only``, it is listed), AMX and
    the native build off."""
    on = {opt for opt, needs in GGML_FLAGS.items() if all(f in flags for f in needs) and (only is None or opt in only)}
    args = ["-DGGML_NATIVE=OFF"] + [f"-D{opt}={'ON' if opt in on else 'OFF'}" for opt in GGML_FLAGS]
    return " ".join(args + [f"-D{opt}=OFF" for opt in AMX])


SMOKE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=2, n_ctx=64, verbose=False)
out = [t for _, t in zip(range(4), llm.generate(llm.tokenize(b"The capital of France"), top_k=1, temp=0.0))]
assert len(out) == 4, out
print(llama_cpp.llama_print_system_info().decode().strip())
"""


def smoke(gguf: str, timeout: float = 300) -> tuple[bool, str]:
    """Load ``gguf`` and decode 4 tokens in a child process: (ran, what it printed or how it failed)."""
    try:
        p = subprocess.run([sys.executable, "-c", SMOKE, gguf], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:g} s"
    if p.returncode == 0:
        return True, p.stdout.strip()
    if p.returncode < 0:
        return False, f"crashed with signal {-p.returncode}"
    return False, f"exited with status {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}"


def _pip_install(args: str) -> bool:
    env = {**os.environ, "CMAKE_ARGS": args, "FORCE_CMAKE": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--force-reinstall", "--no-deps",
           f"llama-cpp-python=={VERSION}"]
    print(f"building llama-cpp-python {VERSION} (a few minutes) with CMAKE_ARGS={args}", flush=True)
    return subprocess.run(cmd, env=env).returncode == 0


def _bundled_gguf() -> str:
    from sparsen.models.loading import _bundled_gguf

    return str(_bundled_gguf("smollm2"))


def main(argv: list[str] | None = None) -> int:
    force = "--force" in (argv if argv is not None else sys.argv[1:])
    flags = cpu_flags()
    attempts = [cmake_args(flags), cmake_args(flags, CONSERVATIVE)]
    if not force and RECORD.exists():
        rec = json.loads(RECORD.read_text())
        if rec.get("version") == VERSION and rec.get("cmake_args") in attempts and rec.get("runs"):
            print(f"llama-cpp-python {VERSION} already built for this CPU ({RECORD})")
            return 0
    gguf = _bundled_gguf()
    record = {"version": VERSION, "cpu": cpu_model()}
    for args in dict.fromkeys(attempts):
        if not _pip_install(args):
            record |= {"cmake_args": args, "runs": False, "check": "the build failed"}
            continue
        ran, out = smoke(gguf)
        record |= {"cmake_args": args, "runs": ran, "check": out}
        if ran:
            break
        print(f"warning: llama.cpp built with {args} {out} on this CPU; trying the next flags", file=sys.stderr)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    if not record["runs"]:
        print(f"warning: no llama.cpp build runs here ({record['check']}); `sparsen bench --vs llamacpp` will say so",
              file=sys.stderr)
    else:
        print(f"llama.cpp runs here: {record['check'].splitlines()[0] if record['check'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
