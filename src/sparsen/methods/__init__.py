"""Training-free sparsification methods: each is one file with a config dataclass and a ``calibrate`` function,
registered in ``registry.py``; ``calibrate(lm, config)`` returns a ``core.Plan``."""

from sparsen.methods import attention, tuning  # noqa: F401  (register key selection and tuned weights with the core)
from sparsen.methods.cats import CatsConfig
from sparsen.methods.chess import ChessConfig
from sparsen.methods.config import ALLOCATIONS, AllocatedConfig, MethodConfig, RotationConfig
from sparsen.methods.moefy import MoefyConfig
from sparsen.methods.registry import calibrate, config_for, get_method, method_names
from sparsen.methods.rotation import RotateConfig, RotateTopKConfig, RotateWinaConfig
from sparsen.methods.rsparse import RSparseConfig
from sparsen.methods.stat_topk import StatTopKConfig
from sparsen.methods.teal import TealConfig
from sparsen.methods.topk import TopKConfig
from sparsen.methods.wina import WinaConfig

__all__ = ["ALLOCATIONS", "AllocatedConfig", "MethodConfig", "RotationConfig", "CatsConfig", "ChessConfig", "MoefyConfig",
           "RotateConfig",
           "RotateTopKConfig", "RotateWinaConfig", "RSparseConfig", "StatTopKConfig", "TealConfig", "TopKConfig",
           "WinaConfig", "calibrate", "config_for", "get_method", "method_names"]
