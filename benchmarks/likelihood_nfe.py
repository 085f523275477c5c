"""PF-ODE log-likelihood error versus NFE, fixed-step and adaptive solvers, on an exact oracle.

A 2-D, 3-mode Gaussian mixture under the VP SDE has an exact score at every t
(`GaussianMixture.score_fn`), so `log_likelihood` (Song et al. 2021, eq. 39; exact divergence,
float64) carries no model error. Two errors are reported for a fixed batch of test points:

- solver error: |logp - logp_ref|, logp_ref = log_likelihood at rtol = atol = 1e-10 (dopri5),
  i.e. the ODE solver's own error;
- total error: |logp - gmm.log_prob|, which adds the reference's own gap to the exact log p_0
  (the prior N(0, I) differs slightly from p_T, and the ODE starts at eps, not 0).

NFE counts drift evaluations (each one a score evaluation plus D = 2 backward passes for the
divergence). Writes likelihood_nfe.json and likelihood_nfe.png to --out (benchmarks/results).

    python benchmarks/likelihood_nfe.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lsgm_edu.likelihood import log_likelihood
from lsgm_edu.sde import VPSDE
from lsgm_edu.toy import GaussianMixture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, utc_now, write_results

TOLERANCE_NATS = 0.01  # the headline: the smallest NFE with mean solver error below this
REFERENCE = {"method": "dopri5", "rtol": 1e-10, "atol": 1e-10}
N_POINTS, SEED, EPS = 256, 0, 1e-5

# (method, kind, settings): `steps` for fixed-step methods, rtol = atol for adaptive ones
FULL = [
    ("euler", "fixed", [10, 20, 50, 100, 150, 200, 300, 500, 1000, 2000]),
    ("midpoint", "fixed", [5, 10, 15, 20, 30, 50, 100, 200, 500]),
    ("rk4", "fixed", [2, 3, 5, 7, 10, 15, 20, 50, 100, 200]),
    ("bosh3", "adaptive", [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]),
    ("adaptive_heun", "adaptive", [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6]),
    ("dopri5", "adaptive", [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]),
]
QUICK = [
    ("euler", "fixed", [20, 200]),
    ("midpoint", "fixed", [10, 50]),
    ("rk4", "fixed", [5, 20]),
    ("bosh3", "adaptive", [1e-3, 1e-5]),
    ("adaptive_heun", "adaptive", [1e-3]),
    ("dopri5", "adaptive", [1e-3, 1e-5]),
]


def mixture() -> GaussianMixture:
    """The 3-mode mixture of the tests (tests/test_mlp.py), in float64."""
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]], dtype=torch.float64)
    stds = torch.tensor([0.5, 0.7, 0.4], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def errors(logp: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    err = (logp - target).abs()
    return err.mean().item(), torch.quantile(err, 0.95).item()


def run_one(sde, score_fn, x, method, kind, setting):
    kw = {"steps": setting} if kind == "fixed" else {"rtol": setting, "atol": setting}
    start = time.perf_counter()
    result = log_likelihood(sde, score_fn, x, exact_divergence=True, method=method, eps=EPS, **kw)
    return result, time.perf_counter() - start


def headline(rows: list[dict]) -> dict:
    """Per method: the NFE of the cheapest setting from which on every more accurate one (more
    steps, tighter rtol = atol) has mean solver error <= TOLERANCE_NATS, so that a lucky loose
    tolerance does not count; None if none does. Rows come in that order (FULL, QUICK)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        best = None
        for r in reversed(mine):
            if r["mean_abs_err"] > TOLERANCE_NATS:
                break
            best = r
        out[method] = (
            None
            if best is None
            else {
                "nfe": best["nfe"],
                best["setting_name"]: best["setting"],
                "mean_abs_err": best["mean_abs_err"],
                "wall_s": best["wall_s"],
            }
        )
    return out


def plot(rows: list[dict], floor: float, best: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsgm_edu.viz import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    titles = (
        "solver error: |log p - log p_ref|  (ref: dopri5, tol 1e-10)\n"
        + "ringed: the cheapest setting from which on the error stays <= 0.01 nats",
        "total error: |log p - exact log p_0|",
    )
    colors = plt.get_cmap("tab10").colors
    for ax, key, title in zip(axes, ("mean_abs_err", "mean_abs_err_total"), titles):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["nfe"])
            fixed = mine[0]["kind"] == "fixed"
            ax.loglog(
                [r["nfe"] for r in mine],
                [max(r[key], 1e-16) for r in mine],
                "o-" if fixed else "s--",
                color=colors[i],
                ms=4,
                label=f"{method} ({'fixed steps' if fixed else 'adaptive, rtol=atol'})",
            )
            if key == "mean_abs_err" and best.get(method):  # the headline point
                hit = next(
                    r for r in mine if r["nfe"] == best[method]["nfe"] and r[key] <= TOLERANCE_NATS
                )
                ax.plot(hit["nfe"], hit[key], "o", ms=11, mfc="none", mec=colors[i], mew=1.5)
        ax.axhline(TOLERANCE_NATS, color="k", lw=1, ls=":")
        ax.text(ax.get_xlim()[0] * 1.1, TOLERANCE_NATS * 1.2, "0.01 nats", fontsize=8)
        if key == "mean_abs_err_total":
            line = ax.axhline(floor, color="gray", lw=1, ls="-.")
            label = f"floor {floor:.1e} nats: reference vs exact log p_0\n(prior N(0, I) vs p_T)"
            ax.legend([line], [label], fontsize=8, loc="upper right")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("NFE (drift evaluations)")
        ax.set_ylabel("mean |error| per point (nats)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        f"PF-ODE NLL of {rows[0]['n_points']} points, 2-D 3-mode mixture, VP SDE, exact score "
        "and divergence, float64",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here / "results", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few settings: a smoke test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a batch of 256 2-D points gains nothing from threads

    gmm, sde = mixture(), VPSDE()
    score_fn = gmm.score_fn(sde)
    x = gmm.sample(N_POINTS, torch.Generator().manual_seed(SEED)).to(torch.float64)
    exact = gmm.log_prob(x)
    start = time.perf_counter()
    ref, ref_wall = run_one(sde, score_fn, x, REFERENCE["method"], "adaptive", REFERENCE["rtol"])
    floor_mean, floor_p95 = errors(ref.logp, exact)
    # where the floor comes from: log p_ref(x) - log p_0(x) = [prior_logp(z) - log p_T(z)]
    #   + [log p_eps(x) - log p_0(x)] + the reference's own solver error (the residual)
    prior_gap = ref.prior_logp - gmm.log_prob_fn(sde)(ref.z, torch.full_like(exact, sde.T))
    eps_gap = gmm.log_prob_fn(sde)(x, torch.full_like(exact, EPS)) - exact
    residual = ref.logp - exact - prior_gap - eps_gap
    print(
        f"reference: nfe {ref.nfe}, {ref_wall:.2f} s; mean |ref - exact| {floor_mean:.2e}: "
        f"mean |prior gap| {prior_gap.abs().mean():.2e}, mean |eps gap| {eps_gap.abs().mean():.1e}"
        f", mean |residual| {residual.abs().mean():.1e}"
    )

    rows = []
    for method, kind, settings in QUICK if args.quick else FULL:
        for setting in settings:
            result, wall = run_one(sde, score_fn, x, method, kind, setting)
            mean, p95 = errors(result.logp, ref.logp)
            mean_total, p95_total = errors(result.logp, exact)
            row = {
                "method": method,
                "kind": kind,
                "setting_name": "steps" if kind == "fixed" else "rtol=atol",
                "setting": setting,
                "nfe": result.nfe,
                "mean_abs_err": mean,
                "p95_abs_err": p95,
                "mean_abs_err_total": mean_total,
                "p95_abs_err_total": p95_total,
                "wall_s": round(wall, 4),
                "n_points": N_POINTS,
            }
            rows.append(row)
            print(
                f"{method:>13} {row['setting_name']:>9}={setting:<7g} nfe {result.nfe:5d}  "
                f"err {mean:.2e} (p95 {p95:.2e})  total {mean_total:.2e}  {wall:.2f} s"
            )
    total_wall = time.perf_counter() - start

    report = {
        "benchmark": "likelihood_nfe",
        "date": utc_now(),
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "data": "GaussianMixture means [[-1.5,0],[1.5,0.5],[0,2]], stds [0.5,0.7,0.4], "
            "weights [0.5,0.3,0.2]",
            "sde": repr(sde),
            "n_points": N_POINTS,
            "seed": SEED,
            "eps": EPS,
            "dtype": "float64",
            "score": "exact (gmm.score_fn)",
            "divergence": "exact (autograd)",
            "tolerance_nats": TOLERANCE_NATS,
        },
        "reference": {
            **REFERENCE,
            "nfe": ref.nfe,
            "wall_s": round(ref_wall, 4),
            "mean_abs_err_vs_exact": floor_mean,
            "p95_abs_err_vs_exact": floor_p95,
            "mean_abs_prior_gap": prior_gap.abs().mean().item(),
            "mean_abs_eps_gap": eps_gap.abs().mean().item(),
            "mean_abs_residual": residual.abs().mean().item(),
            "floor_note": "logp_ref - log p_0 = (prior_logp(z) - log p_T(z)) + (log p_eps - "
            "log p_0) + residual; the residual is the reference's own solver error",
            "mean_nll_exact": -exact.mean().item(),
            "mean_nll_reference": -ref.logp.mean().item(),
        },
        "headline": {
            "criterion": f"NFE of the cheapest setting with mean |logp - logp_ref| <= "
            f"{TOLERANCE_NATS} nats, at it and at every more accurate setting (more steps, "
            "tighter rtol=atol) of the same method",
            "per_method": headline(rows),
        },
        "results": rows,
        "total_wall_s": round(total_wall, 2),
    }
    write_results(report, args.out / "likelihood_nfe.json")
    plot(rows, floor_mean, report["headline"]["per_method"], args.out / "likelihood_nfe.png")
    print(json.dumps({"headline": report["headline"]["per_method"], "wall_s": total_wall}))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
