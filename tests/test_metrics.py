"""Sliced Wasserstein against exact values: 1-D W2, translations, and symmetries."""

import math

import pytest
import torch

from lsgm_edu.metrics import sliced_wasserstein


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_zero_for_identical_sets():
    x = torch.randn(300, 4, generator=gen(), dtype=torch.float64)
    assert sliced_wasserstein(x, x.clone(), generator=gen(1)).item() == 0.0


def test_one_dimension_is_exact_w2():
    # in 1-D every projection is +1 or -1, and W2 between equal-size sets pairs sorted points
    x = torch.randn(500, 1, generator=gen(0), dtype=torch.float64)
    y = 0.5 + 2.0 * torch.rand(500, 1, generator=gen(1), dtype=torch.float64)
    exact = (x.sort(0).values - y.sort(0).values).pow(2).mean().sqrt()
    sw = sliced_wasserstein(x, y, n_projections=7, generator=gen(2))
    torch.testing.assert_close(sw, exact, rtol=1e-12, atol=0)


def test_invariant_to_permutation_and_symmetric():
    x = torch.randn(400, 3, generator=gen(0), dtype=torch.float64)
    y = torch.randn(400, 3, generator=gen(1), dtype=torch.float64) + 0.3
    sw = sliced_wasserstein(x, y, 64, gen(5))
    perm = torch.randperm(400, generator=gen(2))
    torch.testing.assert_close(sliced_wasserstein(x[perm], y, 64, gen(5)), sw, rtol=1e-12, atol=0)
    torch.testing.assert_close(sliced_wasserstein(y, x, 64, gen(5)), sw, rtol=1e-12, atol=0)


@pytest.mark.parametrize("d", [2, 5])
def test_translation_gives_shift_norm_over_sqrt_dim(d):
    # y = x + m: every sorted difference is theta . m, so SW2^2 = mean_theta (theta . m)^2,
    # whose expectation is |m|^2 / D; (theta . m)^2 / |m|^2 ~ Beta(1/2, (D-1)/2).
    n_proj = 4096
    x = torch.randn(1000, d, generator=gen(0), dtype=torch.float64)
    m = torch.randn(d, generator=gen(1), dtype=torch.float64) * 2.0
    sw2 = sliced_wasserstein(x, x + m, n_proj, gen(2)).item() ** 2
    mean = m.pow(2).sum().item() / d
    sd_one = mean * math.sqrt(2 * (d - 1) / (d + 2))  # sd of (theta . m)^2
    assert abs(sw2 - mean) < 4 * sd_one / math.sqrt(n_proj)


def test_positive_for_shifted_distribution_and_above_iid_baseline():
    a, b = (torch.randn(2000, 2, generator=gen(i)) for i in range(2))
    c = torch.randn(2000, 2, generator=gen(3)) + torch.tensor([1.0, 0.0])
    baseline = sliced_wasserstein(a, b, 256, gen(9))
    shifted = sliced_wasserstein(a, c, 256, gen(9))
    assert shifted > 5 * baseline > 0
    assert shifted.ndim == 0 and shifted.dtype == torch.float32


def test_generator_reproducible_and_no_global_rng():
    x, y = torch.randn(100, 3, generator=gen(0)), torch.randn(100, 3, generator=gen(1))
    torch.manual_seed(0)
    a = sliced_wasserstein(x, y, 16, gen(3))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    assert torch.equal(a, sliced_wasserstein(x, y, 16, gen(3)))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    "x,y,kw,match",
    [
        (torch.zeros(10, 2), torch.zeros(11, 2), {}, "same shape"),
        (torch.zeros(10, 2), torch.zeros(10, 3), {}, "same shape"),
        (torch.zeros(10), torch.zeros(10), {}, r"x must be a float tensor \[N, D\]"),
        (torch.zeros(10, 2), torch.zeros(10, 2), {"n_projections": 0}, "n_projections"),
    ],
)
def test_bad_inputs_raise(x, y, kw, match):
    with pytest.raises(ValueError, match=match):
        sliced_wasserstein(x, y, **kw)
