"""What every sparse dictionary shares: its config fields, its parameters, encode and decode.

A dictionary maps an activation x [.., d_in] to latents f [.., d_sae] and back to a reconstruction of a target
[.., d_out]: the input itself (an SAE) or another hook's activation (a transcoder, e.g. MLP input -> MLP output):

    pre    = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    f      = activation(pre)                        (per architecture: ReLU, top-k, JumpReLU, ...)
    x_hat  = f @ W_dec + b_dec  (+ x @ W_skip.T for a skip connection)

Parameter names and layouts are SAELens's (W_enc [d_in, d_sae], W_dec [d_sae, d_out]), so its checkpoints load
without transposes. An architecture is one file: a config dataclass (``architecture`` names it) and a subclass
that gives ``activation`` (inference) and ``training_output`` (the loss it trains with).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn

from sparsen.core.config import check, strict_config

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


@strict_config
class SAEConfig:
    """Fields every architecture has."""

    architecture: ClassVar[str] = ""
    d_in: int = 0
    """width of the input activation"""
    d_sae: int = 0
    """number of latents (the dictionary's width)"""
    d_out: int | None = None
    """width of the target when it is not the input (a transcoder); None: reconstruct the input"""
    skip: bool = False
    """add a learned linear skip connection x @ W_skip.T to the reconstruction (a skip-transcoder)"""
    apply_b_dec_to_input: bool = False
    """subtract b_dec from the input before encoding (SAEs only: needs d_out == d_in)"""
    normalize_activations: str = "none"
    """per-token input normalisation undone on the output (SAELens's): none, constant_norm_rescale (x scaled to norm
    sqrt(d_in)), layer_norm (x centred and divided by its standard deviation + 1e-5)"""
    hook_name: str = ""
    """the hook point the input is read at (``blocks.6.hook_resid_post``)"""
    hook_name_out: str = ""
    """a transcoder's target hook point (``blocks.6.hook_mlp_out``); empty for an SAE"""
    model: str = ""
    """the model spec the dictionary was trained on"""
    model_fingerprint: str = ""
    """that model's fingerprint: a dictionary is refused on another model"""

    def __post_init__(self):
        check(isinstance(self.d_in, int) and self.d_in > 0, f"d_in must be a positive integer, not {self.d_in!r}")
        check(isinstance(self.d_sae, int) and self.d_sae > 0, f"d_sae must be a positive integer, not {self.d_sae!r}")
        check(self.d_out is None or (isinstance(self.d_out, int) and self.d_out > 0),
              f"d_out must be a positive integer or None, not {self.d_out!r}")
        check(self.normalize_activations in NORMALIZATIONS,
              f"normalize_activations must be one of {', '.join(NORMALIZATIONS)}, not {self.normalize_activations!r}")
        check(not (self.apply_b_dec_to_input and self.out_width != self.d_in),
              "apply_b_dec_to_input needs d_out == d_in (b_dec lives in the output space)")

    @property
    def out_width(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None or bool(self.hook_name_out)


class SAEOutput(NamedTuple):
    recon: torch.Tensor
    """the reconstruction of the target [.., d_out]"""
    latents: torch.Tensor
    """dense latents [.., d_sae] (zeros where inactive)"""


class TrainOutput(NamedTuple):
    loss: torch.Tensor
    """what the optimiser minimises"""
    recon: torch.Tensor
    fvu: torch.Tensor
    """this batch's fraction of variance unexplained (centred on the batch mean)"""
    aux: torch.Tensor
    """the architecture's extra term (sparsity penalty, AuxK), already weighted; 0 when it has none"""
    active: torch.Tensor
    """[d_sae] bool: which latents fired in this batch (dead-latent tracking)"""
    l0: torch.Tensor
    """mean number of active latents per token"""


def fvu(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained of one batch: sum ||t - r||^2 / sum ||t - mean(t)||^2."""
    t = target.reshape(-1, target.shape[-1])
    r = recon.reshape(-1, recon.shape[-1])
    return (t - r).pow(2).sum() / (t - t.mean(0)).pow(2).sum().clamp_min(1e-12)


class SparseCoder(nn.Module):
    """Base of every architecture; ``cfg`` is its config dataclass."""

    config_class: ClassVar[type] = SAEConfig
    unit_norm_decoder: ClassVar[bool] = False
    """the trainer keeps W_dec's rows at unit norm (and removes the gradient along them)"""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.out_width
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if cfg.skip else None

    # --- inference ---------------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:  # pragma: no cover - per architecture
        raise NotImplementedError

    def normalize_in(self, x: torch.Tensor):
        """(x normalised, what undoes it on the output)."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * scale, (scale, None)
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            xc = x - mu
            std = xc.std(-1, keepdim=True)  # unbiased, eps outside, and undone without it: SAELens's arithmetic
            return xc / (std + 1e-5), (std, mu)
        return x, None

    @staticmethod
    def normalize_out(y: torch.Tensor, state) -> torch.Tensor:
        if state is None:
            return y
        scale, mu = state
        return y / scale if mu is None else y * scale + mu

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [.., d_sae] of input x [.., d_in]."""
        return self.activation(self.pre_acts(self.normalize_in(x)[0]))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents @ W_dec + b_dec (no skip term, no output normalisation)."""
        return latents @ self.W_dec + self.b_dec

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction from latents (and, for a skip connection or an input normalisation, the input x)."""
        if self.W_skip is None and self.cfg.normalize_activations == "none":
            return self.decode_latents(latents)
        if x is None:
            raise ValueError("decoding this dictionary needs the input x (skip connection or input normalisation)")
        return self._output(self.decode_latents(latents), x, self.normalize_in(x)[1])

    def _output(self, out: torch.Tensor, x: torch.Tensor, state) -> torch.Tensor:
        # As SAELens: an SAE's output is un-normalised, a transcoder's is not; the skip term reads the raw input.
        if not self.cfg.is_transcoder:
            out = self.normalize_out(out, state)
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    def forward(self, x: torch.Tensor) -> SAEOutput:
        xn, state = self.normalize_in(x)
        f = self.activation(self.pre_acts(xn))
        return SAEOutput(self._output(self.decode_latents(f), x, state), f)

    # --- training ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, sample_in: torch.Tensor, sample_out: torch.Tensor, generator: torch.Generator) -> None:
        """A seeded start. An SAE: random decoder rows of norm ``decoder_init_norm`` (unit norm for a unit-norm
        decoder), W_enc = W_dec.T, b_enc 0. A transcoder: latent i starts on sample token t_i (distinct tokens
        while the sample has enough), its encoder column the token's centred input and its decoder row the same
        token's centred output, both of unit norm (``decoder_init_norm`` for a decoder not kept at unit norm),
        b_enc centring the pre-activations on the input's mean. b_dec = the target's mean over the sample; W_skip 0.

        Why a transcoder starts from data: its encoder and decoder live in different spaces, so W_enc = W_dec.T
        means nothing, and from random directions the latents that lose the first top-k never get a gradient
        (most stayed dead: BENCHMARKS.md, "Sparse dictionaries")."""
        d_sae, d_out = self.W_dec.shape
        norm = 1.0 if self.unit_norm_decoder else getattr(self.cfg, "decoder_init_norm", 0.1)
        x = sample_in.reshape(-1, self.cfg.d_in)
        y = sample_out.reshape(-1, d_out)
        self.b_enc.zero_()
        if not self.cfg.is_transcoder:
            w = torch.randn(d_sae, d_out, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * norm)
            self.W_enc.copy_(self.W_dec.T)
        else:
            n = x.shape[0]
            pick = torch.randperm(n, generator=generator)[:d_sae]
            if n < d_sae:  # too few tokens: the rest drawn again, each with a little noise to tell them apart
                pick = torch.cat([pick, torch.randint(0, n, (d_sae - n,), generator=generator)])
            xc, yc = x[pick] - x.mean(0), y[pick] - y.mean(0)
            if n < d_sae:
                jitter = torch.randn(d_sae - n, self.cfg.d_in, generator=generator)
                xc[n:] += 0.05 * xc[n:].norm(dim=1, keepdim=True) * jitter / self.cfg.d_in ** 0.5
            e = xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-8)
            self.W_enc.copy_(e.T * norm)
            self.W_dec.copy_(yc / yc.norm(dim=1, keepdim=True).clamp_min(1e-8) * norm)
            self.b_enc.copy_(-(x.mean(0) @ self.W_enc))
        self.b_dec.copy_(y.mean(0))
        if self.W_skip is not None:
            self.W_skip.zero_()

    def training_output(self, x: torch.Tensor, target: torch.Tensor, dead: torch.Tensor | None) -> TrainOutput:
        """The loss on one batch (``dead``: [d_sae] bool, latents the trainer counts as dead, for AuxK)."""
        raise NotImplementedError  # pragma: no cover - per architecture

    def after_step(self, out: TrainOutput) -> None:
        """State an architecture updates after each optimiser step (BatchTopK's threshold); nothing by default."""

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the component of W_dec's gradient along its rows (they stay unit norm to first order)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    def extra_state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the parameters that a checkpoint keeps (a threshold)."""
        return {}

    def load_extra_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
