"""Gemma 3 270M: sparsen's dense perplexity on WikiText-2 test (ctx 1024, 10 windows, full protocol) beside
Hugging Face's own `labels=` loss on the same windows (each starts with Gemma's BOS), and without the BOS.

    .venv/bin/python benchmarks/gemma3_hf_loss.py
"""

import math

import torch

import sparsen
from sparsen.data import corpus_windows
from sparsen.evaluation import evaluate

lm = sparsen.load_model("gemma3")
ours = evaluate(lm, ctx=1024, n_windows=10, protocol="full", progress=True)
with torch.no_grad():
    wins = corpus_windows(lm.tokenizer, "wikitext2-test", 1024, 10, bos=lm.window_bos)
    hf = sum(float(lm.model(w[None], labels=w[None]).loss) for w in wins) / len(wins)  # 1023 scored tokens each
    plain = corpus_windows(lm.tokenizer, "wikitext2-test", 1024, 10)
    no_bos = sum(float(lm.model(w[None], labels=w[None]).loss) for w in plain) / len(plain)
print(f"gemma3, WikiText-2 test, 10 windows of 1024 (BOS + 1023 tokens), full protocol: sparsen ppl {ours.ppl:.4f}, "
      f"HF labels= loss ppl {math.exp(hf):.4f} ({ours.ppl / math.exp(hf) - 1:+.4%}); without the BOS (1024 corpus "
      f"tokens): HF ppl {math.exp(no_bos):.4f}")
