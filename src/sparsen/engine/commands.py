"""`sparsen generate` and `sparsen bench`: the engine on the command line."""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from sparsen.engine import prompt_ids, stop_ids
from sparsen.engine.peers import LABELS, Peers, PeerSpec, check_systems, machine, no_gc
from sparsen.errors import SparsenError


def _load(args):
    """The model and (optionally) the plan; the engine applies a plan's transform to its own copy of the model."""
    from sparsen import load_model
    from sparsen.core.plan import Plan

    plan = Plan.load(args.plan) if args.plan else None
    lm = load_model(args.model)
    if plan is not None:
        plan.check_model(lm)
    return lm, plan


def resolve_weights(spec: str, lm, plan, quiet: bool = False) -> list[str]:
    """The engine weights a comma-separated ``--weights`` asks for, in order, 'auto' resolved (``choose_weights``:
    the GGUF file's own quantized weights where the plan allows them, saying why not where it does not)."""
    from sparsen.engine import DTYPES, choose_weights

    names = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in names if w not in ("auto", *DTYPES)]
    if bad or not names:
        raise SparsenError(f"--weights {spec!r}: give one or more (comma-separated) of auto, {', '.join(DTYPES)}")
    out = []
    for w in names:
        if w == "auto":
            w, why = choose_weights(lm, plan)
            if why and not quiet:
                print(f"sparsen: {w} weights ({why})", file=sys.stderr)
        if w not in out:
            out.append(w)
    return out


class TextStream:
    """Prints decoded text as tokens arrive (re-decodes the tail so multi-byte characters print whole)."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout looked up now, not at import (a test's captured stream may be gone by then)
        self.tok, self.out, self.ids, self.printed = tokenizer, out or sys.stdout, [], 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def cmd_generate(args) -> None:
    from sparsen.engine import Engine

    lm, plan = _load(args)
    ids = prompt_ids(lm, args.prompt, args.chat)
    weights = resolve_weights(args.weights, lm, plan)
    if len(weights) > 1:
        raise SparsenError("generate runs one engine: give one --weights")
    engine = Engine(lm, plan, dtype=weights[0], threads=args.threads, max_seq=len(ids) + args.max_new_tokens + 1)
    stream = TextStream(lm.tokenizer)
    t0 = time.perf_counter()
    marks = []
    tokens = engine.generate(ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             eos_token_id=stop_ids(lm),
                             on_token=lambda t: (marks.append(time.perf_counter()), stream(t)))
    sys.stdout.write("\n")
    rate = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
    extra = f", achieved sparsity {engine.achieved()['overall']:.3f}" if plan is not None else ""
    print(f"[{len(tokens)} tokens in {time.perf_counter() - t0:.2f} s; decode {rate:.1f} tok/s; {weights[0]} weights, "
          f"{args.threads} threads{extra}]", file=sys.stderr)


# --- bench -------------------------------------------------------------------------------------
def _engine_run(engine, ids, n_new, prefix=None) -> float:
    """Decode tokens/s of the engine: prefill dense (not timed; through torch when given its ``prefix``), then n_new
    tokens (greedy steps: with the engine's ``head_bound``, only the lm_head rows that can be the largest are dotted)."""
    logits = engine.prefill(ids, via="torch", prefix=prefix) if prefix is not None else engine.prefill(ids)
    with no_gc():
        t0 = time.perf_counter()
        engine.greedy_steps(int(np.argmax(logits)), n_new)
        return n_new / (time.perf_counter() - t0)


def _profile(engine, dense_tok_s, floor_tok_s, context) -> dict:
    """Split a dense token's time into the block linears and the rest, from a run that skips every block linear."""
    from sparsen.engine import bytes_per_token, weight_bytes

    dense_ms, rest_ms = 1000 / dense_tok_s, 1000 / floor_tok_s
    block_mb, head_mb = (b / 1e6 for b in weight_bytes(engine, 0.0))
    block_ms = dense_ms - rest_ms
    return {"dense_ms": dense_ms, "rest_ms": rest_ms, "block_linears_ms": block_ms, "block_linear_mb": block_mb,
            "block_linears_gb_s": block_mb / block_ms if block_ms > 0 else None, "lm_head_mb": head_mb,
            "bytes_per_dense_token_mb": bytes_per_token(engine, 0.0, context) / 1e6}


def _linear_times(engine, ids, n_new) -> dict:
    """Per block linear, ms per decoded token in its product and waiting for the other threads after it (means over
    the threads), from one greedy run with the engine's clock on (prefill dense, not counted)."""
    from sparsen.models.adapters import LINEAR_NAMES

    timing = engine.time_linears()
    try:
        tok = int(np.argmax(engine.prefill(ids)))
        timing[:] = 0
        engine.greedy_steps(tok, n_new)
        t = timing.mean(0) * 1e3 / n_new
    finally:
        engine.time_linears(False)
    return {name: {"product_ms": float(t[j, 0]), "wait_ms": float(t[j, 1])} for j, name in enumerate(LINEAR_NAMES)}


def linear_lines(w: str, linears: dict, achieved: float | None) -> list[str]:
    """The block linears' table of ``bench --profile``: ms per token in each product (+ waiting after it)."""
    names = list(linears["dense"])
    rows = [("dense", linears["dense"])] + ([(f"sparse {achieved:.3f}", linears["sparse"])] if linears.get("sparse")
                                             else [])
    out = [f"  {w}, block linears, ms per token in the product + waiting after it (summed over layers):",
           "    " + " " * 13 + "".join(f"{n:>13}" for n in names)]
    for role, t in rows:
        out.append(f"    {role:<13}" + "".join(f" {t[n]['product_ms']:.3f}+{t[n]['wait_ms']:.2f}".rjust(13)
                                            for n in names))
    if linears.get("sparse"):
        out.append(f"    {'sparse/dense':<13}" + "".join(
            f"{linears['sparse'][n]['product_ms'] / linears['dense'][n]['product_ms']:13.2f}" for n in names))
    return out


def profile_line(pr: dict, context: float) -> str:
    """One line saying where a dense token's time goes."""
    # On a tiny model the two runs are within noise and the difference can come out negative: say so.
    rate = (f"{pr['block_linears_gb_s']:.1f} GB/s" if pr["block_linears_gb_s"] is not None
            else "rate not measurable: within timing noise")
    return (f"  where a dense token's {pr['dense_ms']:.1f} ms go: block linears {pr['block_linears_ms']:.1f} ms "
            f"({rate} over {pr['block_linear_mb']:.0f} MB); everything else (lm_head "
            f"{pr['lm_head_mb']:.0f} MB, attention over {context:.0f} positions, norms, masks, sync) "
            f"{pr['rest_ms']:.1f} ms")


def _round_line(args, r: int, runs: dict) -> None:
    if not args.quiet:
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v)
              + " tok/s", file=sys.stderr)


def _peer_lines(res: dict, peers, width: int = 22) -> None:
    """Each requested peer's figure, or the one line saying why there is none."""
    for name in peers.names:
        v, note = res[f"{name}_tok_s"], peers.failed.get(name)
        print(f"  {LABELS[name]:<{width}}" + ("n/a" if v is None else f"{v:8.1f} tok/s") + (f"  ({note})" if note else ""))


def _median_rate(runs: dict, k: str):
    """The median of system k's tok/s over the rounds (None when it never ran)."""
    return statistics.median(runs[k]) if runs.get(k) else None


def _round_ratios(runs: dict, a: str, b: str) -> list[float]:
    """a's rate / b's, round by round (the rounds both ran)."""
    return [x / y for x, y in zip(runs.get(a) or [], runs.get(b) or [])]


def _per_round(runs: dict, a: str, b: str):
    """The median over rounds of a's rate / b's in the same round: the machine drifts between rounds."""
    ratios = _round_ratios(runs, a, b)
    return statistics.median(ratios) if ratios else None


def _per_round_quartiles(runs: dict, a: str, b: str):
    """The first and third quartiles over rounds of a's rate / b's in the same round (how far a round's ratio
    strays from the median on this machine), or None under 4 rounds."""
    ratios = _round_ratios(runs, a, b)
    if len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q[0], q[2]]


def cmd_bench(args) -> None:
    from sparsen.data import corpus_windows
    from sparsen.engine import Engine, bytes_per_token
    from sparsen.io import write_json

    systems = check_systems(args.vs)
    if args.new_tokens < 2:
        raise SparsenError("--new-tokens must be at least 2")
    if args.attn and args.context is None:
        raise SparsenError("--attn times attention methods at a long context: give --context N too")
    lm, plan = _load(args)
    weights = resolve_weights(args.weights, lm, plan, args.quiet)
    if args.context is not None:
        if len(weights) > 1:
            raise SparsenError("--context benches one kind of weights: give one --weights")
        return _bench_context(args, lm, plan, systems, weights[0])
    ids = corpus_windows(lm.tokenizer, "wikitext2-test", args.prompt_tokens, 1, bos=lm.window_bos)[0].tolist()
    max_seq = len(ids) + args.new_tokens + 2
    kv = args.kv_dtype
    skip_all = None
    if args.profile:  # the same engine with every block-linear input skipped: what a token costs besides them
        from sparsen.core.plan import Plan
        from sparsen.core.sites import SiteKind, model_sites

        skip_all = Plan(method="skip-all", target_sparsity=0.0, model=lm.spec, fingerprint=lm.fingerprint,
                        sites={name: {"rule": "threshold", "threshold": float("inf")}
                               for name, site in model_sites(lm.adapter).items() if site.kind is SiteKind.LINEAR_INPUT})
    engines = {}  # weights -> {"dense", "sparse", "floor"}: Engine or None
    for w in weights:
        opts = {"dtype": w, "threads": args.threads, "max_seq": max_seq, "kv_dtype": kv,
                "greedy_head": not args.full_logits}
        engines[w] = {"dense": Engine(lm, None, **opts), "sparse": Engine(lm, plan, **opts) if plan else None,
                      "floor": Engine(lm, skip_all, **opts) if skip_all else None}
    peers = Peers(systems, PeerSpec(lm.spec, str(lm.source), args.threads, max_seq + 8), args.peer_timeout)
    def key(w, role):  # raw_tok_s keys: the first weights keep the names of a one-weights bench
        return f"engine_{role}" if w == weights[0] else f"engine_{role}_{w}"

    runs = {key(w, role): [] for w in weights for role in ("dense", "sparse", "no_block_linears")}
    runs.update({"hf": [], "llamacpp": []})
    try:
        for r in range(args.rounds):  # interleaved: every system once per round
            for w, e in engines.items():
                runs[key(w, "dense")].append(_engine_run(e["dense"], ids, args.new_tokens))
                if e["sparse"] is not None:
                    e["sparse"].reset()
                    runs[key(w, "sparse")].append(_engine_run(e["sparse"], ids, args.new_tokens))
            peers.run_round(runs, ids, args.new_tokens)
            for w, e in engines.items():
                if e["floor"] is not None:
                    runs[key(w, "no_block_linears")].append(_engine_run(e["floor"], ids, args.new_tokens))
            _round_line(args, r, runs)
        linears = {w: {role: _linear_times(e[role], ids, args.new_tokens) for role in ("dense", "sparse")
                       if e[role] is not None} for w, e in engines.items()} if args.profile else {}
    finally:
        peers.close()

    def med(k):
        return _median_rate(runs, k)

    context = len(ids) + args.new_tokens / 2
    llama = med("llamacpp")
    by_weights = {}
    for w, e in engines.items():
        sparse = e["sparse"]
        achieved = sparse.achieved()["overall"] if sparse is not None else 0.0
        d, sp = med(key(w, "dense")), med(key(w, "sparse"))
        by_weights[w] = {
            "engine_dense_tok_s": d, "engine_sparse_tok_s": sp, "achieved_sparsity": achieved,
            "speedup_vs_dense": sp / d if sp else None,
            "greedy_head": e["dense"].head_bound is not None,
            "lm_head_rows_dotted": e["dense"].lm_head_rows_dotted(),
            "bound_speedup": (bytes_per_token(e["dense"], 0.0, context) / bytes_per_token(sparse, achieved, context)
                              if sparse is not None else None),
            "dense_mb_per_token": bytes_per_token(e["dense"], 0.0, context) / 1e6,
            "sparse_mb_per_token": bytes_per_token(sparse, achieved, context) / 1e6 if sparse is not None else None,
            "dense_vs_llamacpp": _per_round(runs, key(w, "dense"), "llamacpp"),
            "sparse_vs_llamacpp": _per_round(runs, key(w, "sparse"), "llamacpp"),
            "dense_vs_llamacpp_quartiles": _per_round_quartiles(runs, key(w, "dense"), "llamacpp"),
            "sparse_vs_llamacpp_quartiles": _per_round_quartiles(runs, key(w, "sparse"), "llamacpp"),
            "sparse_vs_dense_per_round": _per_round(runs, key(w, "sparse"), key(w, "dense")),
            "profile": ({**_profile(e["dense"], d, med(key(w, "no_block_linears")), context), "linears": linears[w]}
                        if e["floor"] is not None else None),
        }
    first = by_weights[weights[0]]
    res = {
        "model": lm.spec, "plan": args.plan, "weights_dtype": weights[0], "weights": weights, "threads": args.threads,
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds,
        **{k: first[k] for k in ("engine_dense_tok_s", "engine_sparse_tok_s", "achieved_sparsity", "speedup_vs_dense",
                                 "bound_speedup", "profile")},
        "hf_tok_s": med("hf"), "llamacpp_tok_s": llama,
        "engine_dense_vs_hf": first["engine_dense_tok_s"] / med("hf") if runs["hf"] else None,
        "engine_best_vs_llamacpp": (max(filter(None, [first["engine_dense_tok_s"], first["engine_sparse_tok_s"]]))
                                    / llama if llama else None),
        "by_weights": by_weights,
        "raw_tok_s": runs,
        "machine": machine(args.threads, peers),
        "notes": {**peers.notes(), "engine": "prompt prefilled dense (not timed), then new_tokens greedy steps timed"
                  + ("" if args.full_logits else "; greedy_head: the steps bound every logit from the int8 lm_head's "
                     "top five bits and dot only the rows that can be the largest (the same tokens)"),
                  "bytes": "per token: block linears (quantized: the active channels' codes, the scales and minima of "
                           "the blocks holding one), lm_head, K and V rows",
                  "ratios": "by_weights' *_vs_llamacpp and sparse_vs_dense_per_round: the median over rounds of the "
                            "two rates of the same round (*_quartiles: the rounds' first and third quartiles of it); "
                            "speedup_vs_dense: the ratio of the medians"},
    }
    write_json(args.out, res)
    print(f"{lm.spec}, {args.threads} threads, prompt {len(ids)} + {args.new_tokens} new tokens, median of "
          f"{args.rounds} interleaved rounds ({res['machine']['cpu']})")
    print(f"  {'system':<26}{'tok/s':>8}{'MB/token':>10}{'vs llama.cpp':>14}  (median over rounds of the same round's ratio"
          + (", its rounds' middle half)" if llama and args.rounds >= 4 else ")"))
    for w, b in by_weights.items():
        rows = [("dense", b["engine_dense_tok_s"], b["dense_mb_per_token"], b["dense_vs_llamacpp"],
                 b["dense_vs_llamacpp_quartiles"])]
        if b["engine_sparse_tok_s"] is not None:
            rows.append((f"sparse {b['achieved_sparsity']:.3f}", b["engine_sparse_tok_s"], b["sparse_mb_per_token"],
                         b["sparse_vs_llamacpp"], b["sparse_vs_llamacpp_quartiles"]))
        for role, v, mb, vs, q in rows:
            print(f"  {'engine ' + w + ' ' + role:<26}{v:8.1f}{mb:10.1f}" + (f"{vs:13.2f}x" if vs else "")
                  + (f"  ({q[0]:.2f}-{q[1]:.2f})" if vs and q else ""))
    _peer_lines(res, peers, width=26)
    for w, b in by_weights.items():
        if b["greedy_head"]:
            print(f"  {w}: greedy steps bound the lm_head's logits and dot {b['lm_head_rows_dotted']:.0f} of its rows "
                  "a step (--full-logits: every row)")
    for w, b in by_weights.items():
        if b["engine_sparse_tok_s"] is not None:
            print(f"  {w}: sparse / dense {b['speedup_vs_dense']:.2f}x (per round {b['sparse_vs_dense_per_round']:.2f}x) at "
                  f"achieved sparsity {b['achieved_sparsity']:.3f} (bytes bound {b['bound_speedup']:.2f}x)")
    if res["engine_dense_vs_hf"]:
        print(f"  engine {weights[0]} dense / HF generate {res['engine_dense_vs_hf']:.2f}x")
    for w, b in by_weights.items():
        if b["profile"]:
            print(f"  {w}:" + profile_line(b["profile"], context)[1:])
            print("\n".join(linear_lines(w, b["profile"]["linears"], b["achieved_sparsity"])))
    print(f"wrote {args.out}")


def _bench_context(args, lm, plan, systems, weights: str) -> None:
    """`bench --context N [--attn LIST]`: decode speed after an N-token WikiText-2 prompt, the engine dense and one
    engine per attention method (on --plan's rules if given), each with its bytes read per token: the bound."""
    from sparsen.data import corpus_windows
    from sparsen.engine import Engine, bytes_per_token
    from sparsen.io import write_json
    from sparsen.methods.attention import attention_plan, parse_attention_spec

    specs = [s.strip() for s in (args.attn or "").split(",") if s.strip()]
    configs = [parse_attention_spec(s) for s in specs]  # a bad spec fails before any model work
    ids = corpus_windows(lm.tokenizer, "wikitext2-test", args.context, 1, bos=lm.window_bos)[0].tolist()
    max_seq = len(ids) + args.new_tokens + 2
    opts = {"dtype": weights, "threads": args.threads, "max_seq": max_seq, "kv_dtype": args.kv_dtype,
            "greedy_head": not args.full_logits}
    engines = {"engine dense": Engine(lm, None, **opts)}
    for spec, cfg in zip(specs, configs):  # calibrated once per spec
        engines[spec] = Engine(lm, attention_plan(lm, cfg, base=plan, progress=not args.quiet), **opts)
    prefixes: dict = {}  # one torch forward per set of weights (a rotation plan's engine has its own)
    for e in engines.values():
        key = id(e._src.model)
        if key not in prefixes:
            mass = any(x.needs_prefix_mass for x in engines.values() if x._src.model is e._src.model)
            prefixes[key] = e.torch_prefix(ids, mass=mass)
    peers = Peers(systems, PeerSpec(lm.spec, str(lm.source), args.threads, max_seq + 8), args.peer_timeout)
    runs: dict[str, list] = {name: [] for name in [*engines, "hf", "llamacpp"]}
    try:
        for r in range(args.rounds):  # interleaved: every system once per round
            for name, e in engines.items():
                runs[name].append(_engine_run(e, ids, args.new_tokens, prefix=prefixes[id(e._src.model)]))
            peers.run_round(runs, ids, args.new_tokens)
            _round_line(args, r, runs)
    finally:
        peers.close()

    def med(k):
        return _median_rate(runs, k)

    context = len(ids) + args.new_tokens / 2  # the mean cached positions of a timed step (dense layers' reads)
    dense = engines["engine dense"]
    dense_bytes = bytes_per_token(dense, 0.0, context)
    methods = []
    for spec in specs:
        e = engines[spec]
        a = e.achieved()  # the last round's sparse steps
        linear = a["overall"] if e.plan.sites else 0.0
        nbytes = bytes_per_token(e, linear, context)
        speedup, bound = med(spec) / med("engine dense"), dense_bytes / nbytes
        per_round = _per_round(runs, spec, "engine dense")
        methods.append({"spec": spec, "tok_s": med(spec), "speedup_vs_dense": speedup, "bytes_per_token": nbytes,
                        "attention_bytes": e.attention_bytes(context), "bound_speedup": bound,
                        "share_of_bound": speedup / bound, "speedup_per_round": per_round,
                        "share_of_bound_per_round": per_round / bound, "linear_sparsity": linear,
                        "density": a["attention"]["density"], "read_density": a["attention"]["read_density"],
                        "attention": a["attention"]})
    res = {
        "model": lm.spec, "plan": args.plan, "weights_dtype": weights, "kv_dtype": args.kv_dtype,
        "threads": args.threads, "context": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "engine_dense_tok_s": med("engine dense"), "dense_bytes_per_token": dense_bytes,
        "dense_attention_bytes": dense.attention_bytes(context), "attention": methods,
        "hf_tok_s": med("hf"), "llamacpp_tok_s": med("llamacpp"), "raw_tok_s": runs,
        "notes": {"engine": "prompt prefilled through the torch model (one forward, its KV cache copied in; not "
                            "timed), then new_tokens greedy steps timed",
                  "ratios": "speedup_vs_dense: the ratio of the medians; speedup_per_round: the median over rounds of "
                            "the two rates of the same round (the machine drifts between rounds); share_of_bound*: "
                            "each over bound_speedup",
                  "bytes": "per token: block linears and lm_head, K and V rows read, and the estimate's reads "
                           "(Quest's page summaries, the label cache (fp32, int8 for the sketch), the oracle's K rows) "
                           "from the engine's own tally; H2O's per-key bookkeeping (held flags, masses) is not counted",
                  **peers.notes()},
        "machine": machine(args.threads, peers),
    }
    write_json(args.out, res)
    print(f"{lm.spec}, {weights} weights, {args.kv_dtype} KV cache, {args.threads} threads, context {len(ids)} + "
          f"{args.new_tokens} new tokens, median of {args.rounds} interleaved rounds ({res['machine']['cpu']})")
    print(f"  {'system':<32}{'tok/s':>8}{'speedup':>9}{'MB/token':>10}{'bytes bound':>13}{'share':>7}"
          f"{'per round':>11}")
    print(f"  {'engine dense':<32}{med('engine dense'):8.1f}{1.0:8.2f}x{dense_bytes / 1e6:10.1f}{1.0:12.2f}x")
    for m in methods:
        print(f"  {m['spec']:<32}{m['tok_s']:8.1f}{m['speedup_vs_dense']:8.2f}x{m['bytes_per_token'] / 1e6:10.1f}"
              f"{m['bound_speedup']:12.2f}x{m['share_of_bound']:7.0%}{m['speedup_per_round']:6.2f}x"
              f"{m['share_of_bound_per_round']:5.0%}  (keys read {m['density']:.3f}, with the estimate "
              f"{m['read_density']:.3f})")
    print("  speedup and share: the ratio of the medians; per round: the median over rounds of the same round's "
          "ratio, and its share of the bound")
    _peer_lines(res, peers)
    print(f"wrote {args.out}")
