# Discriminator Flow: a GAN with no generator (Franceschi et al. 2023, "Unifying GANs and Score-Based Diffusion as
# Generative Particle Models", arXiv 2305.16150, Sec. 4.1). One time-conditioned critic f(x, t); samples are
# particles moved from noise along its input gradient (sampling/particles.py), the velocity set by the GAN loss
# (losses/particle.py). Reference code read for facts only: White-Link/gpm (Apache-2.0) gpm/models/discr_flow/base.py,
# gpm/networks/{mlp.py, conv/dcgan.py, conv/resnet.py, conv/utils.py, score/scalar_emb.py, init.py}.
# Time enters as a Fourier embedding of t (128 features, frequencies ~ N(0, 16²) drawn once and stored as a buffer,
# so snapshots carry them). The MLP critic concatenates it with x; the conv critics map it through a 128 -> 256 -> 256
# SiLU MLP and modulate every conv output channel-wise, h·(1 + scale) + shift, before its activation.
# Layouts (w = base_dim, leaky ReLU 0.2, never BatchNorm: the flow differentiates a sum over the batch, and batch
# statistics would couple the particles):
#   mlp     [x, emb(t)] -> Linear(w) -> depth x (act, Linear) -> 1 (GPM: w 512, depth 4)
#   dcgan   32 px: conv3x3 s1 (w); 64 px: conv4x4 s2 (w); then conv4x4 s2 to 2w, 4w, 8w; conv4x4 valid -> 1 (no bias)
#   resnet  SN-GAN/StudioGAN residual critic: 32 px 4 blocks of 2w (down, down, -, -); 64 px w..16w (down x4, -);
#           act -> sum over H x W -> Linear -> 1
# Init as GPM's configs (every conv and linear, the time MLP and the modulations included): mlp and resnet N(0, 0.02),
# dcgan orthogonal with gain 1.41; biases 0. Deviations: none in the layers; GPM's optional self-attention in the
# ResNet, spectral norm and the "ignore_t" switch are not implemented.

import math

import torch
import torch.nn.functional as F
from torch import nn

SLOPE = 0.2  # leaky ReLU slope (GPM's activation default)
LOSSES = ("vanilla", "ipm", "hinge")


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar per sample (EDM/GPM): [cos 2πft, sin 2πft] with f ~ N(0, scale²). (B,) ->
    (B, C). The frequencies are a persistent buffer: a rebuilt model must load them, never redraw them."""

    def __init__(self, num_channels: int = 128, scale: float = 16.0):
        super().__init__()
        if num_channels % 2 or num_channels < 2:
            raise ValueError(f"num_channels must be even and >= 2, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * (2 * math.pi * self.freqs[None])
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def init_critic(module: nn.Module, init: str, gain: float) -> None:
    """GPM's `init_network`: every conv and linear weight N(0, gain) or orthogonal(gain), biases 0 ("default" keeps
    PyTorch's init)."""
    if init not in ("normal", "orthogonal", "default"):
        raise ValueError(f"unknown init {init!r}; valid: ['default', 'normal', 'orthogonal']")
    for m in module.modules():
        if init != "default" and isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain) if init == "normal" else nn.init.orthogonal_(m.weight, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class TimeMLPCritic(nn.Module):
    """f(x, t) on flat data (2-D points): an MLP on [x, Fourier(t)]."""

    def __init__(
        self,
        dim: int = 2,  # data dimension
        width: int = 512,
        depth: int = 4,  # hidden layers (activations); depth + 1 linear layers
        emb_channels: int = 128,
        init: str = "normal",
        init_gain: float = 0.02,
    ):
        super().__init__()
        self.sample_shape = (dim,)
        self.embed = FourierEmbedding(emb_channels)
        widths = [dim + emb_channels] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.out = nn.Linear(width, 1)
        self.init, self.init_gain = init, init_gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_critic(self, self.init, self.init_gain)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), self.embed(t).to(x.dtype)], dim=1)
        for layer in self.hidden:
            h = F.leaky_relu(layer(h), SLOPE)
        return self.out(h).flatten()  # (B,)


class Modulated(nn.Module):
    """A conv whose output is modulated channel-wise by the time embedding: conv(x)·(1 + scale) + shift."""

    def __init__(self, conv: nn.Conv2d, emb_channels: int):
        super().__init__()
        self.conv, self.affine = conv, nn.Linear(emb_channels, 2 * conv.out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        return self.conv(x) * (1 + scale) + shift


def _time_mlp(emb_channels: int) -> nn.Module:
    """GPM's preprocessing of the embedding for conv critics: 128 -> 256 -> 256, SiLU after both."""
    return nn.Sequential(
        nn.Linear(emb_channels, 2 * emb_channels), nn.SiLU(), nn.Linear(2 * emb_channels, 2 * emb_channels), nn.SiLU()
    )


class _ConvCritic(nn.Module):
    """What the conv critics share: GPM's image sizes, the time embedding and its MLP, and GPM's init. A subclass
    builds its layers after this `__init__`, then calls `reset_parameters()`."""

    def __init__(self, name: str, img_size: int, img_channels: int, emb_channels: int, init: str, init_gain: float):
        super().__init__()
        if img_size not in (32, 64):
            raise ValueError(f"the {name} critic takes 32 or 64 px images (GPM's layouts), got {img_size}")
        self.sample_shape = (img_channels, img_size, img_size)
        self.embed, self.map_emb = FourierEmbedding(emb_channels), _time_mlp(emb_channels)
        self.init, self.init_gain = init, init_gain

    def reset_parameters(self) -> None:
        init_critic(self, self.init, self.init_gain)

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B,) -> (B, 2 * emb_channels): what every modulation reads."""
        return self.map_emb(self.embed(t).to(dtype))


class TimeDCGANCritic(_ConvCritic):
    """GPM's DCGAN discriminator with time modulation, without BatchNorm (GPM's Discriminator Flow configs)."""

    def __init__(
        self,
        img_size: int = 32,
        img_channels: int = 1,
        base_dim: int = 64,  # width of the first conv; doubled at each stride-2 conv
        emb_channels: int = 128,
        first_bias: bool = True,
        init: str = "orthogonal",
        init_gain: float = 1.41,
    ):
        super().__init__("dcgan", img_size, img_channels, emb_channels, init, init_gain)
        e, w = 2 * emb_channels, base_dim
        first = (
            nn.Conv2d(img_channels, w, 3, 1, 1, bias=first_bias)
            if img_size == 32
            else nn.Conv2d(img_channels, w, 4, 2, 1, bias=first_bias)
        )
        convs = [first] + [nn.Conv2d(w * 2**i, w * 2 ** (i + 1), 4, 2, 1) for i in range(3)]  # -> (8w, 4, 4)
        self.blocks = nn.ModuleList(Modulated(conv, e) for conv in convs)
        self.last = Modulated(nn.Conv2d(8 * w, 1, 4, 1, 0, bias=False), e)  # "flatten and matmul" over 4 x 4
        self.reset_parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(t, x.dtype)
        h = x
        for block in self.blocks:
            h = F.leaky_relu(block(h, emb), SLOPE)
        return self.last(h, emb).flatten()  # (B,)


class _ResBlock(nn.Module):
    """A residual block of the critic. `first`: SN-GAN's optimised first block (conv, act, conv, pool; shortcut pool
    then 1x1 conv); else act, conv, act, conv, [pool] with a 1x1 [pooled] shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, emb: int, down: bool, first: bool):
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = Modulated(nn.Conv2d(c_in, c_out, 3, 1, 1), emb)
        self.conv2 = Modulated(nn.Conv2d(c_out, c_out, 3, 1, 1), emb)
        self.skip = Modulated(nn.Conv2d(c_in, c_out, 1, 1, 0), emb) if first or down or c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        pool = (lambda h: F.avg_pool2d(h, 2)) if self.down else (lambda h: h)
        h = x if self.first else F.leaky_relu(x, SLOPE)
        h = pool(self.conv2(F.leaky_relu(self.conv1(h, emb), SLOPE), emb))
        if self.skip is None:
            return h + x
        return h + (self.skip(pool(x), emb) if self.first else pool(self.skip(x, emb)))


class TimeResNetCritic(_ConvCritic):
    """GPM's ResNet discriminator (after PyTorch-StudioGAN) with time modulation, without BatchNorm."""

    LAYOUTS = {  # img_size -> (output channels in units of base_dim, downsampling) per block
        32: ([2, 2, 2, 2], [True, True, False, False]),
        64: ([1, 2, 4, 8, 16], [True, True, True, True, False]),
    }

    def __init__(
        self,
        img_size: int = 64,
        img_channels: int = 3,
        base_dim: int = 64,
        emb_channels: int = 128,
        init: str = "normal",
        init_gain: float = 0.02,
    ):
        super().__init__("resnet", img_size, img_channels, emb_channels, init, init_gain)
        mults, downs = self.LAYOUTS[img_size]
        widths = [img_channels] + [m * base_dim for m in mults]
        self.blocks = nn.ModuleList(
            _ResBlock(widths[i], widths[i + 1], 2 * emb_channels, downs[i], first=i == 0) for i in range(len(mults))
        )
        self.out = nn.Linear(widths[-1], 1)
        self.reset_parameters()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(t, x.dtype)
        h = x
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.leaky_relu(h, SLOPE).sum(dim=(2, 3))).flatten()  # (B,)


class DiscriminatorFlow(nn.Module):
    """The critic and the flow it defines: what a snapshot holds and `sample.py` runs. `forward(x, t)` is the critic;
    the particle update (Euler, K = n_steps, t_k = k/K) is z <- z + (eta/K)·u(z, t_k) + sqrt(entropy_reg/K)·eps with
    u from `loss` (losses/particle.py), starting from z_0 ~ N(p_mean, p_std²) in data space."""

    def __init__(
        self,
        critic: nn.Module,
        loss: str = "ipm",  # vanilla | ipm | hinge: the GAN loss whose generator loss the particles descend
        n_steps: int = 64,  # K: Euler steps of the flow (GPM's nb_steps)
        eta: float = 2.0,  # total flow time: each step moves eta/K times the velocity
        p_mean: float = 0.0,  # initial particles N(p_mean, p_std²)
        p_std: float = 1.0,
        entropy_reg: float = 0.0,  # variance of the noise added along the flow (GPM: 0, deterministic)
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown particle loss {loss!r}; valid: {list(LOSSES)}")
        if n_steps < 1 or p_std <= 0 or entropy_reg < 0:
            raise ValueError("need n_steps >= 1, p_std > 0, entropy_reg >= 0")
        self.critic, self.loss, self.n_steps, self.eta = critic, loss, n_steps, eta
        self.p_mean, self.p_std, self.entropy_reg = p_mean, p_std, entropy_reg
        self.sample_shape, self.n_classes = tuple(critic.sample_shape), 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.critic(x, t)
