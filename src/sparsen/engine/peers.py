"""The systems `sparsen bench` times beside the engine (HF `generate`, llama.cpp), each in a child process of its own.

A peer that crashes (a signal: llama.cpp's AMX product did on one kind of machine) or hangs (no answer within the
time limit) becomes a one-line note in the printed table and in bench.json, and the engine's figures of the same
run survive. A peer is named by "module:Class"; the class takes a PeerSpec and has ``run(ids, n_new) -> tok/s``
and ``about() -> dict``. The child waits on a pipe, so the parent's timing and the child's never overlap.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass

from sparsen.engine.cpu import cpu_model
from sparsen.errors import SparsenError

PEERS = {"hf": "sparsen.engine.peers:HFGenerate", "llamacpp": "sparsen.engine.peers:LlamaCpp"}
LABELS = {"hf": "HF generate (fp32)", "llamacpp": "llama.cpp (GGUF)"}
TIMEOUT = 900.0


@dataclass(frozen=True)
class PeerSpec:
    model: str
    """the model spec, as load_model takes it"""
    source: str
    """the file or folder the model was loaded from"""
    threads: int
    n_ctx: int


class PeerFailed(Exception):
    """A peer that could not start, crashed, hung or raised: the message is the note."""


@contextlib.contextmanager
def no_gc():
    """Python's cyclic collector off while a system decodes: a full collection walks every torch and transformers
    object and otherwise lands inside the timed steps of whichever system happens to trigger it."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class HFGenerate:
    """HF `generate` on the model's fp32 weights, dense."""

    def __init__(self, spec: PeerSpec):
        import torch

        from sparsen import load_model

        torch.set_num_threads(spec.threads)
        self.lm = load_model(spec.model)
        self.torch = torch

    def about(self) -> dict:
        import transformers

        return {"transformers": transformers.__version__, "torch": self.torch.__version__}

    def run(self, ids, n_new) -> float:
        """Decode tokens/s: (n_new - 1) / (time of n_new tokens - time of 1 token), the prefill and first token
        cancelled out by measuring them alone."""
        x = self.torch.tensor([ids])

        def timed(n):
            with no_gc(), self.torch.no_grad():
                t0 = time.perf_counter()
                self.lm.model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                return time.perf_counter() - t0

        t1, tn = timed(1), timed(n_new)
        return (n_new - 1) / max(tn - t1, 1e-9)


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the GGUF file the model was loaded from."""

    def __init__(self, spec: PeerSpec):
        from pathlib import Path

        if Path(spec.source).suffix.lower() != ".gguf":
            raise SparsenError(f"llama.cpp needs a .gguf model; '{spec.model}' was loaded from {spec.source}")
        try:
            import llama_cpp
        except ImportError:
            raise SparsenError("llama-cpp-python is not installed (`make peers` builds it for this CPU)") from None
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=spec.source, n_threads=spec.threads, n_threads_batch=spec.threads,
                                   n_ctx=spec.n_ctx, verbose=False)

    def about(self) -> dict:
        import json

        from sparsen.engine.llamacpp_build import RECORD

        build = (json.loads(RECORD.read_text()) if RECORD.exists()
                 else "pip's own build, not sparsen's (no llamacpp-build.json: `make peers` builds it for this CPU)")
        return {"version": self.llama_cpp.__version__, "build": build,
                "system_info": self.llama_cpp.llama_print_system_info().decode().strip()}

    def run(self, ids, n_new) -> float:
        """Decode tokens/s: the time from the first generated token to the n_new-th (greedy, no EOS stop)."""
        marks = []
        with no_gc():
            for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
                marks.append(time.perf_counter())
                if len(marks) == n_new:
                    break
        return (n_new - 1) / (marks[-1] - marks[0])


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return first if isinstance(e, SparsenError) else f"{type(e).__name__}: {first}"


def _serve(target: str, spec: PeerSpec, conn) -> None:
    """The child: build the peer, answer ("ok", value) or ("error", note) to each request until "stop"."""
    try:
        module, name = target.split(":")
        peer = getattr(importlib.import_module(module), name)(spec)
        conn.send(("ok", peer.about()))
    except Exception as e:
        conn.send(("error", _one_line(e)))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        try:
            conn.send(("ok", peer.run(*msg[1:])))
        except Exception as e:
            conn.send(("error", _one_line(e)))


class PeerProcess:
    """One peer in a child process (spawned: no forked torch or OpenMP state). Raises PeerFailed with the note."""

    def __init__(self, name: str, spec: PeerSpec, timeout: float = TIMEOUT, target: str | None = None):
        self.timeout = timeout
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(target or PEERS[name], spec, child), daemon=True)
        self.proc.start()
        child.close()  # the child's end lives only in the child: its death reads as EOF here
        self.about = self._answer("starting")

    def run(self, ids, n_new: int) -> float:
        self.conn.send(("run", list(ids), n_new))
        return self._answer("decoding")

    def _answer(self, doing: str):
        if not self.conn.poll(self.timeout):
            self.proc.kill()
            self.proc.join()
            self.conn.close()
            raise PeerFailed(f"no answer within {self.timeout:g} s while {doing} (hung): stopped")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.proc.join(10)
            raise PeerFailed(self._death(doing)) from None
        if kind == "error":
            self.close()
            raise PeerFailed(value)
        return value

    def _death(self, doing: str) -> str:
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                what = f"signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                what = f"signal {-code}"
            return f"crashed with {what} while {doing} on this CPU ({cpu_model()})"
        return f"exited with status {code} while {doing}"

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()


NOTES = {"hf": "HF generate on the same fp32 weights, dense; decode rate with the prefill and first token cancelled "
                "((N-1) / (t_N - t_1))",
         "llamacpp": "llama-cpp-python {version}, the same GGUF file (its own quantized weights and KV cache), greedy; "
                     "its prefill not timed"}


class Peers:
    """The peers one bench run asked for: started up front, one decode each per round, notes and build facts after."""

    def __init__(self, names, spec: PeerSpec, timeout: float = TIMEOUT):
        self.names, self.running, self.failed, self.about = list(names), {}, {}, {}
        for name in self.names:
            try:
                self.running[name] = PeerProcess(name, spec, timeout)
                self.about[name] = self.running[name].about
            except PeerFailed as e:
                self.failed[name] = str(e)

    def run_round(self, runs: dict, ids, n_new: int) -> None:
        """Each running peer decodes once (its tok/s appended to runs[name]); a failing one leaves with its note."""
        for name in list(self.running):
            try:
                runs[name].append(self.running[name].run(ids, n_new))
            except PeerFailed as e:
                self.failed[name] = str(e) + (f" (after {len(runs[name])} round(s))" if runs[name] else "")
                self.running.pop(name).close()

    def notes(self) -> dict:
        """{peer: what was timed, or why it was not} for every peer there is."""
        return {name: (self.failed[name] if name in self.failed else
                       NOTES[name].format(**self.about.get(name, {})) if name in self.names else "not requested")
                for name in PEERS}

    def close(self) -> None:
        for p in self.running.values():
            p.close()
        self.running = {}


def check_systems(vs: str) -> list[str]:
    systems = [s.strip() for s in vs.split(",") if s.strip()] if vs else []
    for s in systems:
        if s not in PEERS:
            raise SparsenError(f"--vs '{s}' is unknown: use a comma-separated subset of {', '.join(PEERS)}")
    return systems


def machine(threads: int, peers: Peers | None = None) -> dict:
    """What bench.json records of the machine: the CPU, the extensions the engine's kernels were compiled with,
    threads, and llama.cpp's version, build flags and the features it reports."""
    from sparsen.engine import kernel_isa

    out = {"cpu": cpu_model(), "kernel_isa": kernel_isa(), "threads": threads}
    if peers is not None and "llamacpp" in peers.about:
        out["llamacpp"] = peers.about["llamacpp"]
    return out
