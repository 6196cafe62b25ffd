"""Time block-sparse prefill attention: dense SDPA, the C kernel dense, and the kernel at each method's pattern.

One attention layer at SmolLM2-135M's shapes (9 query heads on 3 KV heads, head_dim 64), at --n positions. The
q and k are random (--source random: the mass methods then keep nearly every block, as attention is flat) or a real
layer's, captured from a model's prefill of --n tokens of WikiText-2 validation (--source model). v is random (its
values do not change the time). Per method: the density computed, the estimate's share of the dense QK^T FLOPs,
the seconds the estimate takes (torch), and the kernel's seconds; best of --repeats. With --forward, also one
whole-model prefill per method against the dense model (--source model only).

    .venv/bin/python scripts/time_prefill.py --n 8192 --source model --layer 15 \\
        --methods "block-topk@1/8,xattention@tau0.9,vertical-slash@1/8,flexprefill" --out prefill_time.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sparsen.engine.prefill as pf
from sparsen.core.prefill import finish_pattern, pattern_entries
from sparsen.methods.attention import get_attention_method, parse_attention_spec


def real_qk(model: str, n: int, layer: int):
    from sparsen.core.attention import capturing_qk
    from sparsen.data import CALIB_CORPUS, corpus_windows
    from sparsen.models import load_model

    lm = load_model(model)
    ids = corpus_windows(lm.tokenizer, CALIB_CORPUS, n, 1, bos=lm.window_bos)[0]
    seen = {}
    with torch.no_grad(), capturing_qk(lm.adapter, lambda i, q, k: seen.setdefault(i, (q[0].float(), k[0].float()))):
        lm.model(ids[None])
    if layer not in seen:
        raise SystemExit(f"layer {layer} is not a full-attention layer: choose one of {sorted(seen)}")
    return lm, ids, *seen[layer]


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8192, help="positions (default 8192)")
    ap.add_argument("--methods", default="block-topk@1/8,xattention@tau0.9,vertical-slash@1/8,flexprefill")
    ap.add_argument("--source", choices=("random", "model"), default="random")
    ap.add_argument("--model", default="smollm2", help="with --source model (default smollm2)")
    ap.add_argument("--layer", type=int, default=15, help="with --source model: the layer whose q, k are used")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default torch's)")
    ap.add_argument("--forward", action="store_true", help="also time a whole-model prefill per method")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not pf.available():
        raise SystemExit("the C kernels are not built: run `pip install -e .` in the checkout")
    torch.manual_seed(0)
    H, n_kv, d, n = 9, 3, 64, args.n
    lm = None
    if args.source == "model":
        lm, ids, q, k = real_qk(args.model, n, args.layer)
        H, n, d = q.shape
        n_kv = k.shape[0]
    else:
        q, k = torch.randn(H, n, d), torch.randn(n_kv, n, d)
    v = torch.randn(n_kv, n, d)
    scale = d ** -0.5
    res = {"source": args.source, "layer": args.layer if lm else None, **pf.time_prefill_attention(
        q, k, v, repeats=args.repeats, threads=args.threads), "methods": {}}
    print(f"n {n}, {H} heads on {n_kv}, d {d}, {res['threads']} threads: SDPA dense {res['sdpa_dense_s']:.3f} s, "
          f"kernel dense {res['kernel_dense_s']:.3f} s")
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        config = parse_attention_spec(spec)
        sel = get_attention_method(config.method).selector(config, args.layer, None, {})
        est_s, pattern = timed(lambda: finish_pattern(sel.blocks(q.reshape(n_kv, H // n_kv, n, d), k, scale), n,
                                                      sel.block, (n_kv, H)), 1)
        kern_s, _ = timed(lambda: pf.kernel_attention(q, k, v, pattern, scale, args.threads), args.repeats)
        kept, causal = pattern_entries(pattern, n)
        r = {"density": kept / causal, "estimate_share": sel.estimate_flops(n, d, H, n_kv) / (d * H * n * (n + 1)),
             "estimate_s": est_s, "kernel_s": kern_s, "speedup_vs_sdpa": res["sdpa_dense_s"] / kern_s,
             "speedup_vs_kernel_dense": res["kernel_dense_s"] / kern_s}
        res["methods"][config.label()] = r
        print(f"{config.label():40s} density {r['density']:.3f}  estimate {r['estimate_share']:.4f} of QK^T "
              f"({est_s:.3f} s torch)  kernel {kern_s:.3f} s  x{r['speedup_vs_sdpa']:.2f} vs SDPA, "
              f"x{r['speedup_vs_kernel_dense']:.2f} vs kernel dense")
    if args.forward and lm is not None:
        from sparsen.methods.attention import attention_plan

        with torch.no_grad():
            dense_s, _ = timed(lambda: lm.model(ids[None], logits_to_keep=1), 1)
            res["forward"] = {"dense_sdpa_s": dense_s}
            print(f"whole-model prefill of {n} tokens: dense (SDPA) {dense_s:.2f} s")
            for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
                config = parse_attention_spec(spec)
                sp = attention_plan(lm, config, progress=False).build_sparsifier(lm)
                with sp:
                    s, _ = timed(lambda: lm.model(ids[None], logits_to_keep=1), 1)
                att = sp.achieved()["attention"]
                res["forward"][config.label()] = {"seconds": s, "prefill_density": att["prefill_density"],
                                                  "backend": att["prefill_backend"]}
                print(f"  {config.label():40s} {s:.2f} s (density {att['prefill_density']:.3f}, "
                      f"{att['prefill_backend']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
