"""Sparse dictionaries: SAEs and transcoders on a model's hook points, an activation cache, a CPU trainer, pinned
metrics, and checkpoints in SAELens's and EleutherAI sparsify's formats.

An architecture is one file with a config dataclass and a module; ``ARCHITECTURES`` maps its name to both. A
transcoder is any architecture with ``d_out`` / ``hook_name_out`` set; ``skip=True`` adds the skip connection.
"""

from __future__ import annotations

from sparsen.errors import SparsenError
from sparsen.sae.abstopk import AbsTopKConfig, AbsTopKSAE
from sparsen.sae.base import SAEConfig, SAEOutput, SparseCoder, TrainOutput
from sparsen.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from sparsen.sae.jumprelu import JumpReluConfig, JumpReluSAE
from sparsen.sae.relu import ReluConfig, ReluSAE
from sparsen.sae.topk import TopKConfig, TopKSAE

ARCHITECTURES: dict[str, tuple[type, type]] = {
    "standard": (ReluConfig, ReluSAE),
    "topk": (TopKConfig, TopKSAE),
    "batchtopk": (BatchTopKConfig, BatchTopKSAE),
    "jumprelu": (JumpReluConfig, JumpReluSAE),
    "abstopk": (AbsTopKConfig, AbsTopKSAE),
}
ALIASES = {"relu": "standard"}


def build_sae(cfg: SAEConfig) -> SparseCoder:
    """The module for a config."""
    for config_cls, module_cls in ARCHITECTURES.values():
        if type(cfg) is config_cls:
            return module_cls(cfg)
    raise SparsenError(f"no architecture for config {type(cfg).__name__}")


def sae_config(architecture: str, **fields) -> SAEConfig:
    """The config of architecture ``architecture`` with ``fields`` (unknown fields refused in one line)."""
    name = ALIASES.get(architecture, architecture)
    if name not in ARCHITECTURES:
        raise SparsenError(f"unknown architecture '{architecture}': use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name][0](**fields)


__all__ = ["ARCHITECTURES", "AbsTopKConfig", "AbsTopKSAE", "BatchTopKConfig", "BatchTopKSAE", "JumpReluConfig",
           "JumpReluSAE", "ReluConfig", "ReluSAE", "SAEConfig", "SAEOutput", "SparseCoder", "TopKConfig", "TopKSAE",
           "TrainOutput", "build_sae", "sae_config"]
