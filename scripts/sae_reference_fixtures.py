"""Write reference SAE checkpoints made by the peer libraries SAELens and sparsify.

This script does NOT run in the project's own environment.  It needs the peer
venv that has torch 2.13.0 (CPU), ``sae-lens`` and ``eai-sparsify`` installed:

    python3 -m venv /work/venv-peers-sae
    /work/venv-peers-sae/bin/pip install torch==2.13.0
    /work/venv-peers-sae/bin/pip install sae-lens eai-sparsify

Run it from the repository root:

    /work/venv-peers-sae/bin/python scripts/sae_reference_fixtures.py [--out tests/data/sae]

Fixtures were generated with sae-lens 6.54.12 and eai-sparsify 1.3.3.

For every fixture it builds a small dictionary (d_in=16, d_sae=48) with the
library's own classes, overwrites *all* parameters with seeded random,
non-trivial values (nonzero biases, positive thresholds, decoder rows of
non-unit norm), saves it with the library's own save function, reloads it with
the library's own loader, and writes next to the checkpoint a
``reference.safetensors`` holding:

    x        [32, d_in]  float32 inputs (random, with a per-dimension offset)
    latents  [32, d_sae] float32 dense latents from the library's encode
    recon    [32, d_out] float32 output of the library's forward(x)
                         (== decode(encode(x)) except for the skip variants,
                         where forward adds the skip term x @ W_skip.T)

Reference tensors are computed with the *reloaded* model, and the script
asserts they match the in-memory model it saved (except batchtopk, whose
inference form differs from the training class by construction).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

D_IN = 16
D_SAE = 48
D_OUT = 20  # SAELens transcoders only; sparsify transcoders need d_out == d_in
N = 32
SEED = 1234


def _gen(tag: str) -> torch.Generator:
    g = torch.Generator().manual_seed(SEED + sum(ord(c) for c in tag))
    return g


def make_x(g: torch.Generator, d_in: int = D_IN) -> torch.Tensor:
    offset = 1.5 * torch.randn(d_in, generator=g) + 0.5
    return (torch.randn(N, d_in, generator=g) + offset).float().contiguous()


def rand_rows(g: torch.Generator, rows: int, cols: int, lo: float = 0.3, hi: float = 1.7):
    """Random matrix whose rows have random (non-unit) norms in [lo, hi]."""
    w = torch.randn(rows, cols, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    return w * (lo + (hi - lo) * torch.rand(rows, 1, generator=g))


def write_reference(out: Path, x: torch.Tensor, latents: torch.Tensor, recon: torch.Tensor):
    save_file(
        {
            "x": x.float().contiguous(),
            "latents": latents.detach().float().contiguous(),
            "recon": recon.detach().float().contiguous(),
        },
        str(out / "reference.safetensors"),
    )


def _close(a: torch.Tensor, b: torch.Tensor, what: str):
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
        raise AssertionError(f"{what}: max abs diff {(a - b).abs().max().item()}")


# --------------------------------------------------------------------------- SAELens


def saelens_randomize(sae, g: torch.Generator, x: torch.Tensor, kind: str,
                      b_enc_shift: float = 0.0):
    """Overwrite every parameter of an SAELens SAE with non-trivial values."""
    d_in = sae.cfg.d_in
    d_out = getattr(sae.cfg, "d_out", d_in)
    with torch.no_grad():
        sae.W_enc.copy_(rand_rows(g, D_SAE, d_in).T * 0.9)
        sae.W_dec.copy_(rand_rows(g, D_SAE, d_out))
        sae.b_dec.copy_(0.5 * torch.randn(d_out, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g) + b_enc_shift)
        if hasattr(sae, "W_skip") and isinstance(sae.W_skip, torch.nn.Parameter):
            sae.W_skip.copy_(0.2 * torch.randn(d_out, d_in, generator=g))
        if kind == "jumprelu":
            # Thresholds at per-latent quantiles of the pre-activations so that
            # roughly half of the positive pre-activations are cut off.
            sae_in = x
            if getattr(sae.cfg, "apply_b_dec_to_input", False):
                sae_in = sae_in - sae.b_dec
            hp = sae_in @ sae.W_enc + sae.b_enc
            # Per latent: a random rank between 20% and 80%, then the widest gap
            # between sorted neighbours near that rank; threshold at its middle.
            srt = hp.sort(dim=0).values
            q = torch.randint(int(0.2 * N), int(0.8 * N), (D_SAE,), generator=g)
            thr = torch.empty(D_SAE)
            for j in range(D_SAE):
                lo, hi = max(int(q[j]) - 3, 0), min(int(q[j]) + 3, N - 2)
                gaps = srt[lo + 1 : hi + 2, j] - srt[lo : hi + 1, j]
                i = lo + int(gaps.argmax())
                thr[j] = (srt[i, j] + srt[i + 1, j]) / 2
            # JumpReLU thresholds are positive in trained SAEs; where the chosen
            # value is <= 0 use a small positive one (ReLU already zeroes those).
            thr = torch.where(thr > 0.02, thr, torch.full_like(thr, 0.02))
            sae.threshold.copy_(thr)


MIN_MARGIN = 1e-4


def saelens_margin(sae, x: torch.Tensor) -> float:
    """Distance of the pre-activations to the nearest selection boundary.

    A re-implementation that differs from the library only by float rounding
    must make the same discrete choices (top-k membership, threshold gate), so
    every fixture keeps pre-activations at least MIN_MARGIN away from them.
    """
    cap: dict[str, torch.Tensor] = {}
    x = x.detach()
    h = sae.hook_sae_acts_pre.register_forward_hook(
        lambda m, i, o: cap.__setitem__("hp", o.detach())
    )
    with torch.no_grad():
        sae.encode(x)
    h.remove()
    hp = cap["hp"]
    W_dec, thr = sae.W_dec.detach(), getattr(sae, "threshold", None)
    arch = sae.cfg.architecture()
    if arch in ("topk", "abstopk"):
        if sae.cfg.rescale_acts_by_decoder_norm:
            hp = hp * W_dec.norm(dim=-1)
        v = (hp.abs() if arch == "abstopk" else hp).sort(-1, descending=True).values
        k = sae.cfg.k
        gap = v[:, k - 1] - v[:, k]
        if arch == "topk":  # ties below zero are harmless: ReLU zeroes both
            gap = gap[v[:, k - 1] > 0]
        return float(gap.min()) if gap.numel() else float("inf")
    if thr is not None:
        return float((hp - thr.detach()).abs().min())
    return float("inf")


def saelens_dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


def saelens_fixture(root: Path, name: str, cfg_cls, sae_cls, kind: str = "relu",
                    b_enc_shift: float = 0.0, **cfg_kwargs):
    from sae_lens import SAE

    torch.manual_seed(SEED)
    g = _gen(name)
    x = make_x(g)
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg_kwargs)
    sae = sae_cls(cfg)
    sae.eval()
    saelens_randomize(sae, g, x, kind, b_enc_shift)
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    sae.save_model(str(out))

    loaded = SAE.load_from_disk(str(out), device="cpu")
    loaded.eval()
    assert type(loaded) is sae_cls, (type(loaded), sae_cls)
    with torch.no_grad():
        lat = saelens_dense(loaded.encode(x))
        rec = loaded(x)
        lat0 = saelens_dense(sae.encode(x))
        rec0 = sae(x)
        if not hasattr(loaded, "W_skip"):
            _close(loaded.decode(loaded.encode(x)), rec, f"{name} decode(encode) vs forward")
    _close(lat, lat0, f"{name} latents reload")
    _close(rec, rec0, f"{name} recon reload")
    margin = saelens_margin(loaded, x)
    assert margin > MIN_MARGIN, (name, margin)
    write_reference(out, x, lat, rec)
    return out, lat, margin


def saelens_batchtopk_fixture(root: Path, name: str = "saelens-batchtopk"):
    """BatchTopK is a training-only class; save_inference_model writes it as JumpReLU."""
    from sae_lens import SAE
    from sae_lens.saes import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(SEED)
    g = _gen(name)
    x = make_x(g)
    cfg = BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4.0, rescale_acts_by_decoder_norm=True
    )
    sae = BatchTopKTrainingSAE(cfg)
    saelens_randomize(sae, g, x, "relu")
    with torch.no_grad():
        # Emulate a trained global threshold (BatchTopK's EMA tracks the smallest
        # kept activation of each batch).  Put it halfway between the k*N-th and
        # (k*N+1)-th largest (decoder-norm rescaled, ReLU'd) pre-activation of
        # this batch so that no value sits on the strict '>' boundary.
        _, hp = sae.encode_with_hidden_pre(x)
        v = hp.relu().flatten().sort(descending=True).values
        kn = int(cfg.k * N)
        sae.topk_threshold = ((v[kn - 1] + v[kn]) / 2).double()
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    sae.save_inference_model(str(out))
    loaded = SAE.load_from_disk(str(out), device="cpu")
    loaded.eval()
    with torch.no_grad():
        lat = loaded.encode(x)
        rec = loaded(x)
    margin = saelens_margin(loaded, x)
    assert margin > MIN_MARGIN, (name, margin)
    write_reference(out, x, lat, rec)
    return out, lat, margin, type(loaded).__name__


# --------------------------------------------------------------------------- sparsify


def sparsify_fixture(root: Path, name: str, b_enc_shift: float = 0.0, **cfg_kwargs):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(SEED)
    g = _gen(name)
    x = make_x(g)
    cfg = SparseCoderConfig(num_latents=D_SAE, k=4, **cfg_kwargs)
    sc = SparseCoder(D_IN, cfg, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        sc.encoder.weight.copy_(rand_rows(g, D_SAE, D_IN) * 0.9)
        sc.encoder.bias.copy_(0.3 * torch.randn(D_SAE, generator=g) + b_enc_shift)
        sc.W_dec.copy_(rand_rows(g, D_SAE, D_IN))
        sc.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
        if sc.W_skip is not None:
            sc.W_skip.copy_(0.2 * torch.randn(D_IN, D_IN, generator=g))
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    sc.save_to_disk(out)

    loaded = SparseCoder.load_from_disk(out, device="cpu")
    loaded.eval()
    with torch.no_grad():
        enc = loaded.encode(x)
        lat = torch.zeros(N, D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
        rec = loaded(x).sae_out
        rec0 = sc(x).sae_out
        dec = loaded.decode(enc.top_acts, enc.top_indices)
        if loaded.W_skip is None:
            _close(dec, rec, f"{name} decode(encode) vs forward")
        else:
            _close(dec + x @ loaded.W_skip.mT, rec, f"{name} skip formula")
    _close(rec, rec0, f"{name} recon reload")
    v = enc.pre_acts.sort(-1, descending=True).values  # pre_acts are post-ReLU
    gap = (v[:, 3] - v[:, 4])[v[:, 3] > 0]
    margin = float(gap.min()) if gap.numel() else float("inf")
    assert margin > MIN_MARGIN, (name, margin)
    write_reference(out, x, lat, rec)
    return out, lat, margin


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=here / "tests" / "data" / "sae")
    args = ap.parse_args(argv)
    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)

    import sae_lens
    import sparsify
    from sae_lens.saes import (
        AbsTopKSAE,
        AbsTopKSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        Transcoder,
        TranscoderConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    report: dict[str, dict] = {}

    def note(out: Path, lat: torch.Tensor, margin: float, **extra):
        cfg = json.loads((out / "cfg.json").read_text())
        report[out.name] = {
            "architecture": cfg.get("architecture", "sparsify"),
            "mean_l0": round(float((lat != 0).float().sum(-1).mean()), 3),
            "negative_latents": int((lat < 0).sum()),
            "rows_with_l0_below_4": int(((lat != 0).sum(-1) < 4).sum()),
            "boundary_margin": round(margin, 6) if margin != float("inf") else None,
            **extra,
        }

    meta = SAEMetadata(model_name="sparsen-fixture", hook_name="blocks.0.hook_resid_post")
    note(*saelens_fixture(root, "saelens-standard", StandardSAEConfig, StandardSAE,
                          apply_b_dec_to_input=True, metadata=meta))
    note(*saelens_fixture(root, "saelens-standard-no-bdec-in", StandardSAEConfig, StandardSAE,
                          apply_b_dec_to_input=False))
    note(*saelens_fixture(root, "saelens-topk", TopKSAEConfig, TopKSAE, k=4, b_enc_shift=-2.0,
                          apply_b_dec_to_input=False))
    note(*saelens_fixture(root, "saelens-topk-rescale", TopKSAEConfig, TopKSAE, k=4,
                          apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=True))
    out, lat, margin, cls = saelens_batchtopk_fixture(root)
    note(out, lat, margin, loaded_class=cls)
    note(*saelens_fixture(root, "saelens-jumprelu", JumpReLUSAEConfig, JumpReLUSAE,
                          kind="jumprelu", apply_b_dec_to_input=True))
    note(*saelens_fixture(root, "saelens-abstopk", AbsTopKSAEConfig, AbsTopKSAE, k=4,
                          apply_b_dec_to_input=False))
    note(*saelens_fixture(root, "saelens-layernorm", StandardSAEConfig, StandardSAE,
                          apply_b_dec_to_input=True, normalize_activations="layer_norm"))
    note(*saelens_fixture(root, "saelens-constnorm", TopKSAEConfig, TopKSAE, k=4,
                          apply_b_dec_to_input=True,
                          normalize_activations="constant_norm_rescale"))
    # Transcoders: apply_b_dec_to_input must be False (TranscoderConfig raises otherwise).
    note(*saelens_fixture(root, "saelens-transcoder", TranscoderConfig, Transcoder,
                          d_out=D_OUT, apply_b_dec_to_input=False))
    note(*saelens_fixture(root, "saelens-skip-transcoder", SkipTranscoderConfig, SkipTranscoder,
                          d_out=D_OUT, apply_b_dec_to_input=False))
    note(*saelens_fixture(root, "saelens-jumprelu-transcoder", JumpReLUTranscoderConfig,
                          JumpReLUTranscoder, kind="jumprelu", d_out=D_OUT,
                          apply_b_dec_to_input=False))
    note(*saelens_fixture(root, "saelens-jumprelu-skip-transcoder",
                          JumpReLUSkipTranscoderConfig, JumpReLUSkipTranscoder,
                          kind="jumprelu", d_out=D_OUT, apply_b_dec_to_input=False))

    note(*sparsify_fixture(root, "sparsify-topk", b_enc_shift=-2.0))
    note(*sparsify_fixture(root, "sparsify-transcoder", transcode=True))
    note(*sparsify_fixture(root, "sparsify-skip", skip_connection=True))
    note(*sparsify_fixture(root, "sparsify-skip-transcoder", transcode=True,
                           skip_connection=True))

    (root / "VERSIONS.json").write_text(
        json.dumps(
            {
                "generator": "scripts/sae_reference_fixtures.py",
                "torch": torch.__version__,
                "sae_lens": sae_lens.__version__,
                "eai_sparsify": sparsify.__version__,
                "fixtures": report,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
