"""AC-GAN: a class-conditional DCGAN whose discriminator also classifies its input.

Paper: Odena, Olah & Shlens 2017, "Conditional Image Synthesis with Auxiliary Classifier GANs", arXiv 1610.09585
(Sec. 3: G gets the noise and the class; D has a source head and a class head on a shared trunk; D maximises
L_S + L_C, G maximises L_C - L_S, with L_C the log-likelihood of the correct class on reals *and* fakes). The
losses are in `losses/auxiliary.py`; the script adds them.

Layout: G is genzoo's DCGAN generator with its label embedding concatenated to z (an embedding is a linear map of
the one-hot vector, the paper's input); D is DCGAN's discriminator trunk (every layer but the last) followed by two
k4 s1 p0 convs over the final 4x4 map: source logit (N,) and class logits (N, n_classes).
Deviations: the paper's ImageNet/CIFAR networks (dropout in D, fully connected first G layer) are replaced by the
DCGAN layout of `modelling/dcgan.py`, so AC-GAN and conditional DCGAN differ only in how D uses the label. D never
sees the label: `forward(imgs, labels)` ignores `labels` (the scripts pass it to every D).
Not implemented: the paper's 100 separate AC-GANs for ImageNet classes. Reference code: none read (gau-nernst/gan
lists AC-GAN as TODO).
"""

import torch
from torch import nn

from modelling import dcgan
from modelling.common import apply_spectral_norm, init_dcgan

Generator = dcgan.Generator  # concat(z, embed(y)) -> DCGAN generator: the paper's "noise plus class" input


class Discriminator(nn.Module):
    def __init__(
        self,
        img_size: int = 32,
        img_channels: int = 1,
        base_dim: int = 64,  # channels of the first conv; doubled at every halving (as DCGAN)
        norm: str = "batch",  # "batch" | "none" (WGAN-GP critic, SN)
        n_classes: int = 0,  # class logits of the auxiliary head; 0 = no head (a plain DCGAN D)
        spectral_norm: bool = False,
    ):
        super().__init__()
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, n_classes
        layers = dcgan.Discriminator(img_size, img_channels, base_dim, norm).net
        head = layers[-1]  # DCGAN's final k4 s1 p0 conv over the 4x4 map, replaced by the two heads
        self.trunk = layers[:-1]
        self.source = nn.Conv2d(head.in_channels, 1, 4, 1, 0)
        self.classes = nn.Conv2d(head.in_channels, n_classes, 4, 1, 0) if n_classes else None
        self.reset_parameters()
        if spectral_norm:
            apply_spectral_norm(self)

    def reset_parameters(self) -> None:
        init_dcgan(self)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None, aux: bool = False):
        """Source logits (N,); with `aux=True` also the class logits (N, n_classes). `labels` is not used."""
        h = self.trunk(imgs)  # (N, C, 4, 4)
        source = self.source(h).flatten()
        if not aux:
            return source
        if self.classes is None:
            raise ValueError("this AC-GAN discriminator has no class head (n_classes=0)")
        return source, self.classes(h).flatten(1)
