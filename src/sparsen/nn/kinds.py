"""The MLP kinds by name: config class and module, one line each."""

from __future__ import annotations

from torch import nn

from sparsen.nn.mlp import (
    BlockFFN,
    BlockFFNConfig,
    DenseMLP,
    MLPConfig,
    PredictorFFN,
    PredictorFFNConfig,
    StatTopKMLP,
    StatTopKMLPConfig,
    TopKMLP,
    TopKMLPConfig,
)
from sparsen.nn.moe import MoE, MoEConfig

MLP_KINDS = {c.kind: (c, m) for c, m in ((MLPConfig, DenseMLP), (TopKMLPConfig, TopKMLP), (StatTopKMLPConfig, StatTopKMLP),
                                         (PredictorFFNConfig, PredictorFFN), (BlockFFNConfig, BlockFFN), (MoEConfig, MoE))}


def build_mlp(cfg) -> nn.Module:
    """The module a config describes."""
    return MLP_KINDS[cfg.kind][1](cfg)
