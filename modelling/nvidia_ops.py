"""Layers shared by the NVIDIA GAN families (Progressive GAN, StyleGAN, StyleGAN2): equalized learning rate,
pixel norm, minibatch standard deviation, and the FIR resampling op `upfirdn2d` with a double-backward-friendly
gradient.

Equalized LR (ProGAN, arXiv 1710.10196, Sec. 4.1): weights are stored N(0, 1) / lr_mul and scaled at every forward
by lr_mul / sqrt(fan_in), so Adam's per-parameter step is the same for every layer. We use StyleGAN2-ADA's
convention (gain 1 in the layer, sqrt(2) folded into the activation, `lrelu`): for LeakyReLU, which is positively
homogeneous, this equals ProGAN's He gain sqrt(2) in the layer, and a layer's pre-activation output has unit variance
at init for unit-variance inputs (tested).

`upfirdn2d` (StyleGAN2, arXiv 1912.04958; StyleGAN2-ADA `torch_utils/ops/upfirdn2d.py` read for the padding
conventions): zero-insertion upsampling, padding, FIR filtering, subsampling. It is a grouped convolution inside an
`autograd.Function` whose backward is the same Function with the flipped filter, up/down swapped and matching pads,
so R1 and WGAN-GP (second-order gradients) never go through PyTorch's slow double backward of a grouped
convolution (gau-nernst/gan README, "Lessons"). Tested against autograd in float64 to second order.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def log2_size(img_size: int, model: str) -> int:
    depth = math.log2(img_size) if img_size >= 4 else 0
    if depth != int(depth) or img_size < 8:
        raise ValueError(f"{model} needs a power-of-two img_size >= 8, got {img_size}")
    return int(depth)


def level_channels(img_size: int, channel_base: int, channel_max: int, model: str) -> list[int]:
    """Channels of the levels 4x4, 8x8, ..., img_size: min(channel_base / resolution, channel_max) (NVIDIA's rule).
    Level i has resolution 4 * 2^i; the depth of a network is len(...) - 1."""
    return [min(channel_base // 2**k, channel_max) for k in range(2, log2_size(img_size, model) + 1)]


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.2) * sqrt(2): keeps the second moment ~1 after an equalized layer (the He gain)."""
    return F.leaky_relu(x, 0.2) * math.sqrt(2)


class EqualizedLinear(nn.Module):
    """Equalized-LR dense layer: runtime weight = param * gain * lr_mul / sqrt(in_features), bias * lr_mul. `gain`
    is relative to this file's convention (sqrt(2) lives in `lrelu`): NVIDIA's gain g here is g / sqrt(2)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        gain: float = 1.0,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain, self.lr_mul = gain * lr_mul / math.sqrt(in_features), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.linear(x, self.weight * self.weight_gain, bias)


class EqualizedConv2d(nn.Module):
    """Equalized-LR conv with "same" padding, optionally after a FIR blur. `down=2` halves the size in one of two
    ways: `down_mode="pool"`: [blur ("same" size) ->] conv -> 2x2 average pool, every stage zero-padded (ProGAN; with
    blur [1, 2, 1], StyleGAN's blur2d + conv2d_downscale2d); `down_mode="stride"`: blur, then a stride-2 "valid"
    conv (StyleGAN2's [1, 3, 3, 1] down-conv)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        bias: bool = True,
        down: int = 1,
        blur_filter=None,
        down_mode: str = "pool",
    ):
        super().__init__()
        if down_mode not in ("pool", "stride") or (down_mode == "stride" and down > 1 and not blur_filter):
            raise ValueError(f"down_mode must be 'pool' or 'stride' (with a blur_filter), got {down_mode!r}")
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain, self.down, self.down_mode = 1 / math.sqrt(in_ch * kernel_size**2), down, down_mode
        self.register_buffer("blur", make_filter(blur_filter) if blur_filter else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, k = self.weight * self.weight_gain, self.weight.shape[-1]
        if self.down > 1 and self.down_mode == "stride":
            # Blur, then a stride-2 "valid" conv; the pads make the output exactly half the input (even sizes).
            total = self.blur.shape[0] + k - 3
            pad = ((total + 1) // 2, total // 2) * 2
            return F.conv2d(upfirdn2d(x, self.blur, pad=pad), w, self.bias, stride=2)
        if self.blur is not None:  # "same" size, zero padding
            f = self.blur.shape[0]
            pad = ((f - 1) // 2, f // 2) * 2
            x = upfirdn2d(x, self.blur, pad=pad)
        if self.down == 1:
            return F.conv2d(x, w, self.bias, padding=k // 2)
        # Conv ("same"), then 2x2 average pool, as one stride-2 conv whose (k+1) x (k+1) kernel is w convolved with
        # the 2x2 box (NVIDIA's fused_scale): the same result with 16/36 of the multiply-adds for k = 3.
        w = F.pad(w, (1, 1, 1, 1))
        w = (w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]) / 4
        return F.conv2d(x, w, self.bias, stride=2, padding=k // 2)


class PixelNorm(nn.Module):
    """a / sqrt(mean_c(a^2) + eps), in fp32 (under fp16 the mean of squares overflows; gau-nernst/gan, "Lessons")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * x32.square().mean(dim=1, keepdim=True).add(1e-8).rsqrt()).to(x.dtype)


class MinibatchStdDev(nn.Module):
    """ProGAN's minibatch standard deviation: one extra channel holding, for each group of `group_size` samples,
    the std over the group averaged over features and pixels. fp32, with eps inside the sqrt so that identical
    samples give a finite gradient (also at second order, for R1/WGAN-GP). The group is the largest divisor of
    the batch that is <= group_size."""

    def __init__(self, group_size: int = 4, eps: float = 1e-8):
        super().__init__()
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        y = x.float().reshape(g, n // g, c, h, w)  # member k of group j is sample k * (n // g) + j
        std = (y - y.mean(dim=0)).square().mean(dim=0).add(self.eps).sqrt()  # (n/g, c, h, w)
        std = std.mean(dim=(1, 2, 3)).reshape(1, n // g, 1, 1, 1).expand(g, -1, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, std.to(x.dtype)], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 head of the ProGAN/StyleGAN/StyleGAN2 discriminators: minibatch stddev, conv3, dense over the
    map, dense to one score per sample."""

    def __init__(self, ch: int, mbstd_group: int = 4):
        super().__init__()
        self.mbstd = MinibatchStdDev(mbstd_group)
        self.conv = EqualizedConv2d(ch + 1, ch, 3)
        self.dense = EqualizedLinear(ch * 16, ch)
        self.out = EqualizedLinear(ch, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = lrelu(self.conv(self.mbstd(h)))
        return self.out(lrelu(self.dense(h.flatten(1)))).flatten()


# ------------------------------------------------------------------------------------------------ upfirdn2d
def make_filter(taps, gain: float = 1.0) -> torch.Tensor:
    """Separable 2-D FIR filter from 1-D taps (e.g. [1, 3, 3, 1]), normalised to sum `gain`."""
    t = torch.as_tensor(taps, dtype=torch.float32)
    f = t[:, None] * t[None, :]
    return f / f.sum() * gain


def _upfirdn2d_plain(x: torch.Tensor, f: torch.Tensor, up: int, down: int, pad: tuple[int, int, int, int]):
    """The op in plain torch (autograd differentiates it; `upfirdn2d` is the fast-gradient version).
    pad = (left, right, top, bottom), negative values crop."""
    n, c, h, w = x.shape
    if up > 1:  # insert up - 1 zeros after every pixel, in both directions
        x = F.pad(x.reshape(n, c, h, 1, w, 1), (0, up - 1, 0, 0, 0, up - 1)).reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(p, 0) for p in pad])
    left, right, top, bottom = (max(-p, 0) for p in pad)
    x = x[:, :, top : x.shape[2] - bottom, left : x.shape[3] - right]
    # conv2d correlates; flipping makes it a true convolution with f (the same for symmetric filters).
    weight = f.flip([0, 1]).to(x.dtype)[None, None].expand(c, 1, -1, -1)
    return F.conv2d(x, weight, groups=c, stride=down)


class _UpFirDn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, pad):
        y = _upfirdn2d_plain(x, f, up, down, pad)
        ctx.save_for_backward(f)
        ctx.geometry = (up, down, pad, x.shape[-2:], y.shape[-2:])
        return y

    @staticmethod
    def backward(ctx, dy):
        (f,) = ctx.saved_tensors
        up, down, (px0, px1, py0, py1), (h, w), (oh, ow) = ctx.geometry
        fh, fw = f.shape
        # The adjoint: upsample by `down`, correlate with f (= convolve with f flipped), crop, subsample by `up`.
        back_pad = (
            fw - px0 - 1,
            w * up - ow * down + px0 - up + 1,
            fh - py0 - 1,
            h * up - oh * down + py0 - up + 1,
        )
        dx = _UpFirDn2d.apply(dy, f.flip([0, 1]), down, up, back_pad)
        return dx, None, None, None, None


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0, 0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), pad (left, right, top, bottom), convolve with the 2-D filter f, downsample."""
    return _UpFirDn2d.apply(x, f, up, down, tuple(pad))


def upsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x upsampling with filter f of sum 1 (gain 4 makes up for the inserted zeros); exact 2x output size."""
    k = f.shape[0]
    p0, p1 = (k + 1) // 2, (k - 2) // 2
    return upfirdn2d(x, f * 4, up=2, pad=(p0, p1, p0, p1))


def downsample2d(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x downsampling after filtering with f; exact half output size for even inputs."""
    k = f.shape[0]
    p0, p1 = (k - 1) // 2, (k - 2) // 2
    return upfirdn2d(x, f, down=2, pad=(p0, p1, p0, p1))
