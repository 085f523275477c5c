#!/usr/bin/env python3
"""Render chapter 1's key figure for the README: book/images/ch1_scores_langevin.png.

Left: the two-mode Gaussian mixture of Song & Ermon (2019, Fig. 3), its score field and
Langevin chains started uniformly on [-8, 8]^2. Right: the fraction of chains that end in each
mode (ULA and MALA) against the true weights. Deterministic (fixed seed); run from anywhere:

    python tools/make_readme_figure.py [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lsgm_edu import viz
from lsgm_edu.samplers import ChainRecorder, langevin, mala
from lsgm_edu.toy import GaussianMixture

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "book" / "images" / "ch1_scores_langevin.png"


def make_figure(n_chains: int = 2000, n_steps: int = 2000, step_size: float = 0.1, seed: int = 0):
    bimodal = GaussianMixture(means=torch.tensor([[-5.0, -5.0], [5.0, 5.0]]), stds=1.0,
                              weights=torch.tensor([0.2, 0.8]))
    g = torch.Generator().manual_seed(seed)
    x0 = 16 * torch.rand(n_chains, 2, generator=g) - 8
    rec = ChainRecorder(every=2)
    x_ula = langevin(bimodal.score, x0, step_size, n_steps, generator=g, callback=rec)
    x_mala = mala(bimodal.log_prob, bimodal.score, x0, step_size, n_steps, generator=g)
    # Only the first 60 steps: the rush to a mode; after that a chain just jitters inside it.
    traj = torch.cat([x0[None], rec.trajectory()[: 60 // 2]])

    def in_mode(x):
        return torch.bincount(bimodal.component_of(x), minlength=2) / len(x)

    lim = (-9.0, 9.0)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.4), width_ratios=[1.15, 1])
    viz.plot_density(ax0, bimodal.log_prob, lim, lim)
    viz.plot_score_field(ax0, bimodal.score, lim, lim, n=19, color="0.35")
    viz.plot_trajectories(ax0, traj, max_chains=12, lw=1.0)
    ax0.plot(traj[0, :12, 0], traj[0, :12, 1], "kx", ms=5, label="start")
    ax0.legend(loc="upper left", fontsize=8)
    ax0.set(title=r"score $\nabla_x \log p$, 12 chains (first 60 steps)", xlabel="$x_1$",
            ylabel="$x_2$")
    bars = {"true weights": bimodal.weights, "start: basin of $x_0$": in_mode(x0),
            f"Langevin (ULA), {n_steps} steps": in_mode(x_ula),
            f"MALA, {n_steps} steps": in_mode(x_mala)}
    width = 0.2
    for j, (name, w) in enumerate(bars.items()):
        pos = torch.arange(2) + width * (j - 1.5)
        ax1.bar(pos, w, width=width, label=name, color=f"C{[7, 8, 0, 1][j]}")
        for p, v in zip(pos.tolist(), w.tolist()):
            ax1.text(p, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax1.set(xticks=[0, 1], xticklabels=["mode $(-5,-5)$", "mode $(5,5)$"], ylim=(0, 1),
            ylabel="fraction of chains", title="Langevin keeps the initial split, not $p$")
    ax1.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    fig = make_figure()
    path = viz.save_figure(fig, args.out, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
