"""Closed-form denoisers of Gaussian data and Gaussian mixtures, as denoiser modules that the
samplers and losses accept in place of a trained network."""

import torch
from torch import nn

from modelling.precond import EDMDenoiser, FollmerDenoiser


class _NoNet(nn.Module):
    """Stands in for the network: the closed-form denoisers override forward and never call it."""

    def __init__(self, shape: tuple[int, ...], n_classes: int = 0):
        super().__init__()
        self.sample_shape, self.n_classes = shape, n_classes
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the sampler a device to read


def _mixture_posterior_mean(x, means, stds, weights, alpha, beta):
    """E[x0 | x_t = x] for x0 ~ sum_k w_k N(mu_k, s_k² I) and x_t = alpha·x0 + beta·z (float64); alpha and beta
    are per-sample (B, 1)."""
    x = x.double().flatten(1)  # (B, d)
    d = x.shape[1]
    var_t = alpha**2 * stds**2 + beta**2  # (B, K) marginal variance of x_t under component k
    diff = x[:, None, :] - alpha[:, :, None] * means[None]  # (B, K, d)
    log_r = weights.log() - 0.5 * (diff**2).sum(-1) / var_t - 0.5 * d * var_t.log()
    resp = log_r.softmax(dim=1)  # responsibilities, via log-sum-exp
    post = means[None] + (alpha * stds**2 / var_t)[:, :, None] * diff  # per-component posterior means
    return (resp[:, :, None] * post).sum(1)


class MixtureMixin:
    def setup_mixture(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(len(self.means))
        k = len(self.means)
        self.weights = torch.full((k,), 1 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)

    def forward(self, x, t, labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])[:, None]  # (B, 1)
        mean = _mixture_posterior_mean(x, self.means, self.stds, self.weights, self.alpha(t), self.beta(t))
        return mean.reshape(x.shape)

    def moments(self):
        mean = (self.weights[:, None] * self.means).sum(0)
        second = sum(
            w * (torch.outer(m, m) + s**2 * torch.eye(len(m), dtype=torch.float64))
            for w, m, s in zip(self.weights, self.means, self.stds, strict=True)
        )
        return mean, second - torch.outer(mean, mean)


class EDMMixture(MixtureMixin, EDMDenoiser):
    def __init__(self, means, stds, weights=None):
        EDMDenoiser.__init__(self, _NoNet((len(means[0]),)))
        self.setup_mixture(means, stds, weights)


class FollmerMixture(MixtureMixin, FollmerDenoiser):
    def __init__(self, means, stds, weights=None):
        FollmerDenoiser.__init__(self, _NoNet((len(means[0]),)))
        self.setup_mixture(means, stds, weights)
        self.data_mean.copy_(self.moments()[0].float())
