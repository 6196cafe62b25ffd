"""The bench's peers in child processes: a peer that crashes, hangs or raises becomes a one-line note and the engine's
figures of the run survive; llama.cpp's build flags come from the CPU's own, never AMX; the kernels refuse a CPU that
lacks an extension they were compiled with."""

import json

import pytest

from sparsen import SparsenError
from sparsen.cli import main
from sparsen.engine import kernel_isa, library_path, open_kernels, peers
from sparsen.engine.cpu import cpu_flags, cpu_model
from sparsen.engine.llamacpp_build import CONSERVATIVE, cmake_args
from sparsen.engine.peers import PeerFailed, PeerProcess, PeerSpec

SPEC = PeerSpec("tiny-llama", "random init, seed fixed", 1, 64)


def test_a_crashing_peer_leaves_the_bench_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(peers.PEERS, "llamacpp", "peer_fakes:Segfault")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-llama", "--vs", "hf,llamacpp", "--prompt-tokens", "16", "--new-tokens", "4",
                 "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert d["engine_dense_tok_s"] > 0 and len(d["raw_tok_s"]["engine_dense"]) == 2
    assert d["hf_tok_s"] > 0 and len(d["raw_tok_s"]["hf"]) == 2  # the real HF peer, in its own process
    assert d["llamacpp_tok_s"] is None and d["engine_best_vs_llamacpp"] is None
    note = d["notes"]["llamacpp"]
    assert note.startswith("crashed with signal 11 (SIGSEGV) while decoding on this CPU") and "\n" not in note
    assert d["machine"]["cpu"] == cpu_model() and d["machine"]["threads"] == 2
    assert d["machine"]["kernel_isa"] == kernel_isa()
    printed = capsys.readouterr().out
    assert "llama.cpp (GGUF)" in printed and "n/a  (crashed with signal 11" in printed


def test_a_hung_a_raising_and_an_unstartable_peer_are_notes():
    hung = PeerProcess("x", SPEC, timeout=20, target="peer_fakes:Hangs")
    assert hung.about == {"version": "fake"}
    hung.timeout = 2
    with pytest.raises(PeerFailed, match=r"^no answer within 2 s while decoding \(hung\): stopped$"):
        hung.run([1, 2], 2)
    assert not hung.proc.is_alive()
    raising = PeerProcess("x", SPEC, timeout=20, target="peer_fakes:Raises")
    with pytest.raises(PeerFailed, match=r"^RuntimeError: no kernel for this shape$"):
        raising.run([1, 2], 2)
    with pytest.raises(PeerFailed, match=r"^OSError: libggml-cpu.so: cannot open shared object file$"):
        PeerProcess("x", SPEC, timeout=20, target="peer_fakes:FailsToStart")


def test_llamacpp_on_a_model_without_a_gguf_is_a_note():
    with pytest.raises(PeerFailed, match="llama.cpp needs a .gguf model; 'tiny-llama' was loaded from random init"):
        PeerProcess("llamacpp", SPEC, timeout=60)


def test_llamacpp_build_flags_are_the_cpus_own_and_never_amx():
    zen4 = {"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw",
            "avx512_vnni", "avx512_bf16", "avx512vbmi"}
    args = cmake_args(zen4).split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_BF16=ON" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "-DGGML_AVX_VNNI=OFF" in args  # not in the flags
    sapphire = zen4 | {"amx_tile", "amx_int8", "amx_bf16", "avx_vnni"}
    assert "-DGGML_AMX_INT8=OFF" in cmake_args(sapphire) and "-DGGML_AVX_VNNI=ON" in cmake_args(sapphire)
    assert "-DGGML_AVX512=OFF" in cmake_args(zen4 - {"avx512bw"})  # AVX512 needs all five of its flags
    safe = cmake_args(sapphire, CONSERVATIVE)
    assert "-DGGML_AVX2=ON" in safe and "-DGGML_AVX512=OFF" in safe and "-DGGML_AVX512_VNNI=OFF" in safe
    assert cpu_flags("processor : 0\nflags\t\t: fpu avx2 fma\n") == {"fpu", "avx2", "fma"}
    assert cpu_model("model name\t: AMD EPYC\nflags : x") == "AMD EPYC"


def test_kernels_built_for_another_cpu_are_refused(monkeypatch):
    isa = kernel_isa()
    assert isa and set(isa) <= cpu_flags()  # -march=native: what this CPU has
    monkeypatch.setattr("sparsen.engine.cpu_flags", lambda: {"sse2"})
    with pytest.raises(SparsenError, match=rf"built for another CPU \(they use {isa[0]}.*which this one lacks\): "
                                           r"rebuild them with `pip install -e \.`"):
        open_kernels(library_path())
