"""Record K = 1 sampler outputs on the toy oracle, to check that later refactors keep them.

Run once on a reference commit: python tools/make_sampler_regression.py
Writes tests/data/sampler_regression.safetensors (EM, PC, PF-ODE, exact score of a diffused
Gaussian mixture, float64, fixed generators) for VP, sub-VP and VE.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from lsgm_edu.samplers import euler_maruyama, predictor_corrector, probability_flow
from lsgm_edu.sde import VESDE, VPSDE, SubVPSDE
from lsgm_edu.toy import GaussianMixture

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sampler_regression.safetensors"


def mixture():
    means = torch.tensor([[-1.2, 0.0], [1.2, 0.3], [0.0, 1.5]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.5, 0.4, 0.35]), torch.tensor([0.5, 0.3, 0.2]))


def sdes():
    return {"vp": VPSDE(N=50), "subvp": SubVPSDE(N=50), "ve": VESDE(sigma_max=5.0, N=50)}


def run_all() -> dict[str, torch.Tensor]:
    gmm, out, shape = mixture(), {}, (64, 2)
    kw = {"dtype": torch.float64}
    for name, sde in sdes().items():
        score = gmm.score_fn(sde)
        g = torch.Generator().manual_seed(0)
        out[f"{name}/em"] = euler_maruyama(sde, score, shape, 50, generator=g, **kw)
        g = torch.Generator().manual_seed(1)
        out[f"{name}/pc"] = predictor_corrector(sde, score, shape, 50, generator=g, **kw)
        g = torch.Generator().manual_seed(2)
        out[f"{name}/ode"] = probability_flow(sde, score, shape, generator=g, **kw)
    return out


if __name__ == "__main__":
    save_file({k: v.contiguous() for k, v in run_all().items()}, str(OUT))
    print(f"wrote {OUT}")
