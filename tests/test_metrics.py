"""Metric maths against closed forms, the detectors' loading paths, and fid.py against pytorch-fid."""

import numpy as np
import pytest
import scipy.linalg
import torch

from metrics.detectors import INCEPTION_FILE, fid_inception_v3, load_inception
from metrics.stats import FeatureMoments, frechet_distance, kid, precision_recall
from utils.cli import UserError


def _random_spd(d: int, rng) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = _random_spd(16, rng)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)


def test_known_square_roots():
    rng = np.random.default_rng(1)
    # Commuting diagonal covariances: FD = sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    assert frechet_distance(np.zeros(8), np.diag(a), np.zeros(8), np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-10
    )
    # S1 = A^2, S2 = I: tr sqrt(S1 S2) = tr A.
    root = _random_spd(10, rng)
    expected = np.trace(root @ root) + 10 - 2 * np.trace(root)
    assert frechet_distance(np.zeros(10), root @ root, np.zeros(10), np.eye(10)) == pytest.approx(expected, rel=1e-9)
    # General SPD pair: agrees with the scipy sqrtm formula (pytorch-fid's).
    s1, s2 = _random_spd(32, rng), _random_spd(32, rng)
    reference = np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(np.zeros(32), s1, np.zeros(32), s2) == pytest.approx(reference, rel=1e-8)


def test_identical_inputs_give_zero_even_when_rank_deficient():
    rng = np.random.default_rng(2)
    for n, d in ((5000, 64), (100, 256)):  # the second covariance is singular (n < d)
        moments = FeatureMoments(d)
        moments.update(torch.from_numpy(rng.standard_normal((n, d)) * 3 + 1))
        mu, sigma = moments.mean_cov()
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_moments_match_numpy_and_do_not_depend_on_batching():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1000, 12)) * 5 + 2
    results = []
    for batch in (1, 7, 1000):
        moments = FeatureMoments(12)
        for start in range(0, 1000, batch):
            moments.update(torch.from_numpy(feats[start : start + batch]).float())
        results.append(moments.mean_cov())
    f32 = feats.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(results[0][0], f32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(results[0][1], np.cov(f32, rowvar=False), rtol=1e-10, atol=1e-12)
    for mu, sigma in results[1:]:
        np.testing.assert_allclose(mu, results[0][0], rtol=1e-12)
        np.testing.assert_allclose(sigma, results[0][1], rtol=1e-10, atol=1e-12)


def test_kid_and_precision_recall():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((2000, 8))
    same = rng.standard_normal((2000, 8))
    shifted = same + 1.5
    kid_same, _ = kid(real, same, n_subsets=20, subset_size=500)
    kid_shifted, _ = kid(real, shifted, n_subsets=20, subset_size=500)
    assert abs(kid_same) < 0.02 and kid_shifted > 0.5
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    far = real + 100
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # Mode collapse: fakes cover one corner of the real data: high precision, low recall.
    collapsed = real[real[:, 0] > 1.0]
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision > 0.95 and recall < 0.6  # k-NN balls of the sparse fakes are wide in 8-D: 0.43 here


def _kid_brute_force(x, y) -> float:
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ (Bińkowski et al. 2018, Eq. 2 and Sec. 3), written as sums."""
    m, d = len(x), len(x[0])

    def kernel(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1) ** 3

    same = sum(kernel(u[i], u[j]) for u in (x, y) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return same - 2 * sum(kernel(a, b) for a in x for b in y) / m**2


def _precision_recall_brute_force(real, fake, k):
    """Kynkäänniemi et al. 2019, Eq. 1-3: a point is in a set's manifold if it lies within (<=) the distance from
    some member to that member's k-th nearest other member."""

    def dist(a, b):
        return sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) ** 0.5

    def coverage(points, members):
        radii = [sorted(dist(p, q) for j, q in enumerate(members) if j != i)[k - 1] for i, p in enumerate(members)]
        return sum(any(dist(p, q) <= r for q, r in zip(members, radii, strict=True)) for p in points) / len(points)

    return coverage(fake, real), coverage(real, fake)


def test_kid_and_precision_recall_on_values_worked_by_hand():
    """1-D sets small enough to work out on paper.
    KID, x = {0, 1}, y = {1, 2}, k(a, b) = (ab + 1)³: off-diagonal k_xx = k(0, 1) = 1, k_yy = k(1, 2) = 27, and
    mean k_xy = (1 + 1 + 8 + 27)/4 = 9.25, so MMD² = 1 + 27 - 2·9.25 = 9.5 (a quadratic kernel gives 2.5, the
    biased estimator 31). Every subset of size 2 is the whole set, so the std over subsets is 0.
    Precision/recall, real = {0, 1, 3, 6, 10}, fake = {-1.5, 2.5, 8.5, 9}, k = 1: real radii (distance to the
    nearest other real) 1, 1, 2, 3, 4; fakes inside a real ball: 2.5 (|2.5 - 3| <= 2), 8.5 and 9 (within 4 of 10),
    not -1.5: precision 3/4. Fake radii 4, 4, 0.5, 0.5; reals inside: 0, 1, 3, 6 (|6 - 2.5| <= 4), not 10:
    recall 4/5. With k = 2 every fake is inside (-1.5 is within 3 of 0): precision 1."""
    x, y = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    assert kid(x, y, n_subsets=3, subset_size=2) == pytest.approx((9.5, 0.0), abs=1e-12)
    real = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    fake = np.array([[-1.5], [2.5], [8.5], [9.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((0.75, 0.8), abs=1e-12)
    assert precision_recall(real, fake, k=2)[0] == pytest.approx(1.0, abs=1e-12)


def test_kid_and_precision_recall_match_brute_force_references():
    """Random 5-D features (d != 1, so the kernel's 1/d matters), KID over the whole sets (subsets of the full size
    are permutations, so one subset is exact) and precision/recall for k = 1, 3, 5 against the loops above."""
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) * 1.3 + 0.4
    assert kid(real, fake, n_subsets=1, subset_size=12)[0] == pytest.approx(
        _kid_brute_force(real.tolist(), fake.tolist()), rel=1e-12
    )
    real, fake = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) + 1.5
    for k in (1, 3, 5):
        expected = _precision_recall_brute_force(real.tolist(), fake.tolist(), k)
        assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12), k
        assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # neither value saturated: the test can tell k apart


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A state dict of the FID Inception architecture with random weights, saved the way the real file is."""
    torch.manual_seed(0)
    net = fid_inception_v3()
    for m in net.modules():  # a well-scaled random init, so that pool3 features are neither 0 nor inf
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight)
    path = tmp_path_factory.mktemp("hub") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_loading_path_and_hash_check(random_inception, tmp_path, monkeypatch):
    detector = load_inception(str(random_inception), verify=False)
    feats = detector(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and feats.std() > 0
    with pytest.raises(UserError, match="is not the FID Inception"):
        load_inception(str(random_inception))  # random weights fail the SHA-256 check: no silent substitute
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(UserError) as err:
        load_inception(None)
    assert INCEPTION_FILE in str(err.value) and "6726825d" in str(err.value) and str(tmp_path) in str(err.value)
    # The torch hub cache is the second place looked in.
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / INCEPTION_FILE).symlink_to(random_inception)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert load_inception(None, verify=False) is not None


def test_inception_refuses_a_pickle_with_code(tmp_path):
    import pickle

    evil = tmp_path / INCEPTION_FILE
    marker = tmp_path / "pwned"
    evil.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(UserError, match="not an FID Inception state dict"):
        load_inception(str(evil), verify=False)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_statistics_match_pytorch_fid_with_the_same_weights(random_inception, tmp_path, monkeypatch):
    """Same random weights, same PNG files: genzoo's mu/sigma equal pytorch-fid's to < 1e-6 relative."""
    import pytorch_fid.inception
    from accelerate import Accelerator
    from pytorch_fid.fid_score import calculate_activation_statistics

    import fid
    from utils.grid import save_png

    rng = torch.Generator().manual_seed(0)
    files = []
    for i in range(24):
        channels = 1 if i % 2 else 3  # greyscale and colour: both go through convert("RGB")
        img = torch.randint(0, 256, (channels, 32, 32), generator=rng, dtype=torch.uint8)
        save_png(img, tmp_path / f"{i:06d}.png")
        files.append(tmp_path / f"{i:06d}.png")

    state = torch.load(random_inception, weights_only=True)
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference_model = pytorch_fid.inception.InceptionV3([3]).eval()
    ref_mu, ref_sigma = calculate_activation_statistics(files, reference_model, batch_size=8, dims=2048)

    cfg = fid.Config(mode="gen", img_folder=str(tmp_path), batch_size=5, detector="inception")
    detector = load_inception(str(random_inception), verify=False)
    dataset, labels = fid.image_source(cfg)
    stats = fid.compute_statistics(cfg, Accelerator(cpu=True), detector, dataset, labels)
    assert int(stats["count"]) == 24 and stats["features"].shape == (24, 2048)
    np.testing.assert_allclose(stats["mu"], ref_mu, rtol=1e-6, atol=1e-6 * np.abs(ref_mu).max())
    np.testing.assert_allclose(stats["sigma"], ref_sigma, rtol=1e-6, atol=1e-6 * np.abs(ref_sigma).max())
