"""Peers that misbehave on purpose, for tests/test_peers.py (named as "peer_fakes:Class"; the spawned child finds
this file on the sys.path it inherits from pytest)."""

import os
import signal
import time


class Segfault:
    """Starts, then dies of SIGSEGV at its first decode (as llama.cpp's AMX product did)."""

    def __init__(self, spec):
        self.spec = spec

    def about(self):
        return {"version": "fake"}

    def run(self, ids, n_new):
        os.kill(os.getpid(), signal.SIGSEGV)


class Hangs(Segfault):
    """Starts, then never answers a decode."""

    def run(self, ids, n_new):
        time.sleep(3600)


class Raises(Segfault):
    def run(self, ids, n_new):
        raise RuntimeError("no kernel for this shape\nsecond line")


class FailsToStart:
    def __init__(self, spec):
        raise OSError("libggml-cpu.so: cannot open shared object file")
