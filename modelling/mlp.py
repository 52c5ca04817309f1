# Small MLP denoiser network for 2-D toy data, where samplers and losses can be checked against closed forms.
# After GPM's Gaussians config (Franceschi et al. 2023, arXiv 2305.16150; White-Link/gpm config/score_gan):
# hidden layers on [x, embedding(c_noise)]. Deviations: width 256 by default (GPM: 512; `width` sets it), SiLU
# instead of leaky ReLU, a positional (not random-Fourier) embedding, so no random buffers need saving; labels add
# a learned embedding.
# `ToyGenerator` is GPM's ScoreGAN generator for the same data (config/score_gan/gaussians): latent -> depth x
# (Linear, ReLU) -> Linear to the data dimension, PyTorch's default init, no output activation.

import torch
import torch.nn.functional as F
from torch import nn

from modelling.common import PositionalEmbedding


class ToyMLP(nn.Module):
    def __init__(
        self,
        dim: int = 2,  # data dimension
        n_classes: int = 0,  # 0 = unconditional
        width: int = 256,
        depth: int = 4,  # hidden layers
        emb_channels: int = 64,  # width of the noise embedding concatenated to the input
        two_time: bool = False,  # characteristic generator: a second time input s, embedded and added
    ):
        super().__init__()
        self.dim, self.n_classes, self.sample_shape = dim, n_classes, (dim,)
        self.map_noise = PositionalEmbedding(emb_channels)
        self.map_label = nn.Embedding(n_classes, emb_channels) if n_classes else None
        self.two_time = two_time
        self.map_s = nn.Linear(emb_channels, emb_channels) if two_time else None
        widths = [dim + emb_channels] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.out = nn.Linear(width, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight)
        if self.map_s is not None:  # a two-time net initialised from a one-time one starts as the same function
            nn.init.zeros_(self.map_s.weight)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The output layer's weight: characteristic distillation balances its loss terms by their gradients here."""
        return self.out.weight

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None, c_noise_s=None
    ) -> torch.Tensor:
        emb = self.map_noise(c_noise)
        if self.map_s is not None:
            emb = emb + self.map_s(self.map_noise(c_noise_s))
        if self.map_label is not None:
            if labels is None:
                raise ValueError("this network is class-conditional: pass labels")
            emb = emb + self.map_label(labels)
        h = torch.cat([x, emb.to(x.dtype)], dim=1)
        for layer in self.hidden:
            h = F.silu(layer(h))
        with torch.autocast(h.device.type, enabled=False):  # fp32 output layer, as in unet.py (adaptive weight)
            return self.out(h.float())


class ToyGenerator(nn.Module):
    """G(z) for 2-D toy data: an MLP from a latent of size z_dim (GPM: 4 hidden layers of 512, ReLU, latent 128)."""

    def __init__(self, dim: int = 2, z_dim: int = 128, width: int = 512, depth: int = 4):
        super().__init__()
        self.dim, self.z_dim, self.n_classes, self.sample_shape = dim, z_dim, 0, (dim,)
        widths = [z_dim] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.out = nn.Linear(width, dim)

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = zs
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.out(h)
