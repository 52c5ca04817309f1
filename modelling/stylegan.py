"""StyleGAN generator: mapping network, AdaIN, noise inputs, style mixing and truncation. The discriminator is
Progressive GAN's with a [1, 2, 1] blur before every downsampling conv: blur -> conv3 -> 2x2 average pool (NVIDIA's
blur2d + conv2d_downscale2d; away from the borders a [1, 3, 3, 1] blur and a stride-2 conv), in
`progressive_gan.Discriminator`.

Paper: Karras et al. 2019, "A Style-Based Generator Architecture for Generative Adversarial Networks",
arXiv 1812.04948. Reference code read for facts: gau-nernst/gan (2023) `modelling/stylegan.py`; StyleGAN2-ADA
`networks.py` for the mapping network, w_avg tracking and style mixing as done at training time.

Layout (num_ws = 2 log2(img_size) - 2 style inputs, channels min(channel_base / r, channel_max)):
  mapping: z -> PixelNorm -> n_mlp x [equalized dense (lr x 0.01), LReLU] -> w, broadcast to (N, num_ws, w_dim)
  synthesis: learned constant (C, 4, 4) -> [noise, bias, LReLU, InstanceNorm, AdaIN(w_0)] -> conv3 -> [.. w_1]
    -> per resolution: [2x nearest, conv3, blur [1,2,1]] -> [.. w_2i] -> conv3 -> [.. w_2i+1] -> toRGB 1x1
  AdaIN: x * (1 + y_s) + y_b with (y_s, y_b) = A(w), A an equalized dense layer with zero bias (centred on the
  identity style).
Style mixing (training mode only, probability `mixing_prob`): layers from a random crossover k in 1..num_ws-1 on
take w from a second latent. Truncation (sampling only; never in training, a bug in gau-nernst/gan 2023):
w' = w_avg + psi (w - w_avg) on the first `truncation_cutoff` layers (all by default), with w_avg an EMA
(beta 0.995) of the batch-mean w updated in training mode from the main latents (not the mixing ones, as
StyleGAN2-ADA).
Noise inputs: fresh N(0, 1) maps in training mode; in eval mode fixed maps stored with the weights, so a sample
depends only on its latent (per-seed reproducible, StyleGAN2-ADA's noise_mode="const").
Deviations: no progressive growing (trained at full resolution, as StyleGAN2 does); equalized LR with
StyleGAN2-ADA's gain convention (`nvidia_ops`); unconditional only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from modelling.nvidia_ops import (
    EqualizedConv2d,
    EqualizedLinear,
    PixelNorm,
    level_channels,
    log2_size,
    lrelu,
    make_filter,
    upfirdn2d,
)


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, n_mlp: int = 8, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        self.norm = PixelNorm()  # StyleGAN2's normalize_2nd_moment is the same operation on a vector
        dims = [z_dim] + [w_dim] * n_mlp
        self.layers = nn.ModuleList(
            [EqualizedLinear(a, b, lr_mul=lr_mul) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, zs: torch.Tensor, update_w_avg: bool = True) -> torch.Tensor:
        w = self.norm(zs)
        for layer in self.layers:
            w = lrelu(layer(w))
        if self.training and update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(torch.lerp(w.float().mean(0), self.w_avg, self.w_avg_beta))
        return w


class NoiseInput(nn.Module):
    """Adds noise * strength: per-channel strengths (StyleGAN) or one scalar (StyleGAN2), initialised to 0."""

    def __init__(self, res: int, ch: int = 1):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.register_buffer("noise_const", torch.randn(1, 1, res, res))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        else:
            noise = self.noise_const.to(x.dtype)
        return x + noise * self.strength.to(x.dtype)


class AdaINLayer(nn.Module):
    """[conv] -> noise -> bias -> LReLU -> InstanceNorm -> AdaIN(w)."""

    def __init__(self, in_ch: int, out_ch: int, res: int, w_dim: int, conv: str | None):
        super().__init__()
        self.conv = EqualizedConv2d(in_ch, out_ch, 3, bias=False) if conv else None
        self.up = conv == "up"
        self.register_buffer("blur", make_filter([1, 2, 1]) if self.up else None, persistent=False)
        self.noise = NoiseInput(res, out_ch)
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))
        self.style = EqualizedLinear(w_dim, 2 * out_ch)  # bias 0: (1 + y_s, y_b) starts at the identity

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.conv is not None:
            x = self.conv(x)
        if self.up:
            x = upfirdn2d(x, self.blur, pad=(1, 1, 1, 1))
        x = lrelu(self.noise(x) + self.bias.to(x.dtype))
        x = F.instance_norm(x.float()).to(x.dtype)  # fp32 statistics
        y_s, y_b = self.style(w).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + y_s) + y_b


class Synthesis(nn.Module):
    def __init__(self, img_size: int, img_channels: int, w_dim: int, channel_base: int, channel_max: int):
        super().__init__()
        ch = level_channels(img_size, channel_base, channel_max, "stylegan")
        depth = len(ch) - 1
        self.const = nn.Parameter(torch.ones(1, ch[0], 4, 4))
        layers = [AdaINLayer(ch[0], ch[0], 4, w_dim, None), AdaINLayer(ch[0], ch[0], 4, w_dim, "same")]
        for i in range(1, depth + 1):
            res = 4 * 2**i
            layers += [AdaINLayer(ch[i - 1], ch[i], res, w_dim, "up"), AdaINLayer(ch[i], ch[i], res, w_dim, "same")]
        self.layers = nn.ModuleList(layers)
        self.to_rgb = EqualizedConv2d(ch[-1], img_channels, 1)

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.const.expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i])
        return self.to_rgb(x)


class Generator(nn.Module):
    """Mapping, broadcast to num_ws, style mixing, truncation and a synthesis network. StyleGAN2's generator is
    this class with its own `synthesis_class`."""

    name, synthesis_class = "stylegan", Synthesis

    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        z_dim: int = 512,
        w_dim: int = 512,
        n_mlp: int = 8,
        channel_base: int = 16384,
        channel_max: int = 512,
        mixing_prob: float = 0.9,
        n_classes: int = 0,
    ):
        super().__init__()
        if n_classes:
            raise ValueError(f"{self.name} is unconditional here (use dcgan or sagan with --conditional)")
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, 0
        self.z_dim, self.w_dim = z_dim, w_dim
        self.num_ws = 2 * log2_size(img_size, self.name) - 2
        self.mixing_prob = mixing_prob
        self.mapping = MappingNetwork(z_dim, w_dim, n_mlp)
        self.synthesis = self.synthesis_class(img_size, img_channels, w_dim, channel_base, channel_max)

    def make_ws(self, zs: torch.Tensor, truncation: float = 1.0, truncation_cutoff: int | None = None):
        ws = self.mapping(zs)[:, None].repeat(1, self.num_ws, 1)
        if self.training and self.mixing_prob > 0:
            # One crossover per batch (StyleGAN2-ADA); with prob 1 - p the crossover is num_ws, i.e. no mixing.
            cutoff = torch.randint(1, self.num_ws, (), device=zs.device)
            cutoff = torch.where(torch.rand((), device=zs.device) < self.mixing_prob, cutoff, self.num_ws)
            mixed = self.mapping(torch.randn_like(zs), update_w_avg=False)[:, None]  # w_avg: main latents only
            later = (torch.arange(self.num_ws, device=zs.device) >= cutoff)[None, :, None]
            ws = torch.where(later, mixed.to(ws.dtype), ws)
        if truncation != 1:
            if self.training:
                raise RuntimeError("truncation is for sampling only: call .eval() first")
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            w_avg = self.mapping.w_avg.to(ws.dtype)
            ws = torch.cat([torch.lerp(w_avg, ws[:, :cut], truncation), ws[:, cut:]], dim=1)
        return ws

    def forward(self, zs, labels=None, truncation: float = 1.0, truncation_cutoff=None, ws=None) -> torch.Tensor:
        """Images from latents zs, or from given broadcast latents `ws` (N, num_ws, w_dim) (then zs is ignored):
        the path-length regulariser differentiates the images with respect to an input ws."""
        if ws is None:
            ws = self.make_ws(zs, truncation, truncation_cutoff)
        return self.synthesis(ws)
