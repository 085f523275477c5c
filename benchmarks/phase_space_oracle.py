"""The K = 2 engine against its exact oracle: a phase-space LinearSDE on a 2-D Gaussian mixture.

Writes results/phase_space_oracle.{json,png}: transition error against the moment ODEs, oracle
score against autograd of the oracle density, Euler-Maruyama and PF-ODE samples against the
i.i.d. baseline (sliced Wasserstein ratio), and the PF-ODE log-likelihood of states against
the exact log-density; the figure shows the diffused data and momentum marginals and the
sampled states.

    python benchmarks/phase_space_oracle.py
"""

from __future__ import annotations

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
from test_linear_sde_engine import (
    F_BLOCK,
    G_BLOCK,
    iid_ratio,
    mixture,
    moment_ode_solution,
    phase_sde,
)

from lsgm_edu.likelihood import log_likelihood
from lsgm_edu.samplers import euler_maruyama, probability_flow
from lsgm_edu.viz import save_figure

F64 = torch.float64


def main() -> dict:
    torch.set_num_threads(2)
    gmm, sde, eps = mixture(), phase_sde(), 1e-3
    out: dict = {"sde": repr(sde), "eps": eps}
    errs = []
    for s, t in [(0.0, 0.3), (0.2, 0.9), (0.5, 0.55)]:
        A, S = sde.transition(torch.tensor([s], dtype=F64), torch.tensor([t], dtype=F64))
        A_ode, S_ode = moment_ode_solution(F_BLOCK, G_BLOCK, s, t)
        errs.append(max((A[0] - A_ode).abs().max().item(), (S[0] - S_ode).abs().max().item()))
    out["transition_max_abs_error_vs_moment_ode"] = max(errs)

    g = torch.Generator().manual_seed(2)
    z = 1.5 * torch.randn(256, 4, generator=g, dtype=F64)
    tt = torch.rand(256, generator=g, dtype=F64)
    zg = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob_fn(sde)(zg, tt).sum(), zg)
    out["score_max_abs_error_vs_autograd"] = (gmm.score_fn(sde)(z, tt) - grad).abs().max().item()

    def true_states(n, g):
        z0 = sde.lift(gmm.sample(n, g), g)
        A, S = sde.transition(torch.zeros(n, dtype=F64), torch.full((n,), eps, dtype=F64))
        noise = torch.randn(n, 2, 2, generator=g, dtype=F64)
        return ((A @ z0.reshape(n, 2, 2)) + torch.linalg.cholesky(S) @ noise).reshape(n, 4)

    score, shape = gmm.score_fn(sde), (4 * 800, 4)
    t0 = time.time()
    em = euler_maruyama(sde, score, shape, 250, eps=eps, generator=torch.Generator().manual_seed(4),
                        dtype=F64, denoise=False)
    ode, nfe = probability_flow(sde, score, shape, eps=eps, return_nfe=True, dtype=F64,
                                generator=torch.Generator().manual_seed(4))
    out["sampling_seconds"] = round(time.time() - t0, 1)
    out["swd_over_iid_baseline"] = {
        "euler_maruyama_250": iid_ratio(em, true_states, torch.Generator().manual_seed(5)),
        "probability_flow_dopri5": iid_ratio(ode, true_states, torch.Generator().manual_seed(5)),
        "exact_samples": iid_ratio(true_states(shape[0], torch.Generator().manual_seed(8)),
                                   true_states, torch.Generator().manual_seed(5)),
    }
    out["probability_flow_nfe"] = nfe

    zl = sde.lift(gmm.sample(16, torch.Generator().manual_seed(6)), torch.Generator().manual_seed(6))
    res = log_likelihood(sde, score, zl, exact_divergence=True, eps=eps, rtol=1e-8, atol=1e-8)
    exact = gmm.log_prob_fn(sde)(zl, torch.full((16,), eps, dtype=F64))
    out["pf_ode_logp_max_abs_error_nats"] = (res.logp - exact).abs().max().item()
    out["pf_ode_logp_nfe"] = res.nfe

    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 4)
    truth = true_states(shape[0], torch.Generator().manual_seed(9))
    for ax, (title, x) in zip(axes, [("exact p_eps(x, m)", truth), ("Euler-Maruyama, 250 steps", em),
                                     ("PF-ODE (dopri5)", ode)]):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, label="x (data)")
        ax.scatter(x[:, 2], x[:, 3], s=1, alpha=0.3, label="m (momentum)")
        ax.set(title=title, xlim=(-4, 4), ylim=(-4, 4), aspect="equal")
    axes[0].legend(markerscale=8, loc="lower right", fontsize=7)
    grid = torch.linspace(-4, 4, 161, dtype=F64)
    for t in (0.0, 0.02, 0.05, 0.1, 0.3, 1.0):  # beta F mixes fast: stationary by t ~ 0.3
        xs = torch.stack([grid, torch.zeros_like(grid), torch.zeros_like(grid),
                          torch.zeros_like(grid)], 1)
        lp = gmm.log_prob_fn(sde)(xs, torch.full((len(grid),), float(t), dtype=F64))
        axes[3].plot(grid, lp.exp(), label=f"t = {t:g}")
    axes[3].set(title="oracle density along x1 (x2 = m = 0)", xlabel="x1")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, HERE / "results" / "phase_space_oracle.png", dpi=110)
    out["machine"] = machine()
    out["date"] = utc_now()
    write_results(out, HERE / "results" / "phase_space_oracle.json")
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
