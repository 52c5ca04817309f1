"""Architectures, selected by name: `build_generator(name, **kwargs)`, `build_discriminator`, `build_network`
(denoiser backbones), `build_denoiser(method, net, net_kwargs, **kwargs)` (a backbone inside EDM or Föllmer
preconditioning), `build_translator` / `build_patch_discriminator` (image-to-image translation, translate.py);
GPM's particle models: `build_discr_flow(critic, critic_kwargs, **flow)` (a time-conditioned critic and its
flow) and `build_score_gan_generator` (any generator of GENERATORS, or an MLP for 2-D points); `build_gebm(name,
**kwargs)` (a Generalized EBM: base generator + energy, modelling/gebm.py).

The kwargs go straight to the constructor and are stored in snapshots, so `sample.py` rebuilds a model without
the training script's flags. One architecture family per file.
"""

from functools import partial

from torch import nn

from modelling import (
    acgan,
    biggan,
    classifier,
    dcgan,
    discr_flow,
    gebm,
    mlp,
    precond,
    progressive_gan,
    sagan,
    stylegan,
    stylegan2,
    translation,
    unet,
)

GENERATORS = {
    "dcgan": dcgan.Generator,
    "progressive_gan": progressive_gan.Generator,
    "stylegan": stylegan.Generator,
    "stylegan2": stylegan2.Generator,
    "sagan": sagan.Generator,
    "acgan": acgan.Generator,
    "biggan": biggan.Generator,
}
DISCRIMINATORS = {
    "dcgan": dcgan.Discriminator,
    "progressive_gan": progressive_gan.Discriminator,
    # StyleGAN's discriminator is Progressive GAN's with a [1, 2, 1] blur before each downsampling conv (blur -> conv
    # -> 2x2 average pool, arXiv 1812.04948)
    "stylegan": partial(progressive_gan.Discriminator, blur_filter=[1, 2, 1], growing=False),
    "stylegan2": stylegan2.Discriminator,
    "sagan": sagan.Discriminator,
    "acgan": acgan.Discriminator,
    "biggan": sagan.Discriminator,  # BigGAN's D is SA-GAN's projection discriminator (residual, SN, attention)
}
CLASSIFIERS = {"cnn": classifier.Classifier}  # feature extractors for the offline metric (fid.py --detector fmnist)
NETWORKS = {"ddpmpp": unet.SongUNet, "mlp": mlp.ToyMLP}
# translate.py: pix2pix's U-Net, CycleGAN's ResNet generator, and the A<->B pair a CycleGAN snapshot holds.
TRANSLATORS = {
    "unet": translation.UNetGenerator,
    "resnet": translation.ResnetGenerator,
    "cycle": translation.CycleGenerators,
}
DENOISERS = {"edm": precond.EDMDenoiser, "follmer": precond.FollmerDenoiser}
# `--model` names of diffusion_train.py: (network, preset kwargs); user kwargs override the preset.
NETWORK_PRESETS = {f"ddpmpp-{k}": ("ddpmpp", v) for k, v in unet.PRESETS.items()} | {"mlp": ("mlp", {})}
# Time-conditioned critics f(x, t) of Discriminator Flow (GPM): no BatchNorm, no generator.
CRITICS = {"mlp": discr_flow.TimeMLPCritic, "dcgan": discr_flow.TimeDCGANCritic, "resnet": discr_flow.TimeResNetCritic}
# ScoreGAN's generators: the GAN ones, and an MLP for 2-D points (kept out of GENERATORS, whose every entry has a
# discriminator for the GAN scripts).
SCORE_GAN_GENERATORS = GENERATORS | {"mlp": mlp.ToyGenerator}
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


def build_translator(name: str, **kwargs) -> nn.Module:
    return _lookup(TRANSLATORS, name, "translator")(**kwargs)


def build_critic(name: str, **kwargs) -> nn.Module:
    return _lookup(CRITICS, name, "critic")(**kwargs)


def build_discr_flow(name: str, critic_kwargs: dict, **kwargs) -> discr_flow.DiscriminatorFlow:
    return discr_flow.DiscriminatorFlow(build_critic(name, **critic_kwargs), **kwargs)


def build_score_gan_generator(name: str, **kwargs) -> nn.Module:
    return _lookup(SCORE_GAN_GENERATORS, name, "generator")(**kwargs)


def build_gebm(name: str, **kwargs) -> gebm.GEBM:
    return _lookup(GEBMS, name, "energy-based model")(**kwargs)
