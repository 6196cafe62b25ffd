"""The quality harness: perplexity over non-overlapping windows, and KL / top-1 agreement to dense.

Protocols
- ``full``: every position of a window is computed by the model under test; predictions at
  positions 0..ctx-2 (of tokens 1..ctx-1) are scored. Matches Hugging Face's ``labels=`` loss.
- ``decode``: positions < ctx//2 are computed dense (the prompt, as a dense prefill would) and the
  rest sparse; predictions made *at* sparse positions (P..ctx-2, of tokens P+1..ctx-1) are scored.
  This is exactly a dense prompt of P tokens followed by sparse generation, teacher-forced.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.core.divergence import kl_sum
from sparsen.data import EVAL_CORPUS, corpus_windows
from sparsen.models.kv import cache_of, with_cache

PROTOCOLS = ("full", "decode")


@dataclass
class EvalResult:
    model: str
    corpus: str
    ctx: int
    windows: int
    protocol: str
    tokens_scored: int
    nll: float
    ppl: float
    kl: float | None = None
    top1_agree: float | None = None
    dense_nll: float | None = None
    dense_ppl: float | None = None
    sparsity: dict | None = None
    plan: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


def scored_range(ctx: int, protocol: str) -> tuple[int, int]:
    """Positions whose next-token predictions are scored: [start, stop)."""
    if protocol == "full":
        return 0, ctx - 1
    if protocol == "decode":
        return ctx // 2, ctx - 1
    raise ValueError(f"unknown protocol {protocol!r}: use one of {PROTOCOLS}")


def dense_prefix(ctx: int, protocol: str) -> int:
    return scored_range(ctx, protocol)[0]


@torch.no_grad()
def window_logprobs(model, window: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """log-softmax of the model's logits at positions [start, stop) of one window, fp32 [n, vocab] (the unembedding
    runs on those positions only)."""
    logits = model(window[None], logits_to_keep=window.shape[-1] - start).logits[0, : stop - start].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def evaluate(lm, corpus: str = EVAL_CORPUS, ctx: int = 1024, n_windows: int | None = None, protocol: str = "full",
             sparsifier=None, progress: bool = True, plan_name: str | None = None) -> EvalResult:
    """Perplexity of ``lm`` (optionally under ``sparsifier``) on the corpus, and KL/top-1 vs dense if sparse."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    wins = corpus_windows(lm.tokenizer, corpus, ctx, n_windows, bos=lm.window_bos)
    start, stop = scored_range(ctx, protocol)
    nll_sum = dense_nll_sum = kl_total = 0.0
    agree = scored = 0
    t0 = time.perf_counter()
    if sparsifier is not None:
        prev_prefix = sparsifier.dense_prefix
        sparsifier.dense_prefix = start
        sparsifier.reset_stats()
        sparsifier.scales.clear()  # a held plan measures each window's own prompt (none under 'full')
    try:
        with sparsifier if sparsifier is not None else contextlib.nullcontext():  # restores its attached state
            for w in tqdm(wins, desc=f"eval {protocol}", unit="win", disable=not progress, leave=False):
                targets = w[start + 1: stop + 1]
                logp = window_logprobs(lm.model, w, start, stop)
                nll_sum += -logp.gather(1, targets[:, None]).double().sum().item()
                scored += targets.numel()
                if sparsifier is not None:
                    with sparsifier.disabled():
                        logp_dense = window_logprobs(lm.model, w, start, stop)
                    dense_nll_sum += -logp_dense.gather(1, targets[:, None]).double().sum().item()
                    kl_total += kl_sum(logp_dense, logp).double().item()
                    agree += int((logp_dense.argmax(-1) == logp.argmax(-1)).sum())
    finally:
        if sparsifier is not None:
            sparsifier.dense_prefix = prev_prefix
    nll = nll_sum / scored
    res = EvalResult(model=lm.spec, corpus=corpus, ctx=ctx, windows=len(wins), protocol=protocol, tokens_scored=scored,
                     nll=nll, ppl=math.exp(nll), plan=plan_name)
    if sparsifier is not None:
        res.kl = kl_total / scored
        res.top1_agree = agree / scored
        res.dense_nll = dense_nll_sum / scored
        res.dense_ppl = math.exp(res.dense_nll)
        res.sparsity = sparsifier.achieved()
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class _Tally:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    scored: int = 0


@torch.no_grad()
def evaluate_many(lm, configs: dict, corpus: str = EVAL_CORPUS, ctx: int = 1024, n_windows: int | None = None,
                  protocol: str = "full", progress: bool = True, prefix_observer=None,
                  before_config=None) -> tuple[EvalResult, dict[str, EvalResult]]:
    """Evaluate many sparse configurations in one sweep over the windows; same numbers as ``evaluate``.

    ``configs[name] = (model, sparsifier)``: ``model`` is ``lm.model`` or a transformed copy of it
    (a folded rotation computes the same function). Window-major, so the dense reference of each
    window is computed once for all configurations; under ``decode`` the dense prompt's KV cache is
    computed once per distinct model and every configuration runs only the scored half on a copy of it
    (exactly what the position-dependent masks of ``evaluate`` compute). Returns (dense, {name: result}).
    ``prefix_observer()``: None or a context manager entered around the dense prompt's pass of ``lm.model`` (under
    decode); ``before_config(sparsifier, observed)`` runs before each configuration's pass with what it yielded
    (attention selectors start a new sequence there and take the prompt's attention mass).
    """
    import copy

    wins = corpus_windows(lm.tokenizer, corpus, ctx, n_windows, bos=lm.window_bos)
    start, stop = scored_range(ctx, protocol)
    dense_tally = _Tally()
    tallies = {name: _Tally() for name in configs}
    for _, sp in configs.values():
        sp.dense_prefix = 0  # under decode only the sparse half runs through the hooks
        sp.reset_stats()
    t0 = time.perf_counter()
    models = {id(m): m for m, _ in configs.values()} | {id(lm.model): lm.model}
    for w in tqdm(wins, desc=f"frontier {protocol}", unit="win", disable=not progress, leave=False):
        targets = w[start + 1: stop + 1]
        observed = None
        if protocol == "full":
            prefix_cache = {}
            for _, sp in configs.values():
                sp.scales.clear()
        else:  # the dense prompt's KV, once per distinct (possibly rotated) model; held plans measure it meanwhile
            prefix_cache = {}
            for key, m in models.items():
                with contextlib.ExitStack() as stack:
                    for model, sp in configs.values():
                        if id(model) == key and sp.holds:
                            stack.enter_context(sp.observing())
                    if prefix_observer is not None and key == id(lm.model):
                        cm = prefix_observer()
                        observed = stack.enter_context(cm) if cm is not None else None
                    prefix_cache[key] = cache_of(m(w[None, :start], use_cache=True))

        def logprobs(model):
            if protocol == "full":
                logits = model(w[None]).logits[0, start:stop]
            else:
                cache = copy.deepcopy(prefix_cache[id(model)])
                logits = model(w[None, start:], **with_cache(model, cache)).logits[0, : stop - start]
            return F.log_softmax(logits.float(), dim=-1)

        dense = logprobs(lm.model)
        dense_tally.nll += -dense.gather(1, targets[:, None]).double().sum().item()
        dense_tally.scored += targets.numel()
        for name, (model, sp) in configs.items():
            if before_config is not None:
                before_config(sp, observed)
            with sp:
                logp = logprobs(model)
            t = tallies[name]
            t.nll += -logp.gather(1, targets[:, None]).double().sum().item()
            t.kl += kl_sum(dense, logp).double().item()
            t.agree += int((dense.argmax(-1) == logp.argmax(-1)).sum())
            t.scored += targets.numel()
    seconds = time.perf_counter() - t0

    def result(t: _Tally, sp=None, name=None) -> EvalResult:
        nll = t.nll / t.scored
        res = EvalResult(model=lm.spec, corpus=corpus, ctx=ctx, windows=len(wins), protocol=protocol,
                         tokens_scored=t.scored, nll=nll, ppl=math.exp(nll), plan=name, seconds=seconds)
        if sp is not None:
            res.kl, res.top1_agree = t.kl / t.scored, t.agree / t.scored
            res.dense_nll = dense_tally.nll / dense_tally.scored
            res.dense_ppl = math.exp(res.dense_nll)
            res.sparsity = sp.achieved()
        return res

    return result(dense_tally), {name: result(tallies[name], sp, name) for name, (_, sp) in configs.items()}
