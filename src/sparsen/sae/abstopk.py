"""AbsTopK: keep each token's k pre-activations of largest magnitude, sign kept, no ReLU (SAELens's ``abstopk``).

A latent can then stand for a direction and its opposite; training is TopK's, AuxK included.
"""

from __future__ import annotations

from typing import ClassVar

from sparsen.core.config import strict_config
from sparsen.sae.topk import TopKConfig, TopKSAE


@strict_config
class AbsTopKConfig(TopKConfig):
    architecture: ClassVar[str] = "abstopk"


class AbsTopKSAE(TopKSAE):
    config_class = AbsTopKConfig
    signed = True
