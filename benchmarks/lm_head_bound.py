"""How many lm_head rows an exact greedy step could leave unread: SmolLM2's Q8_0 lm_head bounded from its codes' high
nibbles alone (a direction for the engine; not what it runs).

    .venv/bin/python benchmarks/lm_head_bound.py [--positions 10]

With q = 16 hi + lo (hi = q >> 4, lo in 0..15) a row's logit sum_b d_b sum_i x_i q_i is at most
U = sum_b d_b (16 sum_i x_i hi_i + 15 sum_{i in b, x_i > 0} x_i), which reads half the codes' bytes. Rows whose U is
below an exact logit cannot be the argmax; the rest need their exact dot. For positions of a WikiText-2 test window
(the final norm's outputs, from the torch model), prints the argmax row's rank by U, how many rows remain with the
true largest logit as the floor, and with the largest exact logit among the k rows of largest U as the floor (what
a step can know before the second pass).
"""

import argparse

import numpy as np
import torch

from sparsen import load_model
from sparsen.data import corpus_windows
from sparsen.models.gguf_weights import read_gguf_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=10)
    a = p.parse_args()
    lm = load_model("smollm2")
    cfg = lm.model.config
    head = read_gguf_weights(lm.source, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads).lm_head
    q, d = head.codes.astype(np.int32), head.scale.astype(np.float32)  # [V, D], [V, D / 32]
    V, D = q.shape
    nb = D // 32
    hi = (q >> 4).reshape(V, nb, 32)
    W = (q.reshape(V, nb, 32) * d[:, :, None]).reshape(V, D)
    ids = corpus_windows(lm.tokenizer, "wikitext2-test", 400, 1, bos=lm.window_bos)[0][None]
    with torch.no_grad():
        h = lm.model(torch.as_tensor(ids), output_hidden_states=True).hidden_states[-1][0].float().numpy()
    print(f"lm_head {V} rows x {D}; per position: argmax's rank by U, rows left with the floor at the true largest "
          "logit, and at the largest exact logit of the top-k rows by U")
    left = []
    for t in np.linspace(20, len(h) - 1, a.positions).astype(int):
        x = h[t]
        logits = W @ x
        xb = x.reshape(nb, 32)
        U = (d * (16 * (hi * xb[None]).sum(2) + 15 * np.clip(xb, 0, None).sum(1)[None])).sum(1)
        order = np.argsort(-U)
        best = logits.max()
        floors = {k: logits[order[:k]].max() for k in (1, 64, 256)}
        left.append([(U >= best).sum()] + [(U >= f).sum() for f in floors.values()])
        print(f"  position {t:4d}: rank {int(np.where(order == logits.argmax())[0][0]):5d}, left {left[-1][0]:6d}; "
              + ", ".join(f"top-{k}: {n:6d}" for k, n in zip(floors, left[-1][1:])))
    m = np.median(np.array(left), 0) / V
    print(f"median share of rows left: {m[0]:.3f} (true floor); " + ", ".join(f"top-{k} {v:.3f}" for k, v in
                                                                             zip((1, 64, 256), m[1:])))


if __name__ == "__main__":
    main()
