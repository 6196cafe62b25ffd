"""PNG plots of a profile (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsen.io import pyplot, save_figure
from sparsen.measure.profile import SITE_LABELS, SITES


def plot_profile(profile: dict, out_dir: str | Path) -> list[Path]:
    plt = pyplot()  # the Agg backend chosen here, not as a side effect of importing this module
    out_dir = Path(out_dir)
    layers = profile["layers"]
    x = [lay["layer"] for lay in layers]
    paths = []

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    for site in SITES:
        if "out_err" in layers[0]["sites"][site]:
            axes[0].plot(x, [lay["sites"][site]["out_err"]["0.5"] for lay in layers], marker=".", label=SITE_LABELS[site])
        else:
            axes[0].plot([], [], label=SITE_LABELS[site])
        axes[1].plot(x, [lay["sites"][site]["l2_share"]["0.9"] for lay in layers], marker=".")
        axes[2].plot(x, [lay["sites"][site]["below_rel_rms"]["0.1"] for lay in layers], marker=".")
        axes[3].plot(x, [lay["sites"][site]["kurtosis"] for lay in layers], marker=".")
    axes[0].set_title("relative output error, 50% smallest inputs zeroed\n(lower = more compressible)")
    axes[1].set_title("share of entries keeping 90% of L2 mass")
    axes[2].set_title("share of entries with |x| < 0.1·rms(token)")
    axes[3].set_title("kurtosis of entries (Gaussian = 3)")
    axes[3].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{profile['model']}: activation sparsity per layer ({profile['tokens']} tokens, {profile['corpus']})")
    paths.append(save_figure(fig, out_dir / "profile_layers.png"))

    sens = profile.get("sensitivity")
    if sens:
        groups = list(sens["groups"])
        sps = list(sens["groups"][groups[0]])
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(sps)
        for j, sp in enumerate(sps):
            ax.bar(np.arange(len(groups)) + j * width, [sens["groups"][g][sp]["kl"] for g in groups], width,
                   label=f"{int(float(sp) * 100)}% sparse")
        ax.set_xticks(np.arange(len(groups)) + width * (len(sps) - 1) / 2)
        ax.set_xticklabels([SITE_LABELS[g].replace(" (MLP intermediate)", "\n(MLP intermediate)") for g in groups],
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("KL(dense || sparse), nats/token")
        ax.set_title("one input group alone made sparse in every layer (per-token top-k)")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        paths.append(save_figure(fig, out_dir / "profile_sensitivity.png"))

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
