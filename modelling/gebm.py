"""A Generalized Energy-Based Model: a base generator G, an energy network D and the learned log-partition A, held
in one module so that one snapshot file carries all three.

Paper: Arbel, Zhou & Gretton 2021, "Generalized Energy Based Models", arXiv 2003.05033. The model's density is
Q(dx) = exp(-(D(x) + A)) G(dx); it is sampled by MCMC on the latent posterior nu(z) ~ eta(z) exp(-D(G(z)))
(sampling/latent_mcmc.py), then x = G(z). Reference code read for facts: MichaelArbel/GeneralizedEBM
`models/discriminator.py` (the energy floor), `trainer.py` (A is a scalar trained with the energy's optimizer).

Architectures by name (`--g_model`, `--d_model`): `dcgan` (genzoo's DCGAN, modelling/dcgan.py; the energy is its
discriminator without BatchNorm), `sngan` and `resnet-sn` (modelling/sngan.py), and `mlp`, small MLPs for 2-D toy
data (not in GEBM, whose toy models are flows). Deviations: GEBM's own `dcgan` is the PyTorch tutorial's (512
channels at 4x4 and a final 1x1 transposed conv; energy with a sigmoid output, or BatchNorm in its `dcgan-ns`
variant); genzoo reuses its DCGAN, and never puts BatchNorm in an energy, which must give each sample its own value
for per-sample gradient penalties and per-chain MCMC.
"""

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from modelling import dcgan, sngan


class ToyGenerator(nn.Module):
    """`mlp` base for 2-D data: z -> `depth` hidden SiLU layers -> a point."""

    def __init__(self, z_dim: int = 2, dim: int = 2, width: int = 128, depth: int = 3):
        super().__init__()
        self.z_dim, self.dim, self.n_classes, self.sample_shape = z_dim, dim, 0, (dim,)
        widths = [z_dim] + [width] * depth
        layers = [m for a, b in zip(widths[:-1], widths[1:], strict=True) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(zs)


class ToyEnergy(nn.Module):
    """`mlp` energy for 2-D data: smooth (SiLU), so its input gradients are meaningful everywhere."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3):
        super().__init__()
        self.dim, self.n_classes = dim, 0
        widths = [dim] + [width] * depth
        layers = [m for a, b in zip(widths[:-1], widths[1:], strict=True) for m in (nn.Linear(a, b), nn.SiLU())]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).flatten()


BASES = {"dcgan": dcgan.Generator, "sngan": sngan.Generator, "resnet-sn": sngan.ResNetGenerator, "mlp": ToyGenerator}
ENERGIES = {
    "dcgan": partial(dcgan.Discriminator, norm="none"),
    "sngan": sngan.Energy,
    "resnet-sn": sngan.ResNetEnergy,
    "mlp": ToyEnergy,
}


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; valid: {sorted(registry)}")
    return registry[name]


class Energy(nn.Module):
    """The energy network D with GEBM's output floor, and the log-partition A as a parameter of its own.

    forward(x) = D(x) clamped below at `floor` (GEBM: relu(D + 10) - 10, unless --no_trunc; None = no floor). A is
    *not* added in forward: the KALE losses use D + A for the energy step and a batch estimate in place of A for
    the base step (losses/kale.py). Keeping A here puts it in the energy's optimizer, EMA and DDP gradient
    averaging (its gradient reaches it through the loss, which DDP's hooks see like any other)."""

    def __init__(self, net: nn.Module, floor: float | None = -10.0):
        super().__init__()
        self.net, self.floor = net, floor
        self.log_partition = nn.Parameter(torch.zeros(()))

    def network_parameters(self) -> list[nn.Parameter]:
        """D's parameters without A (the l2 penalties and GEBM's gradient transform treat A apart)."""
        return list(self.net.parameters())

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        d = self.net(x)
        return d if self.floor is None else F.relu(d - self.floor) + self.floor


class GEBM(nn.Module):
    """Base generator (`.base`) + energy with its log-partition (`.energy`): one state dict, one snapshot.
    forward(zs) = G(zs), the base samples; the energy-corrected samples come from latent MCMC."""

    def __init__(
        self,
        g_model: str,
        gen_kwargs: dict,
        d_model: str,
        disc_kwargs: dict,
        energy_floor: float | None = -10.0,  # GEBM's relu(D + 10) - 10; None = --no_trunc
    ):
        super().__init__()
        self.base = _lookup(BASES, g_model, "base generator")(**gen_kwargs)
        self.energy = Energy(_lookup(ENERGIES, d_model, "energy network")(**disc_kwargs), energy_floor)
        self.z_dim, self.n_classes = self.base.z_dim, 0
        if hasattr(self.base, "sample_shape"):  # 2-D toy data
            self.sample_shape = self.base.sample_shape
        else:
            self.sample_shape = (self.base.img_channels, self.base.img_size, self.base.img_size)

    @property
    def log_partition(self) -> torch.Tensor:
        return self.energy.log_partition

    def forward(self, zs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.base(zs)
