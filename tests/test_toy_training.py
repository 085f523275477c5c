"""The toy training loop: it learns the exact score of a small Gaussian mixture, replays exactly
from a seed, and rejects bad arguments with errors that name them."""

import pytest
import torch

from lsgm_edu.losses import explicit_score_matching
from lsgm_edu.nets import ScoreMLP
from lsgm_edu.toy import GaussianMixture
from lsgm_edu.toy_training import train_toy_score_model

STEPS, BATCH, LR = 300, 256, 5e-3


@pytest.fixture(autouse=True)
def one_thread():
    """A width-32 MLP gains nothing from more threads, and loses much on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small_mixture():
    """Two broad 2-D modes: a score an MLP of width 32 learns in a few hundred steps."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5]])
    return GaussianMixture(means, torch.tensor([0.6, 0.8]), torch.tensor([0.6, 0.4]))


def as_score(net):
    """The net at the constant t = 1, as a score x -> like x (chapter 2's use of ScoreMLP)."""
    return lambda x: net(x, torch.ones(len(x), dtype=x.dtype))


def esm_loss(net, x, g):
    """Explicit score matching: regression onto the exact mixture score (Hyvärinen 2005, eq. 2)."""
    return explicit_score_matching(as_score(net), x, small_mixture().score)


def train(seed=0, steps=STEPS, **kw):
    net = ScoreMLP(2, hidden=32, depth=2, generator=seed)
    return train_toy_score_model(
        net, esm_loss, small_mixture().sample, steps, batch_size=BATCH, lr=LR, generator=gen(seed),
        **kw,
    )


def fisher_divergence(net, gmm):
    """1/2 E_p |s - ∇log p|^2 on 4000 held-out points, with the exact mixture score."""
    x = gmm.sample(4000, gen(123))
    with torch.no_grad():
        return explicit_score_matching(as_score(net), x, gmm.score).mean().item()


def test_learns_the_exact_score_of_a_gaussian_mixture():
    gmm = small_mixture()
    before = fisher_divergence(ScoreMLP(2, hidden=32, depth=2, generator=0), gmm)
    net, losses = train()
    after = fisher_divergence(net, gmm)
    # measured: 1.95 before, 0.022 after (E_p |∇log p|^2 / 2 is about 1.3)
    assert after < 0.1 and after < before / 20, (before, after)
    assert losses.shape == (STEPS,) and torch.isfinite(losses).all()
    # the ESM loss is the Fisher divergence on each minibatch: it falls with it
    assert losses[-50:].mean() < 0.1 * losses[:50].mean()
    assert not net.training


def test_deterministic_given_the_seed():
    net_a, losses_a = train(seed=1, steps=20)
    net_b, losses_b = train(seed=1, steps=20)
    assert torch.equal(losses_a, losses_b)
    assert all(torch.equal(a, b) for a, b in zip(net_a.parameters(), net_b.parameters()))
    _, losses_c = train(seed=2, steps=20)
    assert not torch.equal(losses_a, losses_c)


def test_schedule_changes_the_run_and_keeps_its_start():
    _, cosine = train(steps=20)
    _, constant = train(steps=20, schedule="constant")
    # the first step uses the full lr either way; later steps differ
    assert cosine[:2].tolist() == constant[:2].tolist()
    assert not torch.equal(cosine, constant)


@pytest.mark.parametrize(
    "kw,err,match",
    [
        ({"steps": 0}, ValueError, "steps must be an int >= 1"),
        ({"steps": 2.5}, ValueError, "steps must be an int >= 1"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"lr": -1e-3}, ValueError, "lr must be a positive finite number"),
        ({"lr": float("nan")}, ValueError, "lr must be a positive finite number"),
        ({"schedule": "linear"}, ValueError, "schedule must be one of"),
        ({"model": lambda x, t: x}, TypeError, "model must be an nn.Module"),
        ({"loss_fn": "dsm"}, TypeError, "loss_fn must be callable"),
        ({"sample_batch": None}, TypeError, "sample_batch must be callable"),
        ({"loss_fn": lambda net, x, g: esm_loss(net, x, g).mean()}, ValueError, "per-sample"),
        ({"loss_fn": lambda net, x, g: esm_loss(net, x, g) * float("nan")}, FloatingPointError,
         "at step 0"),
    ],
)
def test_bad_arguments_give_clear_errors(kw, err, match):
    args = {"model": ScoreMLP(2, hidden=8, depth=1), "loss_fn": esm_loss,
            "sample_batch": small_mixture().sample, "steps": 3, "batch_size": 16}
    args.update(kw)
    with pytest.raises(err, match=match):
        train_toy_score_model(**args, generator=gen(0))
