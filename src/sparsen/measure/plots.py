"""PNG plots of a profile (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsen.io import save_figure  # noqa: E402
from sparsen.measure.profile import SITE_LABELS, SITES  # noqa: E402


def plot_profile(profile: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    layers = profile["layers"]
    x = [lay["layer"] for lay in layers]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for site in SITES:
        axes[0].plot(x, [lay["sites"][site]["l2_share"]["0.9"] for lay in layers], marker=".", label=SITE_LABELS[site])
        axes[1].plot(x, [lay["sites"][site]["below_rel_rms"]["0.1"] for lay in layers], marker=".")
        axes[2].plot(x, [lay["sites"][site]["kurtosis"] for lay in layers], marker=".")
    axes[0].set_title("share of entries keeping 90% of L2 mass\n(lower = more compressible)")
    axes[1].set_title("share of entries with |x| < 0.1·rms(token)")
    axes[2].set_title("kurtosis of entries (Gaussian = 3)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{profile['model']}: activation sparsity per layer ({profile['tokens']} tokens, {profile['corpus']})")
    paths.append(save_figure(fig, out_dir / "profile_layers.png"))

    if "attention" in layers[0]:
        cov = np.array([lay["attention"]["cover90"] for lay in layers])
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * cov.shape[1], 0.9 + 0.22 * cov.shape[0]))
        im = ax.imshow(cov, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(cov.max())))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("share of causal keys covering\n90% of attention mass")
        fig.colorbar(im, ax=ax)
        paths.append(save_figure(fig, out_dir / "profile_attention.png"))
    return paths
