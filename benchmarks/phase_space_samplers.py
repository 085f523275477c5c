"""CLD and PSLD against their exact oracle: kernels, HSM vs DSM, EM vs SSCS vs the PF-ODE.

On the 2-D Gaussian mixture of tests/test_phase_space.py, lifted to phase space, with the exact
score at every t. Writes results/phase_space_samplers.{json,png}:

- the largest error of the transitions against RK4 on the moment ODEs and of the kernels against
  the references' closed forms (CLD §B1, PSLD §C3 of REFERENCE_LSGM_PSLD.md);
- ℓ_t = 1 / L_mm of the HSM and DSM kernels as t -> 0 (CLD);
- the sliced-Wasserstein distance of sampled x to the data over the i.i.d. baseline, for EM and
  SSCS at 20 / 50 / 100 / 250 steps (uniform and quadratic striding; the last step is the
  denoising step) and for the adaptive PF-ODE (dopri5, rtol = atol = 1e-5, + its NFE);
- the PF-ODE log-likelihood of states against the exact log-density.

    python benchmarks/phase_space_samplers.py [--n 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _common import machine, utc_now, write_results
from test_phase_space import (
    SDES,
    cld_reference_kernel,
    mixture,
    moment_ode,
    psld_reference_kernel,
)

from lsgm_edu.likelihood import log_likelihood
from lsgm_edu.metrics import sliced_wasserstein_ratio
from lsgm_edu.phase_space import CLD, PSLD
from lsgm_edu.samplers import euler_maruyama, probability_flow, sscs
from lsgm_edu.viz import save_figure

F64 = torch.float64
STEPS = (20, 50, 100, 250)


def kernel_errors() -> dict:
    ode_err, closed_err = 0.0, 0.0
    for sde in SDES:
        for s, t in [(0.0, 0.3), (0.2, 0.9), (0.5, 0.55), (0.0, 1.0)]:
            A, S = sde.transition(torch.tensor([s], dtype=F64), torch.tensor([t], dtype=F64))
            A_ode, S_ode = moment_ode(sde, s, t)
            ode_err = max(ode_err, (A[0] - A_ode).abs().max().item(),
                          (S[0] - S_ode).abs().max().item())
        t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 1.0], dtype=F64)
        x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
        B = sde.integrated_beta(torch.zeros_like(t), t)[:, None]
        ref = cld_reference_kernel if isinstance(sde, CLD) else psld_reference_kernel
        mu_x, mu_m, xx, xm, mm = ref(sde, x0, 0 * x0, B, 0.0, sde.lift_covariance[1, 1].item())
        k = sde.kernel(x0, t)
        cov = k.covariance - sde.numerical_eps * torch.eye(2, dtype=F64)
        closed = torch.stack([torch.cat([xx, xm], 1), torch.cat([xm, mm], 1)], 1)
        closed_err = max(closed_err, (k.mean - torch.cat([mu_x, mu_m], 1)).abs().max().item(),
                         (cov - closed).abs().max().item())
    return {"transition_max_abs_error_vs_moment_ode_rk4": ode_err,
            "kernel_max_abs_error_vs_reference_closed_forms": closed_err,
            "sdes": [repr(s) for s in SDES]}


def momentum_scales() -> dict:
    sde, x0 = CLD(), torch.zeros(1, 1, dtype=F64)
    out = {}
    for t in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        tt = torch.tensor([t], dtype=F64)
        out[f"{t:g}"] = {"hsm": 1 / sde.kernel(x0, tt).scale[0, 1, 1].item(),
                         "dsm": 1 / sde.kernel(x0, tt, x0).scale[0, 1, 1].item()}
    return out


def sampler_table(n: int) -> dict:
    gmm = mixture()
    baseline = None

    def ratio(x):
        nonlocal baseline
        r, _, b = sliced_wasserstein_ratio(x, gmm.sample, sets=2, references=4, baseline_pairs=16,
                                           generator=torch.Generator().manual_seed(5),
                                           return_parts=True, baseline=baseline)
        baseline = b
        return r

    table = {"data_itself": ratio(gmm.sample(n, torch.Generator().manual_seed(77)))}
    for sde in (CLD(), PSLD()):
        score, name = gmm.score_fn(sde), type(sde).__name__
        rows = table[name] = {}
        for striding in ("uniform", "quadratic"):
            for sampler in (euler_maruyama, sscs):
                key = f"{'em' if sampler is euler_maruyama else 'sscs'}_{striding}"
                rows[key] = {}
                for steps in STEPS:
                    z = sampler(sde, score, (n, 4), steps, generator=torch.Generator().manual_seed(1),
                                dtype=F64, striding=striding)
                    rows[key][steps] = ratio(sde.project(z))
                print(name, key, rows[key], flush=True)
        z, nfe = probability_flow(sde, score, (n, 4), generator=torch.Generator().manual_seed(1),
                                  dtype=F64, return_nfe=True)
        rows["ode_dopri5_tol1e-5"] = {"nfe": nfe, "ratio": ratio(sde.project(z))}
    return table


def likelihood_errors() -> dict:
    gmm, out = mixture(), {}
    for sde in (CLD(), PSLD()):
        g = torch.Generator().manual_seed(6)
        z = sde.lift(gmm.sample(16, g), g)
        res = log_likelihood(sde, gmm.score_fn(sde), z, exact_divergence=True, eps=1e-3,
                             rtol=1e-8, atol=1e-8)
        exact = gmm.log_prob_fn(sde)(z, torch.full((16,), 1e-3, dtype=F64))
        out[type(sde).__name__] = {"max_abs_error_nats": (res.logp - exact).abs().max().item(),
                                   "nfe": res.nfe}
    return out


def figure(report: dict, path: Path) -> None:
    fig = Figure(figsize=(12, 3.6))
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes[:2], ("CLD", "PSLD"), strict=True):
        rows = report["swd_over_iid_baseline"][name]
        for key, style in (("em_uniform", "C0--"), ("em_quadratic", "C0-"),
                           ("sscs_uniform", "C3--"), ("sscs_quadratic", "C3-")):
            ax.plot(STEPS, [rows[key][s] for s in STEPS], style, marker="o", label=key)
        ode = rows["ode_dopri5_tol1e-5"]
        ax.plot([ode["nfe"]], [ode["ratio"]], "k*", markersize=10, label="PF-ODE (dopri5)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="steps (= NFE, with the denoising step)",
               ylabel="SWD / i.i.d. baseline", title=f"{name}, exact score")
        ax.set_xticks(STEPS, labels=[str(s) for s in STEPS], minor=False)
        ax.set_xticks([], minor=True)
        ax.legend(fontsize=7)
    ells = report["momentum_scale_cld"]
    ts = [float(t) for t in ells]
    axes[2].plot(ts, [ells[t]["hsm"] for t in ells], "C2-o", label="HSM (m0 integrated out)")
    axes[2].plot(ts, [ells[t]["dsm"] for t in ells], "C1-o", label="DSM (m0 given)")
    axes[2].set(xscale="log", yscale="log", xlabel="t", ylabel="ℓ_t = 1 / L_mm",
                title="CLD: the momentum score's scale")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="samples per setting (2 sets)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    report = {"kernels": kernel_errors(), "momentum_scale_cld": momentum_scales(),
              "swd_over_iid_baseline": sampler_table(args.n), "n_samples": args.n,
              "pf_ode_likelihood_of_states": likelihood_errors()}
    report.update(seconds=round(time.time() - t0, 1), machine=machine(), date=utc_now())
    figure(report, HERE / "results" / "phase_space_samplers.png")
    write_results(report, HERE / "results" / "phase_space_samplers.json")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
