"""Structural similarity (SSIM) per image, as Wang et al. 2004 define it ("Image Quality Assessment: From Error
Visibility to Structural Similarity", IEEE TIP 13(4), Eqs. 13-16 and Sec. III-C): local means, variances and
covariance under an 11x11 Gaussian window of std 1.5 (normalised to sum 1, "valid" positions only, population
moments as in the authors' MATLAB `ssim_index`), C1 = (0.01 L)^2, C2 = (0.03 L)^2, and the mean of the SSIM map over
positions and channels. Images smaller than the window use a window of their own size (odd, Gaussian of std 1.5)."""

import torch
import torch.nn.functional as F


def _window(size: int, sigma: float, dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5):
    """Per-image SSIM (N,) of two batches (N, C, H, W) with values in [0, data_range]; computed in float64."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    g = _window(size, sigma, torch.float64).to(x.device)
    c = x.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian filter per channel, valid positions
        t = F.conv2d(t, g.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return F.conv2d(t, g.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)

    x, y = x.double(), y.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)
