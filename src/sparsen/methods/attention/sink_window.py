"""StreamingLLM (Xiao et al., ICLR 2024): the first ``sinks`` positions and the most recent ones, nothing else.

The budget counts the sinks; no scores are read to choose.
"""

from __future__ import annotations

import torch

from sparsen.core.attention import KVSelector, budget_tokens
from sparsen.methods.attention.base import AttentionConfig, AttentionMethod, _whole, attention_config, check


@attention_config
class SinkWindowConfig(AttentionConfig):
    """Attention sinks plus a recent window."""

    method = "sink-window"

    sinks: int = 4
    """first positions always kept (StreamingLLM: 4)"""

    def __post_init__(self):
        super().__post_init__()
        check(_whole(self.sinks, 0), f"sinks {self.sinks!r}: give a whole number, 0 or more")


class SinkWindow(KVSelector):
    def __init__(self, config: SinkWindowConfig):
        self.shared, self.budget, self.sinks = config.shared, config.budget, config.sinks

    def keep(self, q, k, qpos, scores):
        b = budget_tokens(qpos + 1, **self.budget)
        sinks = torch.clamp(b - 1, max=self.sinks)  # a budget of one is the query's own key
        j = torch.arange(k.shape[1])[None, :]
        keep = (j < sinks[:, None]) | (j > (qpos - (b - sinks))[:, None])
        return keep[None, None].expand(k.shape[0], 1, -1, -1)


METHOD = AttentionMethod("sink-window", "StreamingLLM: sink tokens and a recent window", SinkWindowConfig,
                         lambda c, layer, ad, t: SinkWindow(c))
