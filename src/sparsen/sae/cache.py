"""An activation cache on disk: safetensors shards and a manifest, written resumably, read as shuffled batches.

    DIR/manifest.json        model spec and fingerprint, hooks and widths, dtype, corpus (name, sha1), context,
                             the shards in order with the corpus token range each covers
    DIR/shard_00000.safetensors   {hook name: [n, d]} for every hook, plus ``tokens`` [n] (int32 token ids) and
                             ``positions`` [n] (int64 offsets in the tokenized corpus) for contexts and dashboards

Windows of ``ctx`` tokens are cut from the tokenized corpus without overlap; the first ``skip_first`` positions of
each window are not stored (the first token's residual stream is an attention sink of outsized norm that a
dictionary would spend latents on; SAELens and sparsify exclude such tokens too). A shard is written atomically and
only then listed in the manifest, so an interrupted run resumes after its last listed shard and no token is cached
twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsen.data import CORPORA, read_corpus, tokenize
from sparsen.errors import SparsenError
from sparsen.io import save_safetensors, write_json
from sparsen.models.hookpoints import hook_point, read_activations

FORMAT = "sparsen-activation-cache/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds; a resumed run must ask for the same thing."""

    model: str
    fingerprint: str
    hooks: dict
    """{hook name: width}"""
    dtype: str
    corpus: str
    corpus_sha1: str
    ctx: int
    skip_first: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def build_cache(lm, hooks: list[str], tokens: int, out, corpus: str | list[str] = "wikitext2-valid", ctx: int = 1024,
                dtype: str = "float32", shard_tokens: int = 65536, batch_windows: int = 4, skip_first: int = 1,
                progress: bool = True) -> dict:
    """Cache ``tokens`` activations of each hook in ``hooks`` into folder ``out`` (resuming a run of the same spec);
    ``corpus``: a name, file or folder, or a list of them read one after the other. Returns the manifest."""
    if dtype not in DTYPES:
        raise SparsenError(f"dtype '{dtype}': use one of {', '.join(DTYPES)}")
    if not hooks:
        raise SparsenError("no hook given: pass --hook blocks.N.KIND (repeatable)")
    points = [hook_point(lm.adapter, h) for h in hooks]
    if any(p.heads for p in points):
        raise SparsenError("attn.hook_result has one vector per head: cache attn.hook_z (its heads concatenated) instead")
    if tokens < 1:
        raise SparsenError(f"--tokens {tokens}: ask for at least one token")
    if not 0 <= skip_first < ctx:
        raise SparsenError(f"skip_first {skip_first} must be in 0..ctx-1 ({ctx - 1})")
    corpora = [corpus] if isinstance(corpus, str) else list(corpus)
    text = "\n\n".join(read_corpus(c) for c in corpora)  # several corpora: one text, in the order given
    ids = tokenize(lm.tokenizer, text)
    per_window = ctx - skip_first
    n_windows = math.ceil(tokens / per_window)
    if n_windows * ctx > ids.numel():
        have = ids.numel() // ctx * per_window
        raise SparsenError(f"'{'+'.join(corpora)}' gives {have} tokens at --ctx {ctx}, not {tokens}: lower --tokens or pass a "
                           "longer --text (a file or a folder of .txt/.html)")
    label = "+".join(c if c in CORPORA else str(Path(c).expanduser().resolve()) for c in corpora)
    spec = CacheSpec(lm.spec, lm.fingerprint, {p.name: p.d for p in points}, dtype, label, _text_sha1(text), ctx,
                     skip_first)
    out = Path(out)
    manifest = _start_or_resume(out, spec, tokens)
    done = sum(s["tokens"] for s in manifest["shards"])
    if done >= tokens:
        return manifest
    window, drop = divmod(done, per_window)  # a shard may end inside a window: its rest is dropped from the batch
    bar = tqdm(total=tokens, initial=done, desc="cache", unit="tok", unit_scale=True, disable=not progress)
    buf: dict[str, list] = {n: [] for n in [*spec.hooks, "tokens", "positions"]}
    buffered = 0
    torch_dtype = DTYPES[dtype]
    while done + buffered < tokens:
        nb = min(batch_windows, n_windows - window)
        starts = torch.arange(window, window + nb) * ctx
        batch = torch.stack([ids[s:s + ctx] for s in starts.tolist()])
        acts = read_activations(lm.adapter, batch, points)
        take = min(tokens - done - buffered, nb * per_window - drop)
        for name in spec.hooks:
            rows = acts[name][:, skip_first:].reshape(-1, spec.hooks[name])
            buf[name].append(rows[drop:drop + take].to(torch_dtype))
        pos = (starts[:, None] + torch.arange(skip_first, ctx)[None]).reshape(-1)[drop:drop + take]
        drop = 0
        buf["positions"].append(pos)
        buf["tokens"].append(ids[pos].to(torch.int32))
        buffered += take
        window += nb
        bar.update(take)
        while buffered >= shard_tokens or (done + buffered >= tokens and buffered):
            n = min(shard_tokens, buffered)
            cat = {k: torch.cat(v) for k, v in buf.items()}
            shard = {k: v[:n] for k, v in cat.items()}
            buf = {k: [v[n:]] for k, v in cat.items()}
            _write_shard(out, manifest, shard, n)
            done += n
            buffered -= n
    bar.close()
    manifest["complete"] = True
    write_json(out / "manifest.json", manifest)
    return manifest


def _start_or_resume(out: Path, spec: CacheSpec, tokens: int) -> dict:
    path = out / "manifest.json"
    if path.exists():
        manifest = json.loads(path.read_text())
        old = manifest.get("spec", {})
        if manifest.get("format") != FORMAT:
            raise SparsenError(f"'{out}' holds something other than a sparsen activation cache: pass another --out")
        for key in ("model", "fingerprint", "hooks", "dtype", "corpus_sha1", "ctx", "skip_first"):
            if old.get(key) != spec.to_json()[key]:
                raise SparsenError(f"'{out}' holds a cache with another {key} ({old.get(key)!r}, not "
                                   f"{spec.to_json()[key]!r}): pass another --out or the same settings to resume")
        manifest["tokens_asked"] = max(tokens, manifest.get("tokens_asked", 0))
        manifest["complete"] = False
        return manifest
    if out.exists() and any(out.iterdir()):
        raise SparsenError(f"'{out}' exists and is not an activation cache: pass a new or empty --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "spec": spec.to_json(), "tokens_asked": tokens, "shards": [], "complete": False}
    write_json(out / "manifest.json", manifest)
    return manifest


def _write_shard(out: Path, manifest: dict, shard: dict, n: int) -> None:
    i = len(manifest["shards"])
    name = f"shard_{i:05d}.safetensors"
    save_safetensors(out / name, shard)
    pos = shard["positions"]
    manifest["shards"].append({"file": name, "tokens": n, "first_position": int(pos[0]), "last_position": int(pos[-1])})
    write_json(out / "manifest.json", manifest)


def write_cache(out, activations: dict[str, torch.Tensor], model: str = "", fingerprint: str = "",
                shard_tokens: int = 65536) -> dict:
    """A cache folder from activations a user already has ({hook name: [n, d]}, rows aligned across hooks), in the
    same format ``build_cache`` writes (no token ids or positions: they are unknown)."""
    n = {v.shape[0] for v in activations.values()}
    if len(n) != 1 or any(v.dim() != 2 for v in activations.values()):
        raise SparsenError("activations must be 2-D tensors with the same number of rows")
    total = n.pop()
    dtype = {v.dtype for v in activations.values()}
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if len(dtype) != 1 or next(iter(dtype)) not in names:
        raise SparsenError("activations must share one float dtype (float32, float16 or bfloat16)")
    spec = CacheSpec(model, fingerprint, {k: int(v.shape[1]) for k, v in activations.items()},
                     names[next(iter(dtype))], "tensors", "", 0, 0)
    out = Path(out)
    manifest = _start_or_resume(out, spec, total)
    if manifest["shards"]:
        raise SparsenError(f"'{out}' already holds activations: pass a new --out")
    for i in range(0, total, shard_tokens):
        shard = {k: v[i:i + shard_tokens] for k, v in activations.items()}
        shard["positions"] = torch.arange(i, min(total, i + shard_tokens))
        _write_shard(out, manifest, shard, shard["positions"].numel())
    manifest["complete"] = True
    write_json(out / "manifest.json", manifest)
    return manifest


class ActivationCache:
    """A cache folder opened for reading: its manifest, and seeded shuffled batches of one or two hooks."""

    def __init__(self, path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise SparsenError(f"'{path}' is not an activation cache (no manifest.json): make one with `sparsen cache`")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") != FORMAT:
            raise SparsenError(f"'{path}' is not a sparsen activation cache: make one with `sparsen cache`")
        self.spec = self.manifest["spec"]
        self.shards = self.manifest["shards"]
        self.tokens = sum(s["tokens"] for s in self.shards)
        if not self.tokens:
            raise SparsenError(f"activation cache '{path}' is empty: run `sparsen cache` again to fill it")

    def width(self, hook: str) -> int:
        if hook not in self.spec["hooks"]:
            raise SparsenError(f"activation cache '{self.path}' has no hook '{hook}': it holds "
                               f"{', '.join(self.spec['hooks'])}")
        return self.spec["hooks"][hook]

    def check_model(self, lm) -> None:
        if self.spec["fingerprint"] != lm.fingerprint:
            raise SparsenError(f"activation cache '{self.path}' was made from model '{self.spec['model']}' (fingerprint "
                               f"{self.spec['fingerprint']}), not this one: cache this model's activations first")

    def load_shard(self, i: int, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(self.path / self.shards[i]["file"])
        return {k: data[k] for k in keys}

    def batches(self, hook: str, batch: int, seed: int = 0, hook_out: str | None = None, skip: int = 0,
                shuffle_shards: int = 4):
        """Endless (epoch after epoch) float32 batches: ``x`` [batch, d] or ``(x, y)`` with ``hook_out``. Seeded:
        each epoch permutes the shard order, and rows are permuted within groups of ``shuffle_shards`` shards.
        ``skip`` batches are passed over first (a resumed training continues where it stopped)."""
        keys = [hook] + ([hook_out] if hook_out else [])
        for k in keys:
            self.width(k)
        epoch = 0
        carry: dict[str, torch.Tensor] | None = None
        served = 0
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.shards), generator=g).tolist()
            for j in range(0, len(order), shuffle_shards):
                group = [self.load_shard(i, keys) for i in order[j:j + shuffle_shards]]
                data = {k: torch.cat([s[k] for s in group]) for k in keys}
                perm = torch.randperm(data[hook].shape[0], generator=g)
                data = {k: v[perm] for k, v in data.items()}
                if carry is not None:
                    data = {k: torch.cat([carry[k], data[k]]) for k in keys}
                n = data[hook].shape[0]
                full = n // batch
                for b in range(full):
                    if served >= skip:
                        xs = [data[k][b * batch:(b + 1) * batch].float() for k in keys]
                        yield xs[0] if hook_out is None else (xs[0], xs[1])
                    served += 1
                carry = {k: v[full * batch:] for k, v in data.items()}
            epoch += 1
