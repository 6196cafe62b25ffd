"""Typed rules: what a site does to the tensor it sees, and the plan entries that describe them.

``RuleKind`` is shared with the C engine (``engine/kernels/sparsen.h``, ``enum rule_kind``); the engine
checks at load time that the two agree. A plan entry (JSON) names its rule by a string:

- ``{"rule": "dense"}``: no mask;
- ``{"rule": "threshold", "threshold": t}``: keep x_i where |x_i| > t (TEAL);
- ``{"rule": "channel_threshold", "tensor": KEY}``: keep x_i where |x_i| > t_i, t = tensors[KEY] (WINA, CHESS);
- ``{"rule": "topk", "sparsity": s}``: zero each token's round(s * n) smallest |x_i|;
- ``{"rule": "gaussian_topk", "sparsity": s}``: keep |x_i| > rms(x) * Phi^-1((1 + s) / 2);
- ``{"rule": "gate_act", "threshold": t}`` or ``{..., "tensor": KEY}``, on a ``down`` site only (CATS, CHESS):
  MLP channel j is active iff |act(gate(x))_j| > t_j; inactive channels skip up's row j and down's input j
  (the ``up`` site stays dense on its input).

A ``threshold`` or ``channel_threshold`` entry may also carry ``"lowrank": KEY`` (R-Sparse): the dropped inputs
reach the output through tensors[KEY + ".B"] @ tensors[KEY + ".A"] ([out, r] @ [r, in]).
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch

from sparsen.errors import SparsenError


class RuleKind(IntEnum):
    """Rule kinds, numbered as the C engine numbers them."""

    DENSE = 0
    THRESHOLD = 1
    TOPK = 2
    GAUSSIAN_TOPK = 3
    GATE_ACT = 4
    EXPERTS = 5


ENTRY_KINDS = {"dense": RuleKind.DENSE, "threshold": RuleKind.THRESHOLD, "channel_threshold": RuleKind.THRESHOLD,
               "topk": RuleKind.TOPK, "gaussian_topk": RuleKind.GAUSSIAN_TOPK, "gate_act": RuleKind.GATE_ACT,
               "experts": RuleKind.EXPERTS}


def check_sparsity(s: float) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s) or not 0.0 <= s < 1.0:
        raise SparsenError(f"sparsity {s} is outside [0, 1): pass a share of inputs to skip, e.g. --sparsity 0.5")
    return float(s)


class ThresholdRule:
    """Keep x_i where |x_i| > t (t a scalar or a per-channel vector): TEAL-style magnitude sparsity."""

    kind = RuleKind.THRESHOLD

    def __init__(self, threshold: float | torch.Tensor):
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.abs() > self.threshold)


class TopKRule:
    """Keep each token's largest-|x| entries, zeroing the share ``sparsity`` of them (exact per-token top-k)."""

    kind = RuleKind.TOPK

    def __init__(self, sparsity: float):
        self.sparsity = sparsity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = int(round(self.sparsity * x.shape[-1]))
        if k <= 0:
            return x
        drop = x.abs().topk(k, dim=-1, largest=False).indices
        return x.scatter(-1, drop, 0.0)


def normal_quantile(p: float) -> float:
    """Phi^-1(p), the standard normal quantile."""
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def gaussian_z(sparsity: float) -> float:
    """Phi^-1((1 + s) / 2): |x| above z * rms(x) is kept by the statistical top-k at share s."""
    return normal_quantile((1.0 + sparsity) / 2.0)


class GaussianTopKRule:
    """Statistical top-k (Spark Transformer, Gemma 3n): no sort, no calibration.

    Treats a token's entries as zero-mean Gaussian with std = rms(x) and keeps |x| above the
    quantile that leaves the share ``sparsity`` out: t = rms * Phi^-1((1 + s) / 2). Exact only when the
    entries are Gaussian; heavy-tailed inputs come out sparser than asked.
    """

    kind = RuleKind.GAUSSIAN_TOPK

    def __init__(self, sparsity: float):
        self.sparsity = sparsity
        self.z = gaussian_z(sparsity)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparsity <= 0:
            return x
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        return x * (x.abs() > self.z * rms)


class GateActRule:
    """CATS / CHESS: the MLP intermediate's mask comes from the gate activation a = act(gate(x)).

    Channel j is active iff |a_j| > t (t a scalar or a per-channel vector). An inactive channel's
    intermediate act(g_j) * up_j is 0, so a kernel computes gate densely, then only the active
    rows of up, and reads only the active inputs of down. Installed on a block's ``down`` site; it
    acts on gate's *output* (zeroing g_j gives act(0) = 0 for SiLU and GELU alike).
    """

    kind = RuleKind.GATE_ACT

    def __init__(self, threshold: float | torch.Tensor):
        self.threshold = threshold

    def keep(self, a: torch.Tensor) -> torch.Tensor:
        """The active channels, given the activations a = act(g)."""
        return a.abs() > self.threshold


def expert_groups(expert_of: torch.Tensor, n_experts: int) -> list[torch.Tensor]:
    """Each expert's channels [e] (ascending), from each channel's expert ``expert_of`` [I]."""
    return [(expert_of == e).nonzero().squeeze(1) for e in range(n_experts)]


def expert_output_norms(mid: torch.Tensor, w_down: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """||W_down[:, S_e] mid[..., S_e]|| per expert [..., E]: how much of the MLP output each expert writes."""
    return torch.stack([(mid[..., idx] @ w_down[:, idx].T).norm(dim=-1) for idx in groups], -1)


class ExpertRule:
    """MoEfication: the MLP's intermediate channels split into E experts; per token a router picks k of them.

    ``expert_of`` [I] names each channel's expert. With a learned router (``router`` [E, d], ``bias`` [E]) the
    scores are ``router @ x + bias`` on the MLP's (normed) input x, so gate, up and down are all read only for the
    chosen experts' channels; ``router`` None is the oracle: each expert scored by the norm of its exact
    contribution to the MLP output (it needs the dense MLP, so it bounds quality and saves nothing). Installed on a
    block's ``down`` site; it zeroes gate's output on the other channels (act(0) = 0). k = E is the dense MLP.
    """

    kind = RuleKind.EXPERTS

    def __init__(self, k: int, expert_of: torch.Tensor, router: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        self.expert_of = expert_of.long()
        self.n_experts = int(self.expert_of.max()) + 1
        if not 1 <= k <= self.n_experts:
            raise ValueError(f"expert rule with k = {k} of {self.n_experts} experts")
        if router is not None and (router.dim() != 2 or router.shape[0] != self.n_experts
                                   or (bias is not None and bias.shape != (self.n_experts,))):
            raise ValueError(f"router of shape {tuple(router.shape)} for {self.n_experts} experts")
        self.k, self.router, self.bias = int(k), router, bias
        self.groups = expert_groups(self.expert_of, self.n_experts)
        """each expert's channels, ascending"""

    def keep(self, scores: torch.Tensor) -> torch.Tensor:
        """The kept channels [..., I], given expert scores [..., E]: the channels of the k best experts."""
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(self.k, dim=-1).indices, True)
        return chosen[..., self.expert_of]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The learned router's expert scores [..., E] of MLP inputs x [..., d]."""
        s = x @ self.router.to(x.dtype).T
        return s + self.bias.to(x.dtype) if self.bias is not None else s

    def oracle_scores(self, mid: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """The oracle's expert scores [..., E]: each expert's exact output norm given the intermediates mid [..., I]."""
        return expert_output_norms(mid, w_down, self.groups)

    @property
    def added_params(self) -> int:
        """Router weights read per token (charged against the sparsity; none when every expert is read)."""
        return 0 if self.router is None or self.k == self.n_experts else self.router.numel()


class LowRankCompensated:
    """R-Sparse (Zhang et al., ICLR 2025): a rule's dropped inputs still reach the output, through a rank-r
    approximation of the weight: y = W (x * m) + B A (x * (1 - m)), with A [r, in] and B [out, r] from the
    top-r SVD of W. The rule masks as ``base`` does; the sparsifier adds the low-rank term to the linear's
    output. Per token it reads r * (in + out) weights more (charged against the sparsity)."""

    def __init__(self, base, A: torch.Tensor, B: torch.Tensor):
        self.base, self.A, self.B = base, A, B
        self.kind = base.kind

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    @property
    def added_params(self) -> int:
        return self.A.numel() + self.B.numel()


def _entry_threshold(entry: dict, tensors: dict):
    """A site entry's threshold: a number, or a per-channel vector named by ``tensor`` in the plan's tensors."""
    if "tensor" in entry:
        key = entry["tensor"]
        if key not in tensors or tensors[key].dim() != 1:
            raise ValueError(f"site threshold vector '{key}' is missing from the plan's tensors")
        return tensors[key]
    return float(entry["threshold"])


def rule_from_entry(entry: dict, tensors: dict | None = None):
    """The runtime rule of one plan site entry (see the module docstring for the kinds); None for dense."""
    tensors = tensors or {}
    if "lowrank" in entry:
        if entry.get("rule") not in ("threshold", "channel_threshold"):
            raise ValueError(f"a low-rank term goes with a threshold rule, not {entry.get('rule')!r}")
        A, B = tensors.get(f"{entry['lowrank']}.A"), tensors.get(f"{entry['lowrank']}.B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"low-rank factors '{entry['lowrank']}' are missing from the plan's tensors or misshapen")
        return LowRankCompensated(rule_from_entry({k: v for k, v in entry.items() if k != "lowrank"}, tensors), A, B)
    kind = entry.get("rule")
    if kind == "threshold":
        return ThresholdRule(float(entry["threshold"]))
    if kind == "channel_threshold":
        return ThresholdRule(_entry_threshold(entry, tensors))
    if kind == "gate_act":
        return GateActRule(_entry_threshold(entry, tensors))
    if kind == "experts":
        key = entry["experts"]
        expert_of = tensors.get(f"{key}.expert_of")
        if expert_of is None or expert_of.dim() != 1:
            raise ValueError(f"expert assignment '{key}.expert_of' is missing from the plan's tensors")
        if entry.get("router") == "oracle":
            return ExpertRule(int(entry["k"]), expert_of)
        router = tensors.get(f"{key}.router")
        if router is None:
            raise ValueError(f"router '{key}.router' is missing from the plan's tensors")
        return ExpertRule(int(entry["k"]), expert_of, router, tensors.get(f"{key}.bias"))
    if kind == "topk":
        return TopKRule(float(entry["sparsity"]))
    if kind == "gaussian_topk":
        return GaussianTopKRule(float(entry["sparsity"]))
    if kind == "dense":
        return None
    raise SparsenError(f"plan rule '{kind}' is unknown: the plan is corrupt or from a newer sparsen; recalibrate it")
