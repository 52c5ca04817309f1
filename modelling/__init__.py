"""Architectures, selected by name: `build_generator(name, **kwargs)`, `build_discriminator`, `build_network`
(denoiser backbones) and `build_denoiser(method, net, net_kwargs, **kwargs)` (a backbone inside EDM or Föllmer
preconditioning) and `build_gebm(name, **kwargs)` (a Generalized EBM: base generator + energy, modelling/gebm.py).

The kwargs go straight to the constructor and are stored in snapshots, so `sample.py` rebuilds a model without
the training script's flags. One architecture family per file.
"""

from functools import partial

from torch import nn

from modelling import classifier, dcgan, gebm, mlp, precond, progressive_gan, sagan, stylegan, stylegan2, unet

GENERATORS = {
    "dcgan": dcgan.Generator,
    "progressive_gan": progressive_gan.Generator,
    "stylegan": stylegan.Generator,
    "stylegan2": stylegan2.Generator,
    "sagan": sagan.Generator,
}
DISCRIMINATORS = {
    "dcgan": dcgan.Discriminator,
    "progressive_gan": progressive_gan.Discriminator,
    # StyleGAN's discriminator is Progressive GAN's with a [1, 2, 1] blur before each downsampling conv (blur -> conv
    # -> 2x2 average pool, arXiv 1812.04948)
    "stylegan": partial(progressive_gan.Discriminator, blur_filter=[1, 2, 1], growing=False),
    "stylegan2": stylegan2.Discriminator,
    "sagan": sagan.Discriminator,
}
CLASSIFIERS = {"cnn": classifier.Classifier}  # feature extractors for the offline metric (fid.py --detector fmnist)
NETWORKS = {"ddpmpp": unet.SongUNet, "mlp": mlp.ToyMLP}
DENOISERS = {"edm": precond.EDMDenoiser, "follmer": precond.FollmerDenoiser}
# `--model` names of diffusion_train.py: (network, preset kwargs); user kwargs override the preset.
NETWORK_PRESETS = {f"ddpmpp-{k}": ("ddpmpp", v) for k, v in unet.PRESETS.items()} | {"mlp": ("mlp", {})}
# Generalized EBMs: the wrapper; its base and energy architectures are chosen by name in gebm.BASES / gebm.ENERGIES.
GEBMS = {"gebm": gebm.GEBM}


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; valid: {sorted(registry)}")
    return registry[name]


def build_generator(name: str, **kwargs) -> nn.Module:
    return _lookup(GENERATORS, name, "generator")(**kwargs)


def build_discriminator(name: str, **kwargs) -> nn.Module:
    return _lookup(DISCRIMINATORS, name, "discriminator")(**kwargs)


def build_classifier(name: str, **kwargs) -> nn.Module:
    return _lookup(CLASSIFIERS, name, "classifier")(**kwargs)


def build_network(name: str, **kwargs) -> nn.Module:
    return _lookup(NETWORKS, name, "network")(**kwargs)


def build_denoiser(name: str, net: str, net_kwargs: dict, **kwargs) -> precond.Denoiser:
    return _lookup(DENOISERS, name, "denoiser")(build_network(net, **net_kwargs), **kwargs)


def build_gebm(name: str, **kwargs) -> gebm.GEBM:
    return _lookup(GEBMS, name, "energy-based model")(**kwargs)
