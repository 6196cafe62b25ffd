"""Seeded, random-initialised small models for tests: same architectures, seconds to run.

They use a byte-level tokenizer (256 byte tokens plus <s>/</s>), built locally, so nothing is
downloaded and any text tokenizes.
"""

from __future__ import annotations

import torch

TINY_SPECS = ("tiny-llama", "tiny-qwen2")
TINY_SEED = 1234


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2 style byte-to-unicode map: every byte is one printable symbol, so BPE with no merges
    # is exactly a byte tokenizer.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_syms = sorted(alphabet, key=lambda s: ord(s))
    vocab = {s: i for i, s in enumerate(byte_syms)}
    vocab["<s>"] = len(vocab)
    vocab["</s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_model(spec: str):
    """Return (model, tokenizer) for a tiny spec; weights depend only on the spec and TINY_SEED."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(TINY_SEED)
    if spec == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif spec == "tiny-qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(spec)
    # A random init with std 0.02 gives nearly uniform logits; a larger scale gives the tiny model
    # peaked, input-dependent predictions so that sparsity visibly changes its outputs in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.eval()
    return model, byte_tokenizer()
