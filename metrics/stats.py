"""Statistics on detector features: running float64 moments, Fréchet distance, KID, precision/recall.

Fréchet distance (Heusel et al. 2017, arXiv 1706.08500): ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
tr((S1 S2)^(1/2)) is the sum of the singular values of S1^(1/2) S2^(1/2) (the eigenvalues of S1 S2 are the squared
singular values of that product), with each root from a symmetric eigendecomposition (eigenvalues clamped at 0).
No complex sqrtm, none of scipy's sqrtm regressions (pytorch-fid #100/#103), and no square root of eigenvalues
that are zero up to round-off, so identical statistics give 0 to ~1e-12 even when the covariance is singular
(fewer samples than dimensions). Everything is float64.
KID: Bińkowski et al. 2018, arXiv 1801.01401 (unbiased MMD^2, cubic polynomial kernel, averaged over subsets).
Precision/recall: Kynkäänniemi et al. 2019, arXiv 1904.06991 (k-NN balls around real / generated features).
"""

import numpy as np
import torch


class FeatureMoments:
    """Running sums of features and their outer products in float64, mergeable across processes."""

    def __init__(self, dim: int):
        self.dim, self.n = dim, 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def all_reduce(self, accelerator) -> None:
        """Sum the moments of every process (in float64, on the accelerator's device)."""
        if accelerator.num_processes == 1:
            return
        device = accelerator.device
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.sum_outer.flatten()])
        packed = accelerator.reduce(packed.to(device), reduction="sum").cpu()
        self.n = int(round(packed[0].item()))
        self.sum, self.sum_outer = packed[1 : 1 + self.dim], packed[1 + self.dim :].view(self.dim, self.dim)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    tr_covmean = np.linalg.svd(_sqrt_psd(sigma1) @ _sqrt_psd(sigma2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kid(real: np.ndarray, fake: np.ndarray, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0):
    """Kernel Inception Distance: mean and std over subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors on each side")
    d, rng, values = real.shape[1], np.random.default_rng(seed), []
    for _ in range(n_subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(off_diag - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def _knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for start in range(0, len(feats), chunk):
        dists = torch.cdist(feats[start : start + chunk], feats)
        radii.append(dists.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of `points` inside at least one ball (center, radius)."""
    inside = []
    for start in range(0, len(points), chunk):
        dists = torch.cdist(points[start : start + chunk], centers)
        inside.append((dists <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake manifold)."""
    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    precision = _coverage(fake_t, real_t, _knn_radii(real_t, k))
    recall = _coverage(real_t, fake_t, _knn_radii(fake_t, k))
    return precision, recall
