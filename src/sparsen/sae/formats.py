"""Checkpoints both ways: SAELens (``cfg.json`` + ``sae_weights.safetensors``) and EleutherAI sparsify (``cfg.json`` +
``sae.safetensors``). ``load_sae`` reads either (and sparsen's own, which is SAELens's layout with a ``sparsen``
block in cfg.json); ``save_saelens`` / ``save_sparsify`` write them so the other library loads them.

SAELens architectures and ours: standard, topk, abstopk, jumprelu map one to one; a BatchTopK is saved as a
jumprelu whose thresholds all equal the learned one (as SAELens does); transcoder / skip_transcoder are ReLU,
jumprelu_transcoder / jumprelu_skip_transcoder JumpReLU. sparsify's SparseCoder is a TopK (ReLU, then top-k) that
subtracts b_dec from its input unless it transcodes; its encoder is an nn.Linear, so W_enc is stored transposed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from sparsen.errors import SparsenError
from sparsen.io import save_safetensors, write_json

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
_SAELENS_TRANSCODERS = {"transcoder": ("standard", False), "skip_transcoder": ("standard", True),
                        "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
_NORMALIZE_OK = ("none", "constant_norm_rescale", "layer_norm")


def config_json(cfg) -> dict:
    """A config as plain JSON (its architecture included)."""
    return {"architecture": cfg.architecture, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}}


def config_from_json(d: dict):
    from sparsen.sae import sae_config

    d = dict(d)
    return sae_config(d.pop("architecture"), **d)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(path).items()}


def load_sae(path, d_in: int | None = None):
    """A dictionary from a folder written by sparsen, SAELens or sparsify (sparsify: the hookpoint's folder).
    ``d_in``: the width of the hook it will read; a checkpoint of another width is refused."""
    from sparsen.sae import build_sae

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise SparsenError(f"'{path}' has no cfg.json: pass a folder saved by sparsen, SAELens or sparsify")
    raw = json.loads((path / "cfg.json").read_text())
    if (path / SAELENS_WEIGHTS).exists():
        cfg, tensors = _from_saelens(raw, _load_tensors(path / SAELENS_WEIGHTS))
    elif (path / SPARSIFY_WEIGHTS).exists():
        cfg, tensors = _from_sparsify(raw, _load_tensors(path / SPARSIFY_WEIGHTS))
    else:
        raise SparsenError(f"'{path}' has neither {SAELENS_WEIGHTS} nor {SPARSIFY_WEIGHTS}: pass a dictionary's folder")
    if d_in is not None and cfg.d_in != d_in:
        raise SparsenError(f"the dictionary in '{path}' reads {cfg.d_in}-wide activations but the hook gives {d_in}: "
                           "pass a dictionary trained on this hook")
    sae = build_sae(cfg)
    missing = [n for n, _ in sae.named_parameters() if n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")
               and n not in tensors]
    if missing:
        raise SparsenError(f"'{path}' lacks {', '.join(missing)}: the checkpoint is incomplete")
    with torch.no_grad():
        for n, p in sae.named_parameters():
            if n in tensors:
                if tuple(tensors[n].shape) != tuple(p.shape):
                    raise SparsenError(f"'{path}': {n} is {tuple(tensors[n].shape)}, its config says {tuple(p.shape)}")
                p.copy_(tensors[n])
    sae.load_extra_state_tensors(tensors)
    return sae


def _from_saelens(raw: dict, t: dict):
    if "sparsen" in raw:  # our own: the whole config, exactly
        return config_from_json(raw["sparsen"]), t
    arch = raw.get("architecture", "standard")
    meta = raw.get("metadata", {}) or {}
    norm = raw.get("normalize_activations", "none") or "none"
    if norm not in _NORMALIZE_OK:
        raise SparsenError(f"SAELens normalize_activations '{norm}' is not supported: use a checkpoint with "
                           f"{', '.join(_NORMALIZE_OK)}")
    if (raw.get("reshape_activations") or "none") != "none" and raw.get("reshape_activations") != "hook_z":
        raise SparsenError(f"SAELens reshape_activations '{raw['reshape_activations']}' is not supported")
    common = {"d_in": int(raw["d_in"]), "d_sae": int(raw["d_sae"]),
              "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", False)),
              "hook_name": meta.get("hook_name", raw.get("hook_name", "")) or "",
              "model": meta.get("model_name", raw.get("model_name", "")) or "",
              "normalize_activations": norm}
    from sparsen.sae import sae_config

    if arch in _SAELENS_TRANSCODERS:
        base, skip = _SAELENS_TRANSCODERS[arch]
        common.update(d_out=int(raw["d_out"]), skip=skip, hook_name_out=meta.get("hook_name_out", "") or "")
        return sae_config(base, **common), t
    if arch in ("topk", "abstopk"):
        return sae_config(arch, k=int(raw["k"]), rescale_acts_by_decoder_norm=bool(
            raw.get("rescale_acts_by_decoder_norm", False)), **common), t
    if arch in ("standard", "jumprelu"):
        return sae_config(arch, **common), t
    raise SparsenError(f"SAELens architecture '{arch}' is not supported: sparsen reads standard, topk, abstopk, "
                       f"jumprelu and the four transcoders")


def _from_sparsify(raw: dict, t: dict):
    if raw.get("activation", "topk") != "topk":
        raise SparsenError(f"sparsify activation '{raw['activation']}' is not supported: sparsen reads topk")
    if raw.get("multi_topk"):
        raise SparsenError("sparsify multi_topk checkpoints are not supported")
    d_in = int(raw["d_in"])
    d_sae = int(t["encoder.weight"].shape[0])
    d_out = int(t["W_dec"].shape[1])
    transcode = bool(raw.get("transcode", False))
    cfg_fields = {"d_in": d_in, "d_sae": d_sae, "k": int(raw["k"]), "skip": "W_skip" in t,
                  "apply_b_dec_to_input": not transcode, "d_out": d_out if transcode else None}
    from sparsen.sae import sae_config

    tensors = {"W_enc": t["encoder.weight"].T.contiguous(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    return sae_config("topk", **cfg_fields), tensors


def _weights(sae) -> dict[str, torch.Tensor]:
    out = {n: p.detach().contiguous() for n, p in sae.named_parameters()
           if n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")}
    out.update(sae.extra_state_tensors())
    return out


def save_saelens(sae, out) -> Path:
    """cfg.json + sae_weights.safetensors, loadable by SAELens (``SAE.load_from_disk``) where the architecture is
    one of its own, and by ``load_sae`` exactly (a ``sparsen`` block keeps the whole config)."""
    cfg = sae.cfg
    arch = cfg.architecture
    extra: dict = {}
    if arch == "batchtopk":
        arch = "jumprelu"
    if cfg.is_transcoder:
        if arch not in ("standard", "jumprelu"):
            arch = f"sparsen_{arch}_transcoder"  # no SAELens class: SAELens refuses it by name, sparsen reads it
        else:
            arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
            if cfg.skip:
                arch = arch.replace("transcoder", "skip_transcoder")
        extra["d_out"] = cfg.out_width
    elif cfg.skip:
        arch = f"sparsen_{arch}_skip"
    if cfg.architecture in ("topk", "abstopk"):
        extra["k"] = cfg.k
        extra["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
    raw = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": cfg.normalize_activations,
           "reshape_activations": "none",
           "metadata": {"model_name": cfg.model, "hook_name": cfg.hook_name, "hook_name_out": cfg.hook_name_out,
                        "model_fingerprint": cfg.model_fingerprint},
           **extra, "architecture": arch, "sparsen": config_json(cfg)}
    out = Path(out)
    save_safetensors(out / SAELENS_WEIGHTS, _weights(sae))
    write_json(out / "cfg.json", raw)
    return out


def save_sparsify(sae, out) -> Path:
    """cfg.json + sae.safetensors in sparsify's layout (a TopK only; an SAE must subtract b_dec from its input and a
    transcoder must not, as sparsify's encoder does)."""
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise SparsenError(f"sparsify holds TopK dictionaries only, not '{cfg.architecture}': save it for SAELens")
    if cfg.normalize_activations != "none" or getattr(cfg, "rescale_acts_by_decoder_norm", False):
        raise SparsenError("sparsify has no input normalisation or decoder-norm rescaling: save it for SAELens")
    if cfg.apply_b_dec_to_input == cfg.is_transcoder:
        raise SparsenError("sparsify's encoder subtracts b_dec from an SAE's input and not from a transcoder's: this "
                           "dictionary differs, save it for SAELens")
    raw = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
           "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
           "transcode": cfg.is_transcoder, "d_in": cfg.d_in}
    t = {"encoder.weight": sae.W_enc.detach().T.contiguous(), "encoder.bias": sae.b_enc.detach(),
         "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    if sae.W_skip is not None:
        t["W_skip"] = sae.W_skip.detach()
    out = Path(out)
    save_safetensors(out / SPARSIFY_WEIGHTS, t)
    write_json(out / "cfg.json", raw)
    return out
