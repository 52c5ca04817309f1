"""StyleGAN2 generator (skip architecture, modulated/demodulated convolutions) and residual discriminator.

Paper: Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN", arXiv 1912.04958 (config E/F:
skip G, residual D, weight demodulation). Reference code read for facts: NVlabs/stylegan2-ada-pytorch
`training/networks.py` and `torch_utils/ops/{upfirdn2d,conv2d_resample}.py` (channel rule, ToRGB style gain, num_ws,
resampling pads); gau-nernst/gan for the double-backward blur.

Layout (channels min(channel_base / r, channel_max); num_ws = 2 log2(img_size) - 2):
  G: mapping (shared with StyleGAN) -> constant (C, 4, 4) ~ N(0, 1) -> conv(w_0) -> ToRGB(w_1); per resolution
     r = 8..img_size: conv0 up 2 (w_2l-1) -> conv1 (w_2l) -> ToRGB (w_2l+1); img = upsample2d(img) + ToRGB(x).
     Modulated conv: s = A(w) (A's bias starts at 1), weight * s per input channel, demodulated by
     1 / sqrt(sum (weight * s)^2 + 1e-8) per output channel; noise (one scalar strength, init 0), bias,
     LReLU * sqrt(2). ToRGB: 1x1, raw weight, no demodulation, styles * 1 / sqrt(C_in), bias, linear.
  D: fromRGB 1x1 at img_size; per resolution r = img_size..8: conv0 3x3 -> conv1 3x3 down 2 (blur [1,3,3,1], then
     stride 2) with a 1x1 down-2 skip (no bias), (skip + main) * sqrt(1/2); epilogue at 4x4 (minibatch stddev,
     conv3, dense, dense) -> (N,).
Modulation is applied as x * s -> shared-weight conv -> * demodulation coefficients (StyleGAN2-ADA's
fused_modconv=False path): one weight for the batch, cheap under torch.compile, and the coefficients are computed in
fp32 from the (out, in) sums of squared weights.
Deviations: no conv_clamp / fp16 pre-normalisation (the coefficients are fp32 instead); unconditional only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelling import stylegan
from modelling.common import at_least_fp32
from modelling.nvidia_ops import (
    DiscriminatorEpilogue,
    EqualizedConv2d,
    EqualizedLinear,
    level_channels,
    lrelu,
    make_filter,
    upfirdn2d,
    upsample2d,
)
from modelling.stylegan import NoiseInput


class ModulatedConv2d(nn.Module):
    """A synthesis conv (demodulated, noise, bias, LReLU * sqrt(2); `up` doubles the size), or with `rgb=True` the
    ToRGB layer (raw weight, no demodulation, styles * 1 / sqrt(fan_in), no noise, linear)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, w_dim: int, res: int, up=False, rgb=False):
        super().__init__()
        self.affine = EqualizedLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        # The equalized-LR gain 1 / sqrt(fan_in) is applied once. ToRGB (no demodulation) puts it on the styles and
        # uses the raw weight (StyleGAN2-ADA's ToRGBLayer). In a demodulated conv it cancels in the demodulation and
        # sits on the weight only to keep x * s -> conv near unit scale under reduced precision.
        fan_in_gain = 1 / math.sqrt(in_ch * kernel_size**2)
        self.weight_gain, self.style_gain = (1.0, fan_in_gain) if rgb else (fan_in_gain, 1.0)
        self.demodulate, self.up = not rgb, up
        self.register_buffer("blur", make_filter([1, 3, 3, 1], gain=4) if up else None, persistent=False)
        self.noise = None if rgb else NoiseInput(res)
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = at_least_fp32(self.affine(w)) * self.style_gain  # (N, in)
        weight = self.weight * self.weight_gain
        x = x * styles.to(x.dtype)[:, :, None, None]
        if self.up:
            # Transposed conv with stride 2 (k3: 2H + 1), then the [1,3,3,1] filter with pads (1, 1): exactly 2H.
            x = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
            x = upfirdn2d(x, self.blur, pad=(1, 1, 1, 1))
        else:
            x = F.conv2d(x, weight.to(x.dtype), padding=weight.shape[-1] // 2)
        if self.demodulate:
            # sum_{i,k} (weight_oik * s_ni)^2 = sum_i s_ni^2 * (sum_k weight_oik^2)
            dcoefs = (styles.square() @ at_least_fp32(weight).square().sum(dim=(2, 3)).T + 1e-8).rsqrt()
            x = x * dcoefs.to(x.dtype)[:, :, None, None]
        if self.noise is None:
            return x + self.bias.to(x.dtype)[None, :, None, None]
        return lrelu(self.noise(x) + self.bias.to(x.dtype)[None, :, None, None])


class Synthesis(nn.Module):
    def __init__(self, img_size: int, img_channels: int, w_dim: int, channel_base: int, channel_max: int):
        super().__init__()
        ch = level_channels(img_size, channel_base, channel_max, "stylegan2")
        depth = len(ch) - 1
        self.const = nn.Parameter(torch.randn(1, ch[0], 4, 4))
        self.register_buffer("resample_filter", make_filter([1, 3, 3, 1]), persistent=False)
        self.convs = nn.ModuleList([ModulatedConv2d(ch[0], ch[0], 3, w_dim, 4)])
        self.to_rgb = nn.ModuleList([ModulatedConv2d(ch[0], img_channels, 1, w_dim, 4, rgb=True)])
        for i in range(1, depth + 1):
            res = 4 * 2**i
            self.convs.append(ModulatedConv2d(ch[i - 1], ch[i], 3, w_dim, res, up=True))
            self.convs.append(ModulatedConv2d(ch[i], ch[i], 3, w_dim, res))
            self.to_rgb.append(ModulatedConv2d(ch[i], img_channels, 1, w_dim, res, rgb=True))

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](self.const.expand(ws.shape[0], -1, -1, -1).to(ws.dtype), ws[:, 0])
        img = self.to_rgb[0](x, ws[:, 1])
        for level in range(1, len(self.to_rgb)):
            x = self.convs[2 * level - 1](x, ws[:, 2 * level - 1])
            x = self.convs[2 * level](x, ws[:, 2 * level])
            img = upsample2d(img, self.resample_filter) + self.to_rgb[level](x, ws[:, 2 * level + 1])
        return img


class Generator(stylegan.Generator):
    """StyleGAN's generator (mapping, mixing, truncation) around the StyleGAN2 synthesis network."""

    name, synthesis_class = "stylegan2", Synthesis


class Discriminator(nn.Module):
    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        channel_base: int = 16384,
        channel_max: int = 512,
        mbstd_group: int = 4,
        n_classes: int = 0,
    ):
        super().__init__()
        if n_classes:
            raise ValueError("stylegan2 is unconditional here (use dcgan or sagan with --conditional)")
        self.img_size, self.img_channels, self.n_classes = img_size, img_channels, 0
        ch = level_channels(img_size, channel_base, channel_max, "stylegan2")
        depth = len(ch) - 1
        self.from_rgb = EqualizedConv2d(img_channels, ch[-1], 1)
        self.blocks = nn.ModuleList()
        for i in range(depth, 0, -1):
            main = nn.ModuleList(
                [
                    EqualizedConv2d(ch[i], ch[i], 3),
                    EqualizedConv2d(ch[i], ch[i - 1], 3, down=2, blur_filter=[1, 3, 3, 1], down_mode="stride"),
                ]
            )
            skip = EqualizedConv2d(ch[i], ch[i - 1], 1, False, down=2, blur_filter=[1, 3, 3, 1], down_mode="stride")
            self.blocks.append(nn.ModuleDict({"main": main, "skip": skip}))
        self.epilogue = DiscriminatorEpilogue(ch[0], mbstd_group)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = lrelu(self.from_rgb(imgs))
        for block in self.blocks:
            h = x
            for conv in block["main"]:
                h = lrelu(conv(h))
            x = (block["skip"](x) + h) * math.sqrt(0.5)
        return self.epilogue(x)
