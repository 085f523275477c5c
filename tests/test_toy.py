"""GaussianMixture against exact oracles (autograd, quadrature, moments) and the toy datasets."""

import math

import pytest
import torch

from lsgm_edu.toy import (
    TOY_DATASETS,
    GaussianMixture,
    eight_gaussians,
    eight_gaussians_mixture,
    sample_toy,
)


def random_mixture(seed, k, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k, d, generator=g, dtype=dtype)
    stds = 0.3 + 1.5 * torch.rand(k, generator=g, dtype=dtype)
    weights = 0.05 + torch.rand(k, generator=g, dtype=dtype)  # unequal, unnormalized
    return GaussianMixture(means, stds, weights), g


def log_prob_reference(gmm, x):
    """Sum of densities written out component by component with torch.distributions."""
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for mu, s, w in zip(gmm.means, gmm.stds, gmm.weights):
        comp = torch.distributions.Normal(mu, s).log_prob(x).sum(-1)
        total = total + w * comp.exp()
    return total.log()


CONFIGS = [
    (seed, k, d)
    for seed, (k, d) in enumerate([(1, 1), (2, 1), (3, 2), (8, 2), (5, 3), (8, 5), (4, 5), (1, 4)])
]


@pytest.mark.parametrize("seed,k,d", CONFIGS)
def test_score_equals_autograd_of_log_prob(seed, k, d):
    gmm, g = random_mixture(seed, k, d)
    # points near the modes, between them, and far out in the tails
    x = torch.cat([gmm.sample(200, g), 6.0 * torch.randn(100, d, generator=g, dtype=torch.float64)])
    x.requires_grad_(True)
    (auto,) = torch.autograd.grad(gmm.log_prob(x).sum(), x)
    score = gmm.score(x.detach())
    err = (score - auto).norm(dim=-1)
    assert torch.all(err <= 1e-8 * auto.norm(dim=-1) + 1e-12), err.max()


@pytest.mark.parametrize("seed,k,d", CONFIGS)
def test_log_prob_matches_componentwise_reference(seed, k, d):
    gmm, g = random_mixture(seed, k, d)
    x = torch.cat([gmm.sample(100, g), 4.0 * torch.randn(50, d, generator=g, dtype=torch.float64)])
    torch.testing.assert_close(gmm.log_prob(x), log_prob_reference(gmm, x), rtol=1e-10, atol=1e-10)


def test_log_prob_normalizes_1d():
    gmm = GaussianMixture([[-2.0], [0.5], [3.0]], [0.3, 1.0, 0.6], [0.2, 0.5, 0.3])
    gmm = gmm.to(dtype=torch.float64)
    grid = torch.linspace(-15, 15, 6001, dtype=torch.float64)
    p = gmm.log_prob(grid[:, None]).exp()
    assert torch.trapezoid(p, grid).item() == pytest.approx(1.0, abs=1e-6)


def test_log_prob_normalizes_2d():
    gmm, _ = random_mixture(3, 4, 2)
    lo = (gmm.means.min(0).values - 8 * gmm.stds.max()).tolist()
    hi = (gmm.means.max(0).values + 8 * gmm.stds.max()).tolist()
    xs = torch.linspace(lo[0], hi[0], 500, dtype=torch.float64)
    ys = torch.linspace(lo[1], hi[1], 500, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    p = gmm.log_prob(torch.stack([gx, gy], -1)).exp()  # also checks [..., D] inputs
    integral = torch.trapezoid(torch.trapezoid(p, ys, dim=1), xs)
    assert integral.item() == pytest.approx(1.0, abs=1e-4)


def test_responsibilities_sum_to_one_and_match_bayes_rule():
    gmm, g = random_mixture(5, 6, 3)
    x = 4.0 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    r = gmm.responsibilities(x)
    torch.testing.assert_close(r.sum(-1), torch.ones(300, dtype=torch.float64))
    joint = torch.stack(
        [
            w * torch.distributions.Normal(mu, s).log_prob(x).sum(-1).exp()
            for mu, s, w in zip(gmm.means, gmm.stds, gmm.weights)
        ],
        -1,
    )
    torch.testing.assert_close(r, joint / joint.sum(-1, keepdim=True), rtol=1e-8, atol=1e-12)
    assert torch.equal(gmm.component_of(x), r.argmax(-1))
    assert gmm.component_of(x).dtype == torch.long


def test_sample_moments_match_mixture():
    gmm, _ = random_mixture(7, 4, 3)
    n = 200_000
    x = gmm.sample(n, torch.Generator().manual_seed(0))
    w, mu, var = gmm.weights, gmm.means, gmm.stds**2
    mean = w @ mu
    second = (
        w[:, None, None]
        * (var[:, None, None] * torch.eye(3, dtype=torch.float64) + mu[:, :, None] * mu[:, None, :])
    ).sum(0)
    cov = second - torch.outer(mean, mean)
    # standard errors of the sample mean and of each sample covariance entry, from n
    assert torch.all((x.mean(0) - mean).abs() < 5 * (cov.diagonal() / n).sqrt())
    xc = x - mean
    prod = xc[:, :, None] * xc[:, None, :]
    se_cov = prod.std(0) / math.sqrt(n)
    assert torch.all((prod.mean(0) - cov).abs() < 5 * se_cov)


def test_sample_component_frequencies_match_weights():
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    means = torch.tensor(
        [[30.0, 0.0], [-30.0, 0.0], [0.0, 30.0], [0.0, -30.0]], dtype=torch.float64
    )
    gmm = GaussianMixture(means, 1.0, weights)  # modes 30 std apart: component_of is exact
    n = 40_000
    counts = torch.bincount(
        gmm.component_of(gmm.sample(n, torch.Generator().manual_seed(1))), minlength=4
    ).double()
    se = (n * weights * (1 - weights)).sqrt()
    assert torch.all((counts - n * weights).abs() < 5 * se), counts


def test_component_fractions_counts_points_per_most_probable_component():
    gmm = GaussianMixture(torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]]), 0.5)
    x = torch.tensor([[-3.1, 0.2], [2.9, -0.1], [3.2, 0.1], [3.0, 0.3], [0.1, 2.8]])
    frac = gmm.component_fractions(x)
    assert torch.equal(frac, torch.tensor([1 / 5, 3 / 5, 1 / 5]))
    assert frac.dtype == x.dtype and frac.shape == (3,)


def test_generator_makes_sampling_reproducible_without_global_rng():
    gmm, _ = random_mixture(2, 3, 2)
    torch.manual_seed(0)
    a = gmm.sample(50, torch.Generator().manual_seed(11))
    torch.manual_seed(999)
    state = torch.get_rng_state()
    b = gmm.sample(50, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())  # the global generator was not used
    assert not torch.equal(a, gmm.sample(50, torch.Generator().manual_seed(12)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_means(dtype):
    gmm = GaussianMixture(torch.zeros(2, 3, dtype=dtype), torch.ones(2, dtype=torch.float64))
    assert gmm.stds.dtype == dtype and gmm.weights.dtype == dtype
    x = gmm.sample(10, torch.Generator().manual_seed(0))
    assert x.dtype == dtype and x.device == gmm.means.device
    assert gmm.dim == 3 and gmm.n_components == 2
    other = torch.float32 if dtype == torch.float64 else torch.float64
    moved = gmm.to(dtype=other)
    assert moved.means.dtype == other and moved.stds.dtype == other
    assert gmm.log_prob(x).dtype == dtype and gmm.score(x).dtype == dtype
    # evaluation follows its input x
    assert gmm.log_prob(x.to(other)).dtype == other


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_follows_means():
    gmm = GaussianMixture(torch.zeros(2, 2, device="cuda"), 1.0)
    x = gmm.sample(10, torch.Generator(device="cuda").manual_seed(0))
    assert x.is_cuda and gmm.log_prob(x).is_cuda and gmm.score(x).is_cuda
    assert sample_toy("rings", 5, torch.Generator(device="cuda").manual_seed(0)).is_cuda


def test_array_like_inputs_and_scalar_std():
    gmm = GaussianMixture([[0.0, 0.0], [1.0, 1.0]], 0.5)
    assert gmm.means.dtype == torch.get_default_dtype()
    torch.testing.assert_close(gmm.stds, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(gmm.weights, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"means": torch.zeros(3), "stds": 1.0}, "means must have shape"),
        (
            {"means": torch.zeros(3, 2), "stds": torch.ones(2)},
            "stds must be a scalar or have shape",
        ),
        ({"means": torch.zeros(3, 2), "stds": torch.tensor([1.0, -1.0, 1.0])}, "stds must be"),
        ({"means": torch.zeros(3, 2), "stds": 0.0}, "> 0"),
        (
            {"means": torch.zeros(3, 2), "stds": 1.0, "weights": torch.ones(2)},
            "weights must have shape",
        ),
        (
            {"means": torch.zeros(3, 2), "stds": 1.0, "weights": torch.tensor([1.0, -0.5, 1.0])},
            ">= 0",
        ),
        ({"means": torch.zeros(3, 2), "stds": 1.0, "weights": torch.zeros(3)}, "sum to 0"),
    ],
)
def test_bad_parameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_bad_evaluation_inputs_raise():
    gmm = GaussianMixture(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match=r"D = 3"):
        gmm.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        gmm.sample(0)


# --- toy datasets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_datasets_shape_dtype_and_reproducibility(name):
    torch.manual_seed(0)
    x = sample_toy(name, 500, torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    y = TOY_DATASETS[name](500, torch.Generator().manual_seed(3))
    assert x.shape == (500, 2) and x.dtype == torch.float32
    assert torch.equal(x, y)
    assert torch.isfinite(x).all()
    assert x.abs().max() < 6.0  # every default dataset lives in the book's [-6, 6]^2 window
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        TOY_DATASETS[name](0)


def test_sample_toy_unknown_name():
    with pytest.raises(ValueError, match="choose one of"):
        sample_toy("spiral", 10)


def test_checkerboard_lands_on_dark_squares():
    x = sample_toy("checkerboard", 4000, torch.Generator().manual_seed(0))
    assert x.min() >= -4.0 and x.max() <= 4.0
    cell = torch.floor((x + 4.0) / 2.0).long()  # 4 x 4 board of width-2 cells
    assert torch.all(cell.sum(-1) % 2 == 0)
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    assert (counts > 0).sum() == 8


def test_rings_radii():
    x = sample_toy("rings", 4000, torch.Generator().manual_seed(0), noise=0.0, radii=(1.0, 2.5))
    r = x.norm(dim=-1)
    on_ring = torch.minimum((r - 1.0).abs(), (r - 2.5).abs())
    assert on_ring.max() < 1e-5
    # rings are picked proportional to radius: P(inner) = 1 / 3.5
    frac = (r < 1.5).double().mean().item()
    assert abs(frac - 1 / 3.5) < 5 * math.sqrt((1 / 3.5) * (2.5 / 3.5) / 4000)


def test_two_moons_without_noise_lies_on_the_half_circles():
    x = sample_toy("two_moons", 2000, torch.Generator().manual_seed(0), noise=0.0, scale=1.0)
    raw = x.double() + torch.tensor([0.5, 0.25], dtype=torch.float64)
    upper = (raw.norm(dim=-1) - 1.0).abs() < 1e-5
    lower = ((raw - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=-1) - 1.0).abs() < 1e-5
    assert torch.all(upper | lower)
    assert 0.4 < upper.double().mean() < 0.6


def test_eight_gaussians_is_a_sample_of_its_mixture():
    gmm = eight_gaussians_mixture(radius=2.0, std=0.1, dtype=torch.float64)
    assert gmm.n_components == 8
    torch.testing.assert_close(gmm.means.norm(dim=-1), torch.full((8,), 2.0, dtype=torch.float64))
    x = eight_gaussians(8000, torch.Generator().manual_seed(0), radius=2.0, std=0.1)
    counts = torch.bincount(gmm.component_of(x.double()), minlength=8).double()
    se = math.sqrt(8000 * (1 / 8) * (7 / 8))
    assert torch.all((counts - 1000).abs() < 5 * se)
    dist = (x.double() - gmm.means[gmm.component_of(x.double())]).norm(dim=-1)
    # |x - mu|^2 / std^2 ~ chi^2_2 with mean 2
    assert abs((dist**2).mean().item() / 0.01 - 2.0) < 5 * 2.0 / math.sqrt(8000)
