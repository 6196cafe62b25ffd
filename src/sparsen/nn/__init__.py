"""Trainable sparse modules (torch): top-k and statistical top-k MLPs, Spark's predictor FFN, BlockFFN, a top-k
mixture of experts, sparse attention. Each has a config dataclass; ``build_mlp`` makes the module a config describes."""

from sparsen.nn.attention import PATTERNS, Attention, AttentionConfig
from sparsen.nn.kinds import MLP_KINDS, build_mlp
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
    chunk_sparsity,
)
from sparsen.nn.moe import MoE, MoEConfig, load_balancing_loss, z_loss
from sparsen.nn.topk import exact_topk, statistical_threshold, statistical_topk, topk_mask

__all__ = ["PATTERNS", "Attention", "AttentionConfig", "MLP_KINDS", "BlockFFN", "BlockFFNConfig", "DenseMLP", "MLPConfig",
           "PredictorFFN", "PredictorFFNConfig", "StatTopKMLP", "StatTopKMLPConfig", "TopKMLP", "TopKMLPConfig", "build_mlp",
           "chunk_sparsity", "MoE", "MoEConfig", "load_balancing_loss", "z_loss", "exact_topk", "statistical_threshold",
           "statistical_topk", "topk_mask"]
