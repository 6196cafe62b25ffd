import pytest
import torch

from sparsen import SparsenError, load_model
from sparsen.models import LINEAR_NAMES


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_load_with_all_seven_linears(spec):
    lm = load_model(spec)
    ad = lm.adapter
    assert ad.n_layers == lm.config.num_hidden_layers
    h, inter = lm.config.hidden_size, lm.config.intermediate_size
    kv = lm.config.num_key_value_heads * ad.head_dim
    shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (inter, h), "up": (inter, h),
              "down": (h, inter)}
    for b in ad.blocks:
        assert set(b.linears) == set(LINEAR_NAMES)
        for name, lin in b.linears.items():
            assert tuple(lin.weight.shape) == shapes[name], (spec, name)
    sites = list(ad.linear_sites())
    assert len(sites) == 7 * ad.n_layers and sites[0][0] == "layers.0.q"


def test_tiny_models_are_seeded_and_deterministic():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    for (_, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != load_model("tiny-qwen2").fingerprint


def test_byte_tokenizer_roundtrip(tiny_llama):
    text = "Hello, wörld = 1 @-@ 2\n"
    ids = tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tiny_llama.tokenizer.decode(ids) == text


def test_local_hf_directory_roundtrip(tmp_path, tiny_qwen2):
    tiny_qwen2.model.save_pretrained(tmp_path)
    tiny_qwen2.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(lm.model(x).logits, tiny_qwen2.model(x).logits, atol=1e-5)
    assert lm.config.model_type == "qwen2" and lm.fingerprint == tiny_qwen2.fingerprint


def test_missing_path_error():
    with pytest.raises(SparsenError, match="not found"):
        load_model("/nonexistent/model")


def test_wrong_file_type_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(SparsenError, match=r"\.gguf file or a Hugging Face model directory"):
        load_model(str(f))


def test_corrupt_gguf_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEN_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(SparsenError, match="could not read GGUF"):
        load_model(str(f))
    assert not any((tmp_path / "cache").rglob("model.safetensors"))


def test_directory_without_config_error(tmp_path):
    with pytest.raises(SparsenError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(SparsenError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_loads_as_fp32_llama(smollm2):
    cfg = smollm2.config
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert smollm2.model.lm_head.weight.dtype == torch.float32
    # tied embeddings survive the safetensors cache
    assert smollm2.model.lm_head.weight.data_ptr() == smollm2.model.model.embed_tokens.weight.data_ptr()
    assert sum(m.weight.numel() for _, _, _, m in smollm2.adapter.linear_sites()) == 106_168_320
    ids = smollm2.tokenizer("The capital of France is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = smollm2.model(ids).logits[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([nxt]).strip() == "Paris"


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-qwen2"])
def test_a_cached_forward_equals_the_whole_forward_without_deprecation_warnings(spec):
    import warnings

    from sparsen.models.kv import cache_of, with_cache

    lm = load_model(spec)
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the keyword transformers deprecates is not the one used
        whole = lm.model(ids).logits[0, 16:]
        cache = cache_of(lm.model(ids[:, :16], use_cache=True))
        tail = lm.model(ids[:, 16:], **with_cache(lm.model, cache)).logits[0]
    assert torch.allclose(tail, whole, atol=1e-4)
