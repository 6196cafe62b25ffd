"""How many lm_head rows an exact greedy step leaves to dot: SmolLM2's Q8_0 lm_head bounded from its codes' top bits.

    .venv/bin/python benchmarks/lm_head_bound.py [--positions 10] [--bits 4,5]

With q = 2^(8-b) h + l (h = q >> (8 - b), the top b bits; l in 0 .. 2^(8-b) - 1) a row's logit
sum_b d_b sum_i x_i q_i is at most U = sum_b d_b (2^(8-b) sum_i x_i h_i + (2^(8-b) - 1) sum_{i in b, x_i > 0} x_i),
which reads b/8 of the codes' bytes; the engine's greedy steps read b = 5 (kernels/head.c). Rows whose U is below an
exact logit cannot be the argmax; the rest need their exact dot. For positions of a WikiText-2 test window (the
final norm's outputs, from the torch model), prints per b the argmax row's rank by U, how many rows remain with the
true largest logit as the floor, and with the largest exact logit among the k rows of largest U as the floor (what
a step can know before the second pass; the engine probes 16 rows per thread, 32 in all with 2 threads).
"""

import argparse

import numpy as np
import torch

from sparsen import load_model
from sparsen.data import corpus_windows
from sparsen.models.gguf_weights import read_gguf_weights

PROBES = (1, 32, 256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=10)
    p.add_argument("--bits", default="4", help="comma-separated top-bit counts to bound with (default 4)")
    a = p.parse_args()
    lm = load_model("smollm2")
    cfg = lm.model.config
    head = read_gguf_weights(lm.source, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads).lm_head
    q, d = head.codes.astype(np.int32), head.scale.astype(np.float32)  # [V, D], [V, D / 32]
    V, D = q.shape
    nb = D // 32
    W = (q.reshape(V, nb, 32) * d[:, :, None]).reshape(V, D)
    ids = corpus_windows(lm.tokenizer, "wikitext2-test", 400, 1, bos=lm.window_bos)[0][None]
    with torch.no_grad():
        h = lm.model(torch.as_tensor(ids), output_hidden_states=True).hidden_states[-1][0].float().numpy()
    for bits in (int(b) for b in a.bits.split(",")):
        shift = 8 - bits
        top = (q >> shift).reshape(V, nb, 32)
        print(f"{bits} bits ({bits / 8:.3f} of the codes' bytes); per position: argmax's rank by U, rows left with "
              "the floor at the true largest logit, and at the largest exact logit of the top-k rows by U")
        left = []
        for t in np.linspace(20, len(h) - 1, a.positions).astype(int):
            x = h[t]
            logits = W @ x
            xb = x.reshape(nb, 32)
            U = (d * ((1 << shift) * (top * xb[None]).sum(2) + ((1 << shift) - 1) * np.clip(xb, 0, None).sum(1)[None])).sum(1)
            order = np.argsort(-U)
            floors = {k: logits[order[:k]].max() for k in PROBES}
            left.append([(U >= logits.max()).sum()] + [(U >= f).sum() for f in floors.values()])
            print(f"  position {t:4d}: rank {int(np.where(order == logits.argmax())[0][0]):5d}, left {left[-1][0]:6d}; "
                  + ", ".join(f"top-{k}: {n:6d}" for k, n in zip(floors, left[-1][1:])))
        m, mean = np.median(np.array(left), 0) / V, np.mean(np.array(left), 0) / V
        print(f"  share of rows left, median (mean): {m[0]:.4f} ({mean[0]:.4f}) with the true floor; "
              + ", ".join(f"top-{k} {v:.4f} ({w:.4f})" for k, v, w in zip(PROBES, m[1:], mean[1:])))


if __name__ == "__main__":
    main()
