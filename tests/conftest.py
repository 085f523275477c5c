"""Fixtures shared by the test modules."""

import pytest
import torch

from lsgm_edu.losses import SigmaSquaredWeighting, UniformTimeSampler, denoising_score_matching
from lsgm_edu.nets import ScoreMLP, ScoreModel
from lsgm_edu.sde import VPSDE
from lsgm_edu.toy import GaussianMixture
from lsgm_edu.toy_training import train_toy_score_model


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
        gmm, sde, times = toy_mixture(), VPSDE(), UniformTimeSampler(1e-3, 1.0)

        def loss_fn(model, x0, g):
            t = times.sample(len(x0), g)
            return denoising_score_matching(model, sde, x0, t, SigmaSquaredWeighting(), g)

        model, _ = train_toy_score_model(
            ScoreModel(ScoreMLP(2, generator=0), sde, time_input="t"),
            loss_fn,
            gmm.sample,
            steps=1500,
            batch_size=512,
            lr=2e-3,
            schedule="cosine",
            generator=torch.Generator().manual_seed(0),
        )
        yield gmm, sde, model
    finally:
        torch.set_num_threads(n_threads)


@pytest.fixture
def replay_seed(request):
    """A fresh random seed for a randomized test, printed so a failure can be replayed:
    LSGM_EDU_TEST_SEED=<seed> pytest <test> draws the same numbers again."""
    import os
    import random

    seed = int(os.environ.get("LSGM_EDU_TEST_SEED", random.randrange(2**32)))
    print(f"{request.node.nodeid}: seed {seed} (replay with LSGM_EDU_TEST_SEED={seed})")
    return seed
