"""Architectures, selected by name: `build_generator(name, **kwargs)` / `build_discriminator(name, **kwargs)`.

The kwargs go straight to the constructor and are stored in snapshots, so `sample.py` rebuilds a model without
the training script's flags. One architecture family per file.
"""

from torch import nn

from modelling import classifier, dcgan

GENERATORS = {"dcgan": dcgan.Generator}
DISCRIMINATORS = {"dcgan": dcgan.Discriminator}
CLASSIFIERS = {"cnn": classifier.Classifier}  # feature extractors for the offline metric (fid.py --detector fmnist)


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
