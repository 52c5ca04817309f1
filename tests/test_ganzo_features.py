"""Ganzo's run features in the GAN scripts: --image_class (train on one label) and the config-file precedence
(built-in defaults < the model's defaults (gan_celeba.py) < --config JSON/YAML < the command line)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import gan_celeba
import gan_mnist
from tests.conftest import cli_error, read_stats, train
from tests.idx import synthetic_digits
from utils.cli import UserError, parse
from utils.data import ImageFileDataset, ImageTensorDataset, select_class


def test_config_file_precedence_gan_mnist(tmp_path):
    """JSON file over the defaults, the command line over the file; booleans switch off with --no-flag."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"method": "hinge", "lr": 0.001, "ema": True, "gen_kwargs": {"base_dim": 4}}))
    cfg = parse(gan_mnist.Config, ["--config", str(path), "--lr", "0.002", "--no-ema"], resolve=gan_mnist.check_config)
    assert (cfg.method, cfg.lr, cfg.ema, cfg.gen_kwargs) == ("hinge", 0.002, False, {"base_dim": 4})
    assert cfg.beta1 == 0.5 and cfg.ortho_reg == 0.0  # untouched defaults (and the resolved model default)
    # A run's config.json given back as --config reproduces the run's config.
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert parse(gan_mnist.Config, ["--config", str(saved)], resolve=gan_mnist.check_config) == cfg


def test_config_file_precedence_gan_celeba(tmp_path):
    """YAML file over the model's defaults, the command line over both; a model chosen on the command line brings
    its own defaults for everything neither the file nor the command line set."""
    path = tmp_path / "run.yaml"
    path.write_text("model: sagan\nlr: 0.0003\nema: true\n")
    resolve = gan_celeba.resolve_config
    cfg = parse(gan_celeba.Config, ["--config", str(path), "--lr_d", "0.001"], resolve=resolve)
    assert (cfg.model, cfg.lr, cfg.lr_d, cfg.ema) == ("sagan", 3e-4, 1e-3, True)
    assert (cfg.method, cfg.beta1, cfg.beta2) == ("hinge", 0.0, 0.9)  # SA-GAN's defaults for unset flags
    cfg = parse(gan_celeba.Config, ["--config", str(path), "--model", "biggan"], resolve=resolve)
    assert (cfg.model, cfg.lr, cfg.lr_d) == ("biggan", 3e-4, 3e-4)  # the file's --lr, alone, sets both rates
    assert (cfg.train_g_interval, cfg.ortho_reg, cfg.beta2) == (2, 1e-4, 0.999)  # BigGAN's defaults
    with pytest.raises(UserError, match="train_g_interval must be >= 1"):
        path.write_text("train_g_interval: 0\n")
        parse(gan_celeba.Config, ["--config", str(path)], resolve=resolve)


def test_select_class_keeps_one_label():
    images, labels = synthetic_digits(50)
    data = ImageTensorDataset(images[:, None], labels, 10)
    threes = select_class(data, 3)
    assert len(threes) == int((labels == 3).sum()) > 0 and set(threes.labels.tolist()) == {3}
    assert torch.equal(threes.images, images[labels == 3][:, None]) and threes.n_classes == 10
    with pytest.raises(UserError, match="labels are 0..9"):
        select_class(data, 10)
    with pytest.raises(UserError, match="needs image data with labels"):
        select_class(ImageTensorDataset(images[:, None], labels, 0), 0)


def test_select_class_on_a_folder(tmp_path):
    for k, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(2 + k):
            Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / name / f"{i}.png")
    from utils.data import image_file_dataset

    dogs = select_class(image_file_dataset(str(tmp_path), 8), 1)
    assert isinstance(dogs, ImageFileDataset) and len(dogs) == 3 and all(f.parent.name == "dogs" for f in dogs.files)
    with pytest.raises(UserError, match=r"labels are 0..1 \(cats, dogs\)"):
        select_class(image_file_dataset(str(tmp_path), 8), 2)


def test_image_class_trains_and_evaluates_on_that_class_only(tmp_path, mnist_dir, capsys):
    args = ["--image_class", "3", "--n_steps", "2", "--eval_interval", "2", "--eval_samples", "8"]
    result = train(mnist_dir, tmp_path, *args, "--log_interval", "2", "--sample_interval", "0", "--loggers", "none")
    _, labels = synthetic_digits(256, 0)
    n = int((labels == 3).sum())
    run_dir = tmp_path / "mnist_dcgan_gan_class3"  # the default name says so
    assert f", {n} training samples" in result.stdout and read_stats(run_dir)[-1]["step"] == 2
    assert int(np.load(run_dir / "eval" / "ref-fd_cls.npz")["count"]) == n  # the reference is that class too
    base = ["--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path / "bad")]
    assert "cannot be combined with --conditional" in cli_error(
        gan_mnist.cli, base + ["--image_class", "3", "--conditional"], capsys
    )
    assert "labels are 0..9" in cli_error(gan_mnist.cli, base + ["--image_class", "12"], capsys)
