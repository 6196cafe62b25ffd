"""Allocation of a model-wide sparsity budget over the block linears' inputs.

``uniform``: every linear at the target.
``greedy`` (TEAL's block-wise greedy): inside each block, start every linear at 0 and repeatedly raise
by 0.05 the linear whose step adds the least squared error to the block's output per unit of its
parameter share, until the block reaches the target; every block gets the target.
``sensitivity`` (ours): measure, for each input group (q/k/v input, o input, gate/up input, down
input) alone, the KL to the dense model at a grid of sparsity levels on a calibration window; then,
starting from all-dense, repeatedly raise by one step the group whose next step adds the least KL
per weight byte skipped, until the parameter-weighted budget is met. Assumes the groups' KL add up
(a first-order approximation that holds for small damage). The same level applies in every layer.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsen.core.divergence import kl_sum
from sparsen.core.hooks import Sparsifier
from sparsen.core.rules import ThresholdRule
from sparsen.models.adapters import GROUP_OF, INPUT_GROUPS, LINEAR_NAMES
from sparsen.models.kv import cache_of, with_cache

# The allocation knobs (steps, spans, tokens, windows) are fields of AllocatedConfig (methods/config.py).
LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
STEP = 0.025
MAX_LEVEL = 0.9


@torch.no_grad()
def group_kl_table(lm, hists, wins, rule_for, progress=True) -> dict[str, list[float]]:
    """KL(dense || sparse) per token with one input group at each level of LEVELS;
    ``rule_for(site, level)`` gives a site's rule at a level."""
    def logp(w):
        return F.log_softmax(lm.model(w[None]).logits[0].float(), -1)

    dense = [logp(w) for w in wins]
    table = {g: [0.0] for g in INPUT_GROUPS}
    jobs = [(g, s) for g in INPUT_GROUPS for s in LEVELS[1:]]
    for g, s in tqdm(jobs, desc="sensitivity allocation", disable=not progress, leave=False):
        rules = {site: rule_for(site, s) for site in hists if GROUP_OF[site.split(".")[-1]] == g}
        with Sparsifier(lm.adapter, rules):
            kl = sum(kl_sum(d, logp(w)).item() for d, w in zip(dense, wins)) / sum(len(d) for d in dense)
        table[g].append(max(kl, 0.0))
    return table


def greedy_levels(table: dict[str, list[float]], group_params: dict[str, int], target: float) -> dict[str, float]:
    """Per-group levels meeting the parameter-weighted ``target`` at the least summed KL (greedy)."""
    total = sum(group_params.values())
    levels = {g: 0.0 for g in table}

    def kl(g, s):
        return float(np.interp(s, LEVELS, table[g]))

    def budget():
        return sum(levels[g] * group_params[g] for g in levels) / total

    while budget() < target - 1e-9:
        best, best_cost = None, None
        for g in levels:
            if levels[g] + STEP > MAX_LEVEL + 1e-9:
                continue
            cost = (kl(g, levels[g] + STEP) - kl(g, levels[g])) / (STEP * group_params[g])
            if best is None or cost < best_cost:
                best, best_cost = g, cost
        if best is None:
            break
        missing = (target - budget()) * total / group_params[best]
        levels[best] = min(levels[best] + STEP, levels[best] + missing)  # the last step lands on the target
    return levels


def group_params(lm) -> dict[str, int]:
    out = {g: 0 for g in INPUT_GROUPS}
    for _, _, name, mod in lm.adapter.linear_sites():
        out[GROUP_OF[name]] += mod.weight.numel()
    return out


@torch.no_grad()
def layer_calls(lm, tokens: torch.Tensor) -> dict[int, tuple]:
    """The (args, kwargs) every decoder layer is called with on ``tokens``, so a layer can be re-run alone.

    Without a KV cache: with one, re-running a layer would append its keys and values to the cache of the
    capturing pass and attend to those (dense) entries, hiding the effect of a k or v mask (it did: TEAL's
    greedy then saw no error from k and v and pushed both to the maximum level in every block)."""
    return _captured_calls(lm, lambda: lm.adapter.trunk(tokens[None]))[0]


def _captured_calls(lm, run) -> tuple[dict[int, tuple], object]:
    """The (args, kwargs) every decoder layer is called with while ``run()`` runs, and what ``run()`` returned.

    Captured ahead of the layer's own pre-hooks (``prepend``): a segmented rotation turns the stream into
    its new basis in a pre-hook, and a capture after it would have it turned twice on a re-run (it was:
    the greedy saw a wrongly rotated input at every segment's first layer)."""
    calls, handles = {}, []
    for i, layer in enumerate(b.layer for b in lm.adapter.blocks):
        def grab(m, args, kwargs, i=i):
            calls[i] = (args, kwargs)

        handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True, prepend=True))
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_greedy_paths(lm, win: torch.Tensor, max_level: float, rule_for, config, progress=True) -> dict[int, list]:
    """TEAL's greedy, block by block, on the first ``config.greedy_tokens`` tokens of ``win``, run until each block reaches
    ``max_level``: per block the path [(block level, linear stepped, levels after the step, block error)].

    The block errors are measured on the second half of those tokens (the first half stays dense, as
    a prompt would), each block fed the dense model's input to it. The path does not depend on where it
    stops, so one run serves every target up to ``max_level`` (``levels_on_path``).
    """
    ad = lm.adapter
    step = config.greedy_step
    tokens = win[: min(config.greedy_tokens, len(win))]
    skip = len(tokens) // 2
    calls = layer_calls(lm, tokens)
    all_params = block_params(lm)
    paths: dict[int, list] = {}
    for b in tqdm(ad.blocks, desc="greedy allocation", unit="block", disable=not progress, leave=False):
        args, kwargs = calls[b.index]
        layer = b.layer
        sites = {n: f"layers.{b.index}.{n}" for n in LINEAR_NAMES}
        params = all_params[b.index]
        total = sum(params.values())
        dense = _layer_out(layer(*args, **kwargs))[..., skip:, :]

        def error(levels):
            rules = {sites[n]: rule_for(sites[n], s) for n, s in levels.items() if s > 0}
            with Sparsifier(ad, rules, dense_prefix=skip):
                y = _layer_out(layer(*args, **kwargs))[..., skip:, :]
            return float((y - dense).double().pow(2).sum())

        levels = {n: 0.0 for n in LINEAR_NAMES}
        err = 0.0

        def step_cost(n):  # squared error added to the block output by raising n one step, per parameter share
            e = error({**levels, n: levels[n] + step})
            return (e - err) / (params[n] / total), e

        # Lazy greedy: every candidate's step cost is remembered from its last evaluation and only the
        # cheapest-looking one is re-evaluated against the current state; it is taken once it stays the
        # cheapest. Same choice as re-evaluating all seven each step whenever the costs only grow as other
        # linears get sparser, at ~2 block forwards per step instead of 7.
        stale = {n: step_cost(n)[0] for n in LINEAR_NAMES}
        path = []
        while sum(levels[n] * params[n] for n in levels) / total < max_level - 1e-9:
            open_ = [n for n in LINEAR_NAMES if levels[n] + step <= MAX_LEVEL + 1e-9]
            if not open_:
                break
            while True:
                n = min(open_, key=stale.get)
                stale[n], e = step_cost(n)
                if all(stale[n] <= stale[m] for m in open_):
                    break
            levels[n] += step
            err = e
            path.append((sum(levels[m] * params[m] for m in levels) / total, n, dict(levels), e))
        paths[b.index] = path
    return paths


def levels_on_path(path: list, target: float, params: dict[str, int]) -> dict[str, float]:
    """The per-linear levels of a block at block level ``target``: the path up to it, the last step cut short so
    that the block lands exactly on the target (what the greedy run to ``target`` itself would give)."""
    total = sum(params.values())
    prev = {n: 0.0 for n in params}
    for level, n, levels, _ in path:
        if level >= target - 1e-9:
            missing = (target - sum(prev[m] * params[m] for m in prev) / total) * total / params[n]
            return {**prev, n: prev[n] + max(0.0, missing)}
        prev = levels
    return dict(prev)


def block_params(lm) -> dict[int, dict[str, int]]:
    return {b.index: {n: m.weight.numel() for n, m in b.linears.items()} for b in lm.adapter.blocks}


def block_greedy_levels(lm, win: torch.Tensor, target: float, rule_for, config, progress=True) -> dict[str, float]:
    """TEAL's greedy allocation: every block at ``target``, its linears' levels from its greedy path."""
    paths = block_greedy_paths(lm, win, target, rule_for, config, progress)
    params = block_params(lm)
    return {f"layers.{i}.{n}": s for i, path in paths.items() for n, s in levels_on_path(path, target, params[i]).items()}


@torch.no_grad()
def block_kls(lm, tokens: torch.Tensor, block_levels: dict[int, dict[str, float]], rule_for,
              progress=True) -> dict[int, float]:
    """Per block i, the KL(dense || sparse) per decode token when block i alone is sparse at
    ``block_levels[i]``: the first half of each window is a dense prompt, the second half is scored.

    The dense run records every layer's input on the scored half; block i's test starts from its recorded
    input (and the dense prompt's KV cache), so it runs only layers i.. and the head, not the dense layers
    before it: the same numbers as a whole-model run, at about half the cost over the blocks."""
    ad = lm.adapter
    layers = [b.layer for b in ad.blocks]
    skip = tokens.shape[1] // 2
    runs = []
    for w in tokens:
        prompt = cache_of(lm.model(w[None, :skip], use_cache=True))
        cache = copy.deepcopy(prompt)
        calls, logits = _captured_calls(lm, lambda: lm.model(w[None, skip:], **with_cache(lm.model, cache)).logits)
        # the keyword the layers get the cache under differs between transformers versions: find it by identity
        key = next(k for k, v in calls[0][1].items() if v is cache)
        runs.append((prompt, calls, key, F.log_softmax(logits[0].float(), -1)))

    def logprobs_from(i, prompt, calls, key):
        cache = copy.deepcopy(prompt)
        h = None
        for j in range(i, len(layers)):
            args, kwargs = calls[j]
            h = _layer_out(layers[j](*((args[0] if h is None else h),) + tuple(args[1:]), **{**kwargs, key: cache}))
        return F.log_softmax(ad.head(h)[0].float(), -1)

    kl = {}
    for i in tqdm(block_levels, desc="block sensitivity", unit="block", disable=not progress, leave=False):
        rules = {f"layers.{i}.{n}": rule_for(f"layers.{i}.{n}", s) for n, s in block_levels[i].items() if s > 0}
        total = n_tok = 0.0
        with Sparsifier(ad, rules):
            for prompt, calls, key, d in runs:
                lp = logprobs_from(i, prompt, calls, key)
                total += float(kl_sum(d, lp))
                n_tok += len(d)
        kl[i] = max(total / n_tok, 1e-9)
    return kl


@torch.no_grad()
def global_levels(lm, wins: torch.Tensor, target: float, rule_for, config, progress=True) -> tuple[dict[str, float], dict]:
    """Ours: TEAL's greedy inside each block, and across blocks a level per block set by measured damage.

    Per block: the greedy path (block output error e_b(s) against block level s) and the KL to the dense model
    when that block alone is sparse at the target, k_b (decode positions of the calibration windows). The
    damage of block b at level s is taken as k_b * e_b(s) / e_b(target) (KL grows like the block's output
    error); then, from all-dense, repeatedly raise by ``config.global_step`` the block whose step adds the least damage,
    until the blocks' mean level (they have equal parameter counts) is the target. Assumes blocks' damages
    add up (measured on SmolLM2: one layer at a time summed to 0.29, all at once 0.25).
    """
    paths, params, level, kl = _global_block_levels(lm, wins, target, rule_for, config, progress)
    per_site = _sites_at(paths, params, level)
    return per_site, {"block_levels": [level[i] for i in sorted(level)], "block_kl_at_target": [kl[i] for i in sorted(kl)]}


def _sites_at(paths: dict[int, list], params: dict[int, dict[str, int]], level: dict[int, float]) -> dict[str, float]:
    """Every linear's level when block i is at ``level[i]`` on its greedy path."""
    return {f"layers.{i}.{n}": s for i in paths for n, s in levels_on_path(paths[i], level[i], params[i]).items()}


def _global_block_levels(lm, wins, target, rule_for, config, progress):
    """``global_levels``' work: the greedy paths, parameter counts, each block's level and its KL alone at the target."""
    hi = min(target + config.global_span, MAX_LEVEL)
    step = config.global_step
    paths = block_greedy_paths(lm, wins[0], hi, rule_for, config, progress)
    params = block_params(lm)
    at_target = {i: levels_on_path(p, target, params[i]) for i, p in paths.items()}
    kl = block_kls(lm, wins[:, :config.kl_tokens], at_target, rule_for, progress)

    curves = {i: ([0.0] + [p[0] for p in path], [0.0] + [p[3] for p in path]) for i, path in paths.items()}
    scale = {i: kl[i] / max(float(np.interp(target, *curves[i])), 1e-30) for i in paths}  # KL per unit block error

    def damage(i, s):
        return scale[i] * float(np.interp(s, *curves[i]))

    level = {i: 0.0 for i in paths}
    reach = {i: paths[i][-1][0] if paths[i] else 0.0 for i in paths}
    while sum(level.values()) / len(level) < target - 1e-9:
        open_ = [i for i in level if level[i] + 1e-9 < reach[i]]
        if not open_:
            break
        i = min(open_, key=lambda j: damage(j, min(level[j] + step, reach[j])) - damage(j, level[j]))
        missing = (target - sum(level.values()) / len(level)) * len(level)
        level[i] = min(level[i] + step, reach[i], level[i] + missing)
    return paths, params, level, kl


@torch.no_grad()
def search_levels(lm, wins: torch.Tensor, target: float, rule_for, config, progress=True) -> tuple[dict[str, float], dict]:
    """Ours: the global allocation's block levels refined by local search on the whole model's KL.

    ``global`` assumes the blocks' damages add up; here every candidate is scored with all blocks sparse at once:
    the KL(dense || sparse) per decode token on the calibration windows (first half a dense prompt). Each of
    ``config.search_steps`` steps moves ``config.search_move`` of level from one random block to another (the
    blocks have equal parameter counts, so the budget holds) and keeps the move if the KL falls."""
    paths, params, level, _ = _global_block_levels(lm, wins, target, rule_for, config, progress)
    reach = {i: paths[i][-1][0] if paths[i] else 0.0 for i in paths}
    tokens = wins[:, :config.kl_tokens]
    skip = tokens.shape[1] // 2
    dense = [F.log_softmax(lm.model(w[None]).logits[0, skip:].float(), -1) for w in tokens]

    def kl_of(lv):
        rules = {site: rule_for(site, s) for site, s in _sites_at(paths, params, lv).items() if s > 0}
        with Sparsifier(lm.adapter, rules, dense_prefix=skip):
            total = sum(float(kl_sum(d, F.log_softmax(lm.model(w[None]).logits[0, skip:].float(), -1)))
                        for d, w in zip(dense, tokens))
        return total / sum(len(d) for d in dense)

    start = best = kl_of(level)
    rng = np.random.default_rng(0)
    blocks = sorted(paths)
    accepted = 0
    for _ in tqdm(range(config.search_steps), desc="allocation search", disable=not progress, leave=False):
        i, j = (int(b) for b in rng.choice(blocks, 2, replace=False))
        move = min(config.search_move, reach[i] - level[i], level[j])
        if move <= 1e-9:
            continue
        cand = {**level, i: level[i] + move, j: level[j] - move}
        k = kl_of(cand)
        if k < best:
            level, best, accepted = cand, k, accepted + 1
    per_site = _sites_at(paths, params, level)
    return per_site, {"block_levels": [level[i] for i in sorted(level)],
                      "search": {"kl_start": start, "kl": best, "steps": config.search_steps, "accepted": accepted}}


def mean_level_by_name(per_site: dict[str, float]) -> dict[str, float]:
    """Mean level of each linear name (q, k, ...) over the blocks, for the plan's record."""
    by_name: dict[str, list[float]] = {}
    for site, s in per_site.items():
        by_name.setdefault(site.split(".")[-1], []).append(s)
    return {n: float(np.mean(v)) for n, v in by_name.items()}


def site_levels(lm, hists, wins, target, config, progress=True, rule_for=None) -> tuple[dict[str, float], dict]:
    """Target sparsity per site, and a record of how it was chosen (for the plan), by ``config.allocation``."""
    allocation = config.allocation
    sites = [s for s, *_ in lm.adapter.linear_sites()]
    if allocation == "uniform" or target == 0:
        return {s: target for s in sites}, {}
    # default rule at a level: the magnitude threshold at that quantile of the site's calibration histogram
    rule_for = rule_for or (lambda site, s: ThresholdRule(hists[site].quantile(s)))
    if allocation in ("global", "search"):
        levels_of = global_levels if allocation == "global" else search_levels
        per_site, record = levels_of(lm, wins, target, rule_for, config, progress)
        return per_site, {**record, "mean_level": mean_level_by_name(per_site)}
    if allocation == "greedy":
        per_site = block_greedy_levels(lm, wins[0], target, rule_for, config, progress)
        return per_site, {"greedy_mean_level": mean_level_by_name(per_site)}
    table = group_kl_table(lm, hists, wins, rule_for, progress)
    levels = greedy_levels(table, group_params(lm), target)
    per_site = {s: levels[GROUP_OF[s.split(".")[-1]]] for s in sites}
    return per_site, {"group_levels": levels, "kl_table": {"levels": list(LEVELS), **table}}
