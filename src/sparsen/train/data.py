"""Training data for small models: a vocabulary (bytes, or SmolLM2's BPE), a train / held-out split of a local corpus,
and seeded one-pass batches (no window is seen twice: the "infinite data" regime of the Lazy Neuron paper).

A run asks for steps x batch windows of ctx + 1 tokens; a corpus with fewer is refused before any work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from sparsen.errors import SparsenError

VOCABS = ("bytes", "bpe")


class ByteVocab:
    name, size = "bytes", 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPEVocab:
    """SmolLM2's tokenizer (49152 tokens), read from the bundled model's GGUF."""
    name = "bpe"

    def __init__(self):
        from sparsen.models import load_model
        self.tok = load_model("smollm2").tokenizer
        self.size = len(self.tok)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def vocab(name: str):
    if name == "bytes":
        return ByteVocab()
    if name == "bpe":
        return BPEVocab()
    raise SparsenError(f"unknown vocabulary '{name}': use one of {', '.join(VOCABS)}")


def read_text(source: str) -> str:
    """A UTF-8 file, a folder of .txt/.html files (e.g. /usr/share/doc/python3.11/html), or a bundled corpus name."""
    from sparsen.data import read_corpus, read_folder

    p = Path(source)
    if p.is_dir():
        return read_folder(p)
    return read_corpus(source)


class TokenData:
    """A corpus's tokens split into training and held-out parts: the held-out part is the last ``heldout_share``
    of the text (never trained on)."""

    def __init__(self, ids: torch.Tensor, ctx: int, heldout_share: float = 0.05, name: str = "corpus",
                 vocab_size: int = 256):
        if not 0 < heldout_share < 1:
            raise SparsenError(f"heldout_share must be in (0, 1), not {heldout_share}")
        n_held = int(len(ids) * heldout_share)
        self.train_ids, self.heldout_ids = ids[:len(ids) - n_held], ids[len(ids) - n_held:]
        self.ctx, self.name, self.vocab_size, self.heldout_share = ctx, name, vocab_size, heldout_share
        self._orders: dict[int, torch.Tensor] = {}  # seed -> the permutation of the training windows
        self.fingerprint = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
        if len(self.heldout_ids) < ctx + 1:
            raise SparsenError(f"'{name}' is too short: its held-out part has {len(self.heldout_ids)} tokens, fewer than "
                               f"one window of {ctx + 1}; give a longer corpus")

    @property
    def train_windows(self) -> int:
        return len(self.train_ids) // (self.ctx + 1)

    def check_steps(self, steps: int, batch: int) -> None:
        need = steps * batch
        if need > self.train_windows:
            raise SparsenError(f"'{self.name}' has {self.train_windows} training windows of {self.ctx + 1} tokens but "
                               f"{steps} steps x batch {batch} need {need}: give fewer steps, a smaller batch or a "
                               f"longer corpus")

    def batch(self, step: int, batch: int, seed: int) -> torch.Tensor:
        """The windows of ``step`` [batch, ctx + 1]: a seeded permutation of all windows, read in order, so a resumed
        run draws exactly what an uninterrupted one would."""
        if seed not in self._orders:
            self._orders[seed] = torch.randperm(self.train_windows, generator=torch.Generator().manual_seed(seed))
        idx = self._orders[seed][step * batch:(step + 1) * batch]
        w = self.ctx + 1
        return torch.stack([self.train_ids[i * w:(i + 1) * w] for i in idx.tolist()])

    def heldout(self, n: int | None = None) -> torch.Tensor:
        """The first n held-out windows [n, ctx + 1] (all that fit when n is None)."""
        w = self.ctx + 1
        m = len(self.heldout_ids) // w
        n = m if n is None else min(n, m)
        return self.heldout_ids[:n * w].view(n, w)


def random_token_data(n_tokens: int, vocab_size: int, ctx: int, seed: int) -> TokenData:
    """i.i.d. uniform tokens: the random-inputs control."""
    ids = torch.randint(vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    return TokenData(ids, ctx, name=f"random tokens (seed {seed})", vocab_size=vocab_size)


def load_data(text: str, vocab_name: str, ctx: int, heldout_share: float = 0.05) -> TokenData:
    v = vocab(vocab_name)
    return TokenData(v.encode(read_text(text)), ctx, heldout_share, name=text, vocab_size=v.size)
