"""Time block-sparse prefill attention: dense SDPA, the C kernel dense, and the kernel at each method's pattern.

One attention layer at SmolLM2-135M's shapes (9 query heads on 3 KV heads, head_dim 64), at --n positions. The
q and k are random (--source random: the mass methods then keep nearly every block, as attention is flat) or a real
layer's, captured from a model's prefill of --n tokens of WikiText-2 validation (--source model); --layer all
takes every attention layer's and sums the times over them (the model's whole prefill attention). v is random (its
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


def real_qk(model: str, n: int, layer: int | None):
    """The model, the token ids and {layer: (q [H, n, d], k [n_kv, n, d])} for ``layer`` (None: every layer)."""
    from sparsen.core.attention import capturing_qk
    from sparsen.data import CALIB_CORPUS, corpus_windows
    from sparsen.models import load_model

    lm = load_model(model)
    ids = corpus_windows(lm.tokenizer, CALIB_CORPUS, n, 1, bos=lm.window_bos)[0]
    seen = {}
    with torch.no_grad(), capturing_qk(lm.adapter, lambda i, q, k: seen.setdefault(i, (q[0].float(), k[0].float()))
                                       if layer is None or i == layer else None):
        lm.model(ids[None])
    if layer is not None and layer not in seen:
        raise SystemExit(f"layer {layer} is not a full-attention layer: choose one of {sorted(seen)}")
    return lm, ids, seen


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
    ap.add_argument("--layer", default="15", help="with --source model: the layer whose q, k are used, or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default torch's)")
    ap.add_argument("--forward", action="store_true", help="also time a whole-model prefill per method")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if not pf.available():
        raise SystemExit("the C kernels are not built: run `pip install -e .` in the checkout")
    if args.layer != "all" and not args.layer.isdigit():
        raise SystemExit(f"--layer {args.layer!r}: give a layer number or 'all'")
    torch.manual_seed(0)
    specs = [m.strip() for m in args.methods.split(",") if m.strip()]
    lm = None
    if args.source == "model":
        lm, ids, layers = real_qk(args.model, args.n, None if args.layer == "all" else int(args.layer))
    else:
        layers = {int(args.layer) if args.layer.isdigit() else 0: (torch.randn(9, args.n, 64), torch.randn(3, args.n, 64))}
    res = {"source": args.source, "layer": args.layer, "layers": sorted(layers), "methods": {}}
    methods = {}
    for i, (q, k) in sorted(layers.items()):  # times and entries summed over the layers
        H, n, d = q.shape
        n_kv = k.shape[0]
        v = torch.randn(n_kv, n, d)
        scale = d ** -0.5
        t = pf.time_prefill_attention(q, k, v, repeats=args.repeats, threads=args.threads)
        for key in ("n", "heads", "kv_heads", "head_dim", "threads"):
            res[key] = t[key]
        for key in ("sdpa_dense_s", "kernel_dense_s"):
            res[key] = res.get(key, 0.0) + t[key]
        res["dense_qk_flops"] = res.get("dense_qk_flops", 0.0) + d * H * n * (n + 1)
        for spec in specs:
            config = parse_attention_spec(spec)
            sel = get_attention_method(config.method).selector(config, i, None, {})
            est_s, pattern = timed(lambda: finish_pattern(sel.blocks(q.reshape(n_kv, H // n_kv, n, d), k, scale), n,
                                                          sel.block, (n_kv, H)), 1)
            kern_s, _ = timed(lambda: pf.kernel_attention(q, k, v, pattern, scale, args.threads), args.repeats)
            kept, causal = pattern_entries(pattern, n)
            m = methods.setdefault(config.label(), {"kept": 0, "causal": 0, "estimate_flops": 0.0, "estimate_s": 0.0,
                                                    "kernel_s": 0.0})
            m["kept"] += kept
            m["causal"] += causal
            m["estimate_flops"] += sel.estimate_flops(n, d, H, n_kv)
            m["estimate_s"] += est_s
            m["kernel_s"] += kern_s
    print(f"n {res['n']}, {res['heads']} heads on {res['kv_heads']}, d {res['head_dim']}, {res['threads']} threads, "
          f"{len(layers)} layer(s): SDPA dense {res['sdpa_dense_s']:.3f} s, kernel dense {res['kernel_dense_s']:.3f} s")
    for label, m in methods.items():
        r = {"density": m["kept"] / m["causal"], "estimate_share": m["estimate_flops"] / res["dense_qk_flops"],
             "estimate_s": m["estimate_s"], "kernel_s": m["kernel_s"],
             "speedup_vs_sdpa": res["sdpa_dense_s"] / m["kernel_s"],
             "speedup_vs_kernel_dense": res["kernel_dense_s"] / m["kernel_s"],
             "speedup_vs_sdpa_with_estimate": res["sdpa_dense_s"] / (m["kernel_s"] + m["estimate_s"])}
        res["methods"][label] = r
        print(f"{label:40s} density {r['density']:.3f}  estimate {r['estimate_share']:.4f} of QK^T "
              f"({r['estimate_s']:.3f} s torch)  kernel {r['kernel_s']:.3f} s  x{r['speedup_vs_sdpa']:.2f} vs SDPA "
              f"(x{r['speedup_vs_sdpa_with_estimate']:.2f} with the estimate), "
              f"x{r['speedup_vs_kernel_dense']:.2f} vs kernel dense")
    if args.forward and lm is not None:
        from sparsen.methods.attention import attention_plan

        with torch.no_grad():
            dense_s, _ = timed(lambda: lm.model(ids[None], logits_to_keep=1), 1)
            res["forward"] = {"dense_sdpa_s": dense_s}
            print(f"whole-model prefill of {n} tokens: dense (SDPA) {dense_s:.2f} s")
            for spec in specs:
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
