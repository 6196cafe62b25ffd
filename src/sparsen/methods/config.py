"""Method configs: one frozen dataclass per method, its fields documented and checked on construction.

Every config carries the target ``sparsity`` and where it calibrates; a method's own knobs are fields of its
config (rank share, allocation steps, segments, basis, ...), never module constants. A bad value or an unknown
field raises a one-line ``SparsenError`` (also a ``TypeError`` or ``ValueError``, as Python would raise).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparsen.core.config import ConfigFieldError, ConfigValueError, check, is_number, strict_config  # noqa: F401 (re-exported)
from sparsen.core.rules import check_sparsity
from sparsen.data import CALIB_CORPUS, CORPUS_SETS, EVAL_ONLY


def method_config(cls):
    """Class decorator of a sparsity method's config: ``strict_config`` that also needs a target sparsity."""
    return strict_config(cls, needs_sparsity=True)


_check = check
_number = is_number


HOLDS = ("calibrated", "prompt")  # MethodConfig.hold
TUNE_SCHEDULES = ("constant", "cosine")  # MethodConfig.tune_schedule


@method_config
class MethodConfig:
    """The fields every method takes. Subclasses name their method in ``method``."""

    method: ClassVar[str] = ""
    allocations: ClassVar[tuple[str, ...]] = ("uniform",)
    needs_calibration: ClassVar[bool] = True

    sparsity: float
    """target model-wide sparsity in [0, 1): the share of block-linear weight bytes a kernel skips, effective
    (less the bytes a method adds per token)"""
    corpus: str = CALIB_CORPUS
    """calibration text: a bundled corpus name or a UTF-8 file (never the evaluation corpus)"""
    tokens: int = 16384
    """calibration tokens (TEAL uses ~10 x 2048)"""
    ctx: int = 1024
    """window length of the calibration forward passes"""
    allocation: str = "uniform"
    """how sparsity is spread over the linears (the methods that allow others list them in ``allocations``)"""
    hold: str = "calibrated"
    """how thresholds meet new text at run time: 'calibrated' uses them as calibrated; 'prompt' rescales each site's
    thresholds, per prompt, so that the prompt's own (dense) activations reach the site's calibrated sparsity,
    and the continuation runs with them: the sparsity then holds on text unlike the calibration text"""
    tune_steps: int = 0
    """after calibration, steps of tuning the weights to the sparse model (``methods/tuning.py``: the RMSNorm gains and
    a rank-``tune_rank`` term beside each block linear, trained on the KL from the dense model, one window of the
    calibration text per step; folded into the weights, free per token); 0: none"""
    tune_lr: float = 1e-3
    """tuning: Adam's learning rate for the norm gains"""
    tune_rank: int = 16
    """tuning: rank of the term beside each block linear"""
    tune_rank_lr: float = 1e-4
    """tuning: Adam's learning rate for the low-rank terms"""
    tune_schedule: str = "constant"
    """tuning: the learning rates held 'constant', or decayed to 0 along a half 'cosine' over the steps"""

    def __post_init__(self):
        check_sparsity(self.sparsity)
        _check(isinstance(self.tokens, int) and self.tokens >= 2, f"tokens {self.tokens!r}: give at least 2")
        _check(isinstance(self.ctx, int) and self.ctx >= 2, f"ctx {self.ctx!r}: give a window of at least 2 tokens")
        _check(isinstance(self.corpus, str) and bool(self.corpus), "corpus: name a bundled corpus or a UTF-8 text file")
        _check(self.corpus not in EVAL_ONLY and self.corpus not in CORPUS_SETS,
               f"corpus '{self.corpus}' is an evaluation corpus, never calibration text: calibrate on {CALIB_CORPUS} "
               "or your own UTF-8 file")
        _check(self.hold in HOLDS, f"hold '{self.hold}': use one of {', '.join(HOLDS)}")
        _check(isinstance(self.tune_steps, int) and not isinstance(self.tune_steps, bool) and self.tune_steps >= 0,
               f"tune_steps {self.tune_steps!r}: give 0 (no tuning) or more")
        _check(isinstance(self.tune_rank, int) and not isinstance(self.tune_rank, bool) and self.tune_rank >= 1,
               f"tune_rank {self.tune_rank!r}: give a whole number of 1 or more")
        _check(self.tune_schedule in TUNE_SCHEDULES,
               f"tune_schedule '{self.tune_schedule}': use one of {', '.join(TUNE_SCHEDULES)}")
        for name in ("tune_lr", "tune_rank_lr"):
            v = getattr(self, name)
            _check(_number(v) and 0 < v < 1, f"{name} {v!r}: give a learning rate in (0, 1)")
        _check(self.allocation in self.allocations,
               f"method '{self.method}' supports allocation {', '.join(self.allocations)}, not '{self.allocation}'")

    def kl_windows(self) -> int:
        """Calibration windows an allocation measures KL on (one window for the allocations that measure none)."""
        return 1

    def fields(self) -> dict:
        """The config as a plain dict (what a plan records; ``config_for(method, **fields)`` rebuilds it)."""
        return dataclasses.asdict(self)


ALLOCATIONS = ("uniform", "greedy", "sensitivity", "global", "search")


@method_config
class AllocatedConfig(MethodConfig):
    """A method whose per-linear levels can be allocated (``methods/allocation.py``)."""

    allocations: ClassVar[tuple[str, ...]] = ALLOCATIONS

    allocation: str = "uniform"
    """'uniform' (every linear at the target); 'greedy' (TEAL's block-wise greedy: inside each block raise the
    linear whose step adds the least block-output error per parameter share); 'sensitivity' (per input group,
    greedy on measured KL per skipped byte, the same in every layer); 'global' (ours: TEAL's greedy inside each
    block, each block's level set by the KL it causes alone); 'search' (ours: global's levels refined by local search
    on the whole model's KL)"""
    greedy_step: float = 0.05
    """greedy and global: the step by which a linear's level is raised inside a block"""
    greedy_tokens: int = 256
    """greedy and global: tokens of the first calibration window the block errors are measured on (second half)"""
    global_span: float = 0.15
    """global: how far above the target a block's level may go"""
    global_step: float = 0.025
    """global: the step by which a block's level is raised"""
    kl_tokens: int = 512
    """global: tokens of each calibration window the per-block KL is measured on (second half)"""
    search_steps: int = 100
    """search: candidate moves tried (each one whole-model pass over the KL windows)"""
    search_move: float = 0.05
    """search: the level a move takes from one block and gives to another"""
    allocation_windows: int | None = None
    """sensitivity, global and search: calibration windows the KL is measured on (None: 1 for sensitivity, 3 for
    global and search)"""

    def __post_init__(self):
        super().__post_init__()
        for name in ("greedy_step", "global_step"):
            v = getattr(self, name)
            _check(_number(v) and 0 < v <= 0.5, f"{name} {v!r}: give a step in (0, 0.5]")
        _check(_number(self.global_span) and 0 <= self.global_span < 1, f"global_span {self.global_span!r}: give [0, 1)")
        for name in ("greedy_tokens", "kl_tokens"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 2, f"{name} {v!r}: give at least 2 tokens")
        _check(isinstance(self.search_steps, int) and self.search_steps >= 0,
               f"search_steps {self.search_steps!r}: give 0 or more")
        _check(_number(self.search_move) and 0 < self.search_move <= 0.5, f"search_move {self.search_move!r}: give (0, 0.5]")
        _check(self.allocation_windows is None or (isinstance(self.allocation_windows, int) and self.allocation_windows >= 1),
               f"allocation_windows {self.allocation_windows!r}: give 1 or more, or None")

    def kl_windows(self) -> int:
        if self.allocation_windows is not None:
            return self.allocation_windows
        return {"sensitivity": 1, "global": 3, "search": 3}.get(self.allocation, 1)


@method_config
class RotationConfig(AllocatedConfig):
    """The rotation methods (ours): a folded orthogonal basis of the residual stream, per run of layers."""

    segments: int = 1
    """runs of consecutive layers that get their own basis of the residual stream; each change of basis between
    runs costs a d x d product per token, charged against the sparsity"""
    basis: str = "pca"
    """'pca' (eigenbasis of the second moment) or 'sparse' (that basis refined so that per-token thresholding drops
    the least energy: alternating top-k and orthogonal Procrustes)"""
    basis_windows: float = 2.0
    """basis-fit windows per threshold window, disjoint from them (more text, less overfitted bases)"""
    sparse_basis_rows: int = 65536
    """rows (inputs of one segment) the sparse-basis fit uses at most, a seeded sample"""
    sparse_basis_iters: int = 10
    """alternations of the sparse-basis fit"""
    rotate_values: bool = True
    """also turn each value head into the eigenbasis of its outputs (folded into v and o: free)"""

    def __post_init__(self):
        super().__post_init__()
        _check(isinstance(self.segments, int) and not isinstance(self.segments, bool) and self.segments >= 1,
               f"segments {self.segments!r}: give a whole number of 1 or more")
        _check(self.basis in ("pca", "sparse"), f"basis {self.basis!r}: use pca or sparse")
        _check(_number(self.basis_windows) and self.basis_windows > 0, f"basis_windows {self.basis_windows!r}: give > 0")
        _check(isinstance(self.sparse_basis_rows, int) and self.sparse_basis_rows >= 1, "sparse_basis_rows: give >= 1")
        _check(isinstance(self.sparse_basis_iters, int) and self.sparse_basis_iters >= 1, "sparse_basis_iters: give >= 1")
        _check(isinstance(self.rotate_values, bool), "rotate_values: give True or False")


def parse_fields(items, what: str = "--set") -> dict:
    """FIELD=VALUE strings as config fields; VALUE as JSON where it parses (0.5, 3, true, null), else the string."""
    import json

    fields = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigFieldError(f"{what}: write FIELD=VALUE, e.g. rank_share=0.03, not '{item}'")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields
