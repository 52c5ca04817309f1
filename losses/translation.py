"""Losses of image-to-image translation (translate.py). Discriminators output patch maps of logits (N, h, w); every
function here returns one value per sample (N,): the mean over that sample's patches and pixels. The script weights
and reduces them."""

import torch

from losses.gan import _bce_logits
from modelling.common import at_least_fp32


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): the mean over everything but the batch, in fp32."""
    return at_least_fp32(x).flatten(1).mean(dim=1)


def l1_distance(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample, over channels and pixels (images in [-1, 1])."""
    return per_sample_mean((at_least_fp32(outputs) - at_least_fp32(targets)).abs())


# pix2pix: Isola et al. 2017, arXiv 1611.07004, Eq. 4: G* = arg min_G max_D L_cGAN(G, D) + lambda L_L1(G), lambda =
# 100; D sees (input, image) pairs; "we divide the objective by 2 while optimizing D" (Sec. 3.3); G uses the
# non-saturating form, log D(x, G(x)). Ref: gau-nernst/gan train_pix2pix.py (L1 x 100), Ganzo loss.py (whose L1 is
# over the concatenated pair: here over the output only, as pix2pix's Eq. 3 writes it).
class Pix2PixLoss:
    def __init__(self, l1_weight: float = 100.0):
        self.l1_weight = l1_weight

    def d_loss(self, d_reals: torch.Tensor, d_fakes: torch.Tensor) -> torch.Tensor:
        """0.5 * (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)), each averaged over the patches."""
        return 0.5 * (per_sample_mean(_bce_logits(d_reals, 1.0)) + per_sample_mean(_bce_logits(d_fakes, 0.0)))

    def g_loss(self, d_fakes: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE(D(x, G(x)), 1) + lambda * |G(x) - y|_1 (mean over pixels)."""
        return per_sample_mean(_bce_logits(d_fakes, 1.0)) + self.l1_weight * l1_distance(outputs, targets)


# LSGAN: Mao et al. 2017, arXiv 1611.04076 (a = 0, b = c = 1), CycleGAN's adversarial loss (Zhu et al. 2017, arXiv
# 1703.10593, Sec. 4 "Training details": least squares, D objective divided by 2).
class LeastSquaresLoss:
    def d_loss(self, d_reals: torch.Tensor, d_fakes: torch.Tensor) -> torch.Tensor:
        return 0.5 * (per_sample_mean((at_least_fp32(d_reals) - 1).square()) + per_sample_mean(d_fakes.square()))

    def g_loss(self, d_fakes: torch.Tensor) -> torch.Tensor:
        return per_sample_mean((at_least_fp32(d_fakes) - 1).square())


# CycleGAN: Zhu et al. 2017, Eq. 2: L_cyc = E|F(G(a)) - a|_1 + E|G(F(b)) - b|_1 (weight lambda = 10 in the script);
# identity loss (Sec. 5.2, photo generation from paintings): E|G(b) - b|_1 + E|F(a) - a|_1, weight 0.5 lambda in the
# reference code.
def cycle_loss(gen_ab, gen_ba, reals_a: torch.Tensor, reals_b: torch.Tensor, fakes_b=None, fakes_a=None):
    """Per-sample |F(G(a)) - a|_1 + |G(F(b)) - b|_1 (means over pixels). `fakes_b` = G(a) and `fakes_a` = F(b) may
    be passed when the caller has them already."""
    fakes_b = gen_ab(reals_a) if fakes_b is None else fakes_b
    fakes_a = gen_ba(reals_b) if fakes_a is None else fakes_a
    return l1_distance(gen_ba(fakes_b), reals_a) + l1_distance(gen_ab(fakes_a), reals_b)


def identity_loss(gen_ab, gen_ba, reals_a: torch.Tensor, reals_b: torch.Tensor) -> torch.Tensor:
    """Per-sample |G(b) - b|_1 + |F(a) - a|_1: each generator should leave images of its target domain unchanged."""
    return l1_distance(gen_ab(reals_b), reals_b) + l1_distance(gen_ba(reals_a), reals_a)
