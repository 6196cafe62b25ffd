"""MoEfication (Zhang et al., Findings of ACL 2022): a dense model's MLPs turned into mixtures of experts.

Each layer's I intermediate channels are split into E experts of I / E channels (balanced spherical k-means on
the channels' activation patterns over calibration tokens, so channels that fire together share an expert; or on
gate's weight rows; or contiguous, the baseline). A linear router per layer, trained on the calibration tokens'
MLP inputs, scores the experts by the share of the MLP output each contributes (its output's norm); at run time
each token reads gate, up and down only for its k best experts. Nothing is retrained: k = E is the dense model.
The routers' weights (E x d per layer) are charged against the sparsity.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsen.core.rules import expert_groups, expert_output_norms
from sparsen.errors import SparsenError
from sparsen.methods.config import ConfigValueError, MethodConfig, method_config
from sparsen.methods.registry import MAX_LEVEL, Method, weighted

CLUSTERINGS = ("coactivation", "gate", "contiguous")
ROUTERS = ("linear", "oracle")


@method_config
class MoefyConfig(MethodConfig):
    """MoEfication: each MLP split into experts by co-activation, a linear router per layer picks k per token."""

    method = "moefy"

    experts: int = 16
    """experts per MLP (E); it must divide the MLP's width"""
    k: int | None = None
    """experts each token reads; None: the fewest whose skipped MLP share reaches ``sparsity`` model-wide"""
    clustering: str = "coactivation"
    """'coactivation' (k-means on the channels' |activation| over calibration tokens), 'gate' (on gate's weight
    rows, parameter clustering) or 'contiguous' (channels in index order: the unclustered baseline)"""
    router: str = "linear"
    """'linear' (a learned E x d router per layer) or 'oracle' (each expert's exact output norm: the dense MLP is
    computed, so it bounds quality and saves nothing; torch evaluation only)"""
    cluster_tokens: int = 8192
    """calibration tokens whose activations the channels are clustered on"""
    cluster_iters: int = 10
    """k-means iterations"""
    router_steps: int = 200
    """Adam steps of each router"""
    router_batch: int = 2048
    """tokens per router step"""
    router_lr: float = 0.02
    """the routers' learning rate"""
    heldout_share: float = 0.1
    """share of the calibration tokens kept out of router training, to report the routers' recall on"""
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not _int(self.experts) or self.experts < 2:
            raise ConfigValueError(f"experts {self.experts!r}: give a whole number of 2 or more")
        if self.k is not None and (not _int(self.k) or not 1 <= self.k <= self.experts):
            raise ConfigValueError(f"k {self.k!r}: give a whole number of experts per token from 1 to {self.experts} "
                                   "(experts)")
        if self.clustering not in CLUSTERINGS:
            raise ConfigValueError(f"clustering {self.clustering!r}: use one of {', '.join(CLUSTERINGS)}")
        if self.router not in ROUTERS:
            raise ConfigValueError(f"router {self.router!r}: use one of {', '.join(ROUTERS)}")
        for name in ("cluster_tokens", "cluster_iters", "router_steps", "router_batch"):
            v = getattr(self, name)
            if not _int(v) or v < 1:
                raise ConfigValueError(f"{name} {v!r}: give a whole number of 1 or more")
        if not isinstance(self.router_lr, (int, float)) or not self.router_lr > 0:
            raise ConfigValueError(f"router_lr {self.router_lr!r}: give a positive learning rate")
        if not isinstance(self.heldout_share, (int, float)) or not 0 < self.heldout_share < 0.5:
            raise ConfigValueError(f"heldout_share {self.heldout_share!r}: give a share in (0, 0.5)")


def mlp_share(lm) -> float:
    """The MLP's share of the block-linear weights."""
    params = lm.adapter.linear_params()
    mlp = sum(p for s, p in params.items() if s.rsplit(".", 1)[1] in ("gate", "up", "down"))
    return mlp / sum(params.values())


def k_for(lm, sparsity: float, experts: int) -> int:
    """The fewest experts per token whose skipped MLP share reaches ``sparsity`` model-wide (at least 1)."""
    level = sparsity / mlp_share(lm)
    if level > MAX_LEVEL + 1e-9 and experts * (1 - level) < 1 - 1e-9:
        raise SparsenError(f"moefy skips only the MLP ({mlp_share(lm):.1%} of the block weights) and reads at least one "
                           f"of {experts} experts: ask for --sparsity {mlp_share(lm) * (1 - 1 / experts):.2f} or less")
    return max(1, math.floor(experts * (1 - level) + 1e-9))


# --- clustering --------------------------------------------------------------------------------------------------------
def balanced_kmeans(features: torch.Tensor, n_clusters: int, iters: int, seed: int) -> torch.Tensor:
    """Cluster the rows of ``features`` [n, f] into n_clusters of exactly n / n_clusters rows each (spherical k-means;
    each assignment step fills the clusters greedily, best cosine first). Returns the cluster of each row [n]."""
    n = features.shape[0]
    size = n // n_clusters
    f = torch.nn.functional.normalize(features.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:n_clusters]].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        order = torch.argsort((f @ centroids.T).reshape(-1), descending=True).numpy()
        new = np.full(n, -1, np.int64)
        room = np.full(n_clusters, size, np.int64)
        left = n
        for flat in order:
            row, c = divmod(int(flat), n_clusters)
            if new[row] < 0 and room[c] > 0:
                new[row], room[c] = c, room[c] - 1
                left -= 1
                if left == 0:
                    break
        new_t = torch.from_numpy(new)
        if torch.equal(new_t, assign):
            break
        assign = new_t
        centroids = torch.nn.functional.normalize(
            torch.zeros(n_clusters, f.shape[1], dtype=f.dtype).index_add_(0, assign, f), dim=1)
    return assign


def expert_contributions(mid: torch.Tensor, w_down: torch.Tensor, expert_of: torch.Tensor, n_experts: int,
                         chunk: int = 4096) -> torch.Tensor:
    """||W_down[:, S_e] mid[S_e]|| per token and expert [n, E] (in chunks of tokens): the oracle's scores."""
    groups = expert_groups(expert_of, n_experts)
    return torch.cat([expert_output_norms(mid[i:i + chunk].float(), w_down, groups)
                      for i in range(0, mid.shape[0], chunk)])


def train_router(x: torch.Tensor, contrib: torch.Tensor, steps: int, batch: int, lr: float, seed: int):
    """A linear router (W [E, d], b [E]) whose softmax matches each token's contribution shares (cross-entropy,
    Adam on seeded minibatches)."""
    g = torch.Generator().manual_seed(seed)
    d, E = x.shape[1], contrib.shape[1]
    target = contrib / contrib.sum(-1, keepdim=True).clamp_min(1e-12)
    scale = x.pow(2).mean().sqrt().clamp_min(1e-6)  # inputs of unit scale, so one lr serves every layer
    lin = torch.nn.Linear(d, E)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    xs = x / scale
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(xs.shape[0], (min(batch, xs.shape[0]),), generator=g)
            opt.zero_grad()
            loss = -(target[rows] * torch.log_softmax(lin(xs[rows]), -1)).sum(-1).mean()
            loss.backward()
            opt.step()
    return (lin.weight.detach() / scale).contiguous(), lin.bias.detach().clone()


def recall(scores: torch.Tensor, contrib: torch.Tensor, k: int) -> float:
    """The share of the best k experts' contribution that the k experts with the highest ``scores`` hold."""
    best = contrib.topk(k, -1).values.sum(-1)
    got = contrib.gather(-1, scores.topk(k, -1).indices).sum(-1)
    return float((got / best.clamp_min(1e-12)).mean())


# --- calibration -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_mlp(lm, wins: torch.Tensor, progress: bool = True) -> tuple[list, list]:
    """Per layer, the MLP's (normed) inputs [n, d] and intermediates act(gate) * up [n, I] on the calibration windows,
    kept in half precision."""
    blocks = lm.adapter.blocks
    xs, mids = [[] for _ in blocks], [[] for _ in blocks]
    handles = []
    for b in blocks:
        handles.append(b.linears["gate"].register_forward_pre_hook(
            lambda m, args, i=b.index: xs[i].append(args[0].reshape(-1, args[0].shape[-1]).half())))
        handles.append(b.linears["down"].register_forward_pre_hook(
            lambda m, args, i=b.index: mids[i].append(args[0].reshape(-1, args[0].shape[-1]).half())))
    try:
        for w in tqdm(wins, desc="moefy: activations", unit="win", disable=not progress, leave=False):
            lm.adapter.trunk(w[None])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(m) for m in mids]


def split_experts(mid: torch.Tensor, w_gate: torch.Tensor, config: MoefyConfig, layer: int) -> torch.Tensor:
    """Each channel's expert [I] by the config's clustering."""
    n_channels, E = w_gate.shape[0], config.experts
    if config.clustering == "contiguous":
        return torch.arange(n_channels) // (n_channels // E)
    if config.clustering == "gate":
        return balanced_kmeans(w_gate.float(), E, config.cluster_iters, config.seed + layer)
    return balanced_kmeans(mid[: config.cluster_tokens].float().abs().T, E, config.cluster_iters, config.seed + layer)


def calibrate(lm, sparsity, wins, config: MoefyConfig, progress):
    ad = lm.adapter
    n_channels, E = ad.intermediate_size, config.experts
    if n_channels % E:
        divisors = [e for e in (4, 8, 12, 16, 24, 32, 48, 64) if n_channels % e == 0]
        raise SparsenError(f"{E} experts do not divide the MLP's {n_channels} channels: choose a divisor such as "
                           f"{', '.join(map(str, divisors[:4]))}")
    k = config.k if config.k is not None else k_for(lm, sparsity, E)
    xs, mids = collect_mlp(lm, wins, progress)
    n = xs[0].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    n_held = max(1, int(round(config.heldout_share * n)))
    held, train = perm[:n_held], perm[n_held:]
    sites = {site: {"rule": "dense"} for site, *_ in ad.linear_sites()}
    tensors, per_layer = {}, []
    for b in tqdm(ad.blocks, desc="moefy: experts and routers", unit="layer", disable=not progress, leave=False):
        i, key = b.index, f"moe.layers.{b.index}"
        w_gate, w_down = b.linears["gate"].weight.detach().float(), b.linears["down"].weight.detach().float()
        expert_of = split_experts(mids[i][train], w_gate, config, i)
        contrib = expert_contributions(mids[i], w_down, expert_of, E)
        tensors[f"{key}.expert_of"] = expert_of.to(torch.int32).contiguous()
        entry = {"rule": "experts", "k": k, "experts": key}
        stats = {"layer": i, "oracle_top_share": float((contrib.topk(k, -1).values.sum(-1) / contrib.sum(-1)).mean())}
        if config.router == "oracle":
            entry["router"] = "oracle"
        else:
            W, bias = train_router(xs[i][train].float(), contrib[train], config.router_steps, config.router_batch,
                                   config.router_lr, config.seed + i)
            tensors[f"{key}.router"], tensors[f"{key}.bias"] = W, bias
            held_scores = xs[i][held].float() @ W.T + bias
            stats |= {f"recall_k{kk}": recall(held_scores, contrib[held], kk) for kk in sorted({1, k, E // 2})}
        sites[f"layers.{i}.down"] = entry
        per_layer.append(stats)
        xs[i] = mids[i] = None  # free the layer's activations
    skipped = 1 - k / E
    achieved = {f"layers.{b.index}.{n}": skipped for b in ad.blocks for n in ("gate", "up", "down")}
    router_params = 0 if config.router == "oracle" or k == E else len(ad.blocks) * E * ad.hidden_size
    charge = router_params / sum(ad.linear_params().values())
    return sites, weighted(lm, achieved) - charge, {
        "tensors": tensors,
        "params": {"experts": E, "k": k, "clustering": config.clustering, "router": config.router,
                   "expert_size": n_channels // E, "mlp_share": mlp_share(lm), "router_charge": charge,
                   "layers": per_layer}}


def plan_at_k(plan, k: int, oracle: bool = False):
    """The same experts and routers with k experts per token (a copy; the calibrated sparsity recomputed); with
    ``oracle`` the routers are dropped and each token reads its k experts of largest exact output."""
    if plan.method != "moefy":
        raise SparsenError(f"plan_at_k takes a moefy plan, not a {plan.method} plan")
    E = int(plan.params["experts"])
    if not 1 <= k <= E:
        raise SparsenError(f"k {k}: give a number of experts per token from 1 to {E}")
    extra = {"k": k, "router": "oracle"} if oracle else {"k": k}
    out = copy.copy(plan)
    out.sites = {s: ({**e, **extra} if e.get("rule") == "experts" else dict(e)) for s, e in plan.sites.items()}
    out.params = {**plan.params, **extra}
    out.config = {**(plan.config or {}), **extra}
    if oracle:
        out.tensors = {n: t for n, t in plan.tensors.items() if not n.endswith((".router", ".bias"))}
    if plan.calibrated_sparsity is not None:
        k0 = int(plan.params["k"])
        out.calibrated_sparsity = plan.calibrated_sparsity + (k0 - k) / E * float(plan.params["mlp_share"])
    return out


METHOD = Method("moefy", "MoEfication: each MLP split into experts by co-activation, a learned linear router per "
                "layer reads k of them per token (gate, up and down skipped for the rest)", MoefyConfig, calibrate)
