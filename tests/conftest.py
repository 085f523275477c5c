"""Fixtures shared by the test modules."""

import pytest
import torch

from lsgm_edu.losses import SigmaSquaredWeighting, UniformTimeSampler, denoising_score_matching
from lsgm_edu.nets import EpsToScore, ScoreMLP
from lsgm_edu.sde import VPSDE
from lsgm_edu.toy import GaussianMixture


def toy_mixture() -> GaussianMixture:
    """The 3-mode 2-D mixture the trained-model tests learn (exact score and density known)."""
    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, 2.0]])
    return GaussianMixture(means, torch.tensor([0.5, 0.7, 0.4]), torch.tensor([0.5, 0.3, 0.2]))


@pytest.fixture(scope="session")
def trained_toy_model():
    """(gmm, sde, score model in eval mode), trained once for the whole run.

    ε-parameterized ScoreMLP, DSM with λ = σ^2, VP SDE, Adam lr 2e-3 with cosine decay, 1500
    steps of 512 fresh mixture samples, t ~ U[1e-3, 1], fixed seeds (1000 steps give an NLL gap
    of 0.049, 500 steps 0.114). One thread: a 128-wide MLP gains nothing from more, and the run
    stays reproducible; the thread count is restored afterwards.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gmm, sde, steps, batch = toy_mixture(), VPSDE(), 1500, 512
        model = EpsToScore(ScoreMLP(2, generator=0), sde)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        g, times = torch.Generator().manual_seed(0), UniformTimeSampler(1e-3, 1.0)
        for _ in range(steps):
            x0 = gmm.sample(batch, g)
            t = times.sample(batch, g)
            loss = denoising_score_matching(model, sde, x0, t, SigmaSquaredWeighting(), g).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        yield gmm, sde, model.eval()
    finally:
        torch.set_num_threads(n_threads)
