"""In-memory data sets stay under the memory bound: held at the training size when it fits, else kept as stored and
fitted per batch (same values), else refused in one line. Small synthetic data with a small GENZOO_DATA_MEMORY."""

import numpy as np
import pytest
import torch
from PIL import Image

import gan_celeba
import translate
from tests.conftest import cli_error
from utils.cli import UserError, parse
from utils.data import (
    MEMORY_ENV,
    ImageFileDataset,
    ImageTensorDataset,
    build_dataset,
    memory_bound,
    select_class,
)
from utils.pairs import EdgePairs, fashion_mnist_edges, sobel_edges

# 256 synthetic 28x28 training images (conftest's mnist_dir) take 196 KiB as stored.
STORED_ONLY = "300K"  # the stored copy fits; the set at 40x40 (400 KiB), or two sets at 32x32 (512 KiB), do not
TOO_SMALL = "100K"  # not even the stored copy fits
ALL = list(range(256))


def _same(batch_a, batch_b) -> bool:
    return all(torch.equal(a, b) for a, b in zip(batch_a, batch_b, strict=True))


@pytest.mark.parametrize("img_size, bound", [(32, "220K"), (40, STORED_ONLY)])  # padded (256 KiB), resized
def test_mnist_like_over_the_bound_is_fitted_per_batch_to_the_same_values(mnist_dir, monkeypatch, img_size, bound):
    held = build_dataset("mnist", str(mnist_dir), img_size, download=False)
    monkeypatch.setenv(MEMORY_ENV, bound)
    deferred = build_dataset("mnist", str(mnist_dir), img_size, download=False)
    assert held.fit is None and tuple(held.images.shape[1:]) == (1, img_size, img_size)
    assert deferred.fit is not None and tuple(deferred.images.shape[1:]) == (1, 28, 28)  # only the stored copy
    assert deferred.sample_shape == held.sample_shape == (1, img_size, img_size)
    assert _same(held[ALL], deferred[ALL])
    if img_size == 32:  # MNIST's 28 -> 32 is zero padding, on demand too
        assert (deferred[ALL][0][..., :2, :] == -1).all() and (deferred[ALL][0][..., 30:] == -1).all()
    assert _same(held[[5, 3, 250, 3]], deferred[[5, 3, 250, 3]])  # any batch, repeats included
    picked = [select_class(d, 4) for d in (held, deferred)]
    assert picked[1].fit is deferred.fit and len(picked[0]) == len(picked[1]) > 0
    assert _same(picked[0][list(range(len(picked[0])))], picked[1][list(range(len(picked[1])))])


def test_a_set_whose_stored_copy_does_not_fit_is_refused_with_its_size(mnist_dir, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, TOO_SMALL)
    with pytest.raises(UserError) as refused:
        build_dataset("fashion_mnist", str(mnist_dir), 32, download=False)
    message = str(refused.value)
    assert "\n" not in message
    assert "196.0 KiB" in message and "100.0 KiB" in message and f"{MEMORY_ENV}=1M" in message, message


def test_memory_bound_reads_the_override_or_a_fraction_of_available_memory(monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "1.5G")
    assert memory_bound()[0] == 3 * 2**29
    monkeypatch.setenv(MEMORY_ENV, "300k")
    assert memory_bound()[0] == 300 * 1024
    monkeypatch.setenv(MEMORY_ENV, "12345")
    assert memory_bound()[0] == 12345
    monkeypatch.setenv(MEMORY_ENV, "plenty")
    with pytest.raises(UserError, match=MEMORY_ENV):
        memory_bound()
    monkeypatch.delenv(MEMORY_ENV)
    bound, source = memory_bound()
    assert 0 < bound and "25% of the" in source


def _write_cifar(folder, n: int = 40):
    g = torch.Generator().manual_seed(3)
    records = torch.randint(0, 256, (n, 1 + 3 * 32 * 32), generator=g, dtype=torch.uint8)
    records[:, 0] %= 10
    folder.mkdir()
    (folder / "data_batch_1.bin").write_bytes(records.numpy().tobytes())
    return folder


def test_cifar10_over_the_bound_is_resized_per_batch(tmp_path, monkeypatch):
    folder = _write_cifar(tmp_path / "cifar")
    held = build_dataset("cifar10", str(folder), 48)
    monkeypatch.setenv(MEMORY_ENV, "150K")  # stored: 40 x 3 KiB = 120 KiB; at 48x48: 270 KiB
    deferred = build_dataset("cifar10", str(folder), 48)
    assert held.fit is None and deferred.fit is not None and tuple(deferred.images.shape[1:]) == (3, 32, 32)
    assert _same(held[list(range(40))], deferred[list(range(40))])


def test_an_image_folder_over_the_bound_is_decoded_on_demand_with_the_same_items(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    for k in range(6):
        cls = tmp_path / "data" / f"c{k % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(cls / f"{k}.png")
    (tmp_path / "data" / "c0" / "broken.png").write_bytes(b"not an image")  # skipped by both, not replaced
    held = build_dataset("folder", str(tmp_path / "data"), 16)
    monkeypatch.setenv(MEMORY_ENV, "2K")  # 6 images at 16x16 RGB: 4.5 KiB
    deferred = build_dataset("folder", str(tmp_path / "data"), 16)
    assert isinstance(held, ImageTensorDataset) and isinstance(deferred, ImageFileDataset)
    assert len(held) == len(deferred) == 6 and held.classes == deferred.classes == ["c0", "c1"]
    assert _same(held[list(range(6))], deferred[list(range(6))])
    assert "folder" in capsys.readouterr().err.split("note: ")[1]  # the switch is said, in one note


def test_edges_are_the_same_bits_in_any_batch_and_match_the_convolution():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 12, 12), generator=g, dtype=torch.uint8)
    images[:25] = (images[:25] > 128).to(torch.uint8) * 255  # hard steps, many magnitudes near the threshold
    whole = sobel_edges(images)
    assert torch.equal(whole, torch.cat([sobel_edges(images[i : i + 1]) for i in range(50)]))
    # Sobel by its definition: cross-correlation with [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] and its transpose.
    padded = np.pad(images[:, 0].double().numpy() / 255, ((0, 0), (1, 1), (1, 1)), mode="edge")
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    gx = sum(kx[i, j] * padded[:, i : i + 12, j : j + 12] for i in range(3) for j in range(3))
    gy = sum(kx.T[i, j] * padded[:, i : i + 12, j : j + 12] for i in range(3) for j in range(3))
    expected = (np.sqrt(gx**2 + gy**2) > 1.0).astype(np.uint8) * 255
    assert (whole[:, 0].numpy() != expected).mean() < 1e-3  # float32 vs float64 may differ only at exact ties


def test_edge_pairs_over_the_bound_are_edged_per_batch_to_the_same_values(mnist_dir, monkeypatch):
    held = fashion_mnist_edges(str(mnist_dir), 32, True, False)
    monkeypatch.setenv(MEMORY_ENV, STORED_ONLY)  # one 32x32 set fits (256 KiB), the pair of them does not
    deferred = fashion_mnist_edges(str(mnist_dir), 32, True, False)
    reverse = fashion_mnist_edges(str(mnist_dir), 32, True, False, reverse=True)
    assert held.fit is None and held.edges.dtype == torch.uint8 and deferred.edges is None
    assert tuple(deferred.images.shape[1:]) == (1, 28, 28)
    edges, images = held[ALL]
    assert _same((edges, images), deferred[ALL])
    assert _same((images, edges), reverse[ALL])
    assert torch.equal(edges, sobel_edges(held.images).float() / 127.5 - 1)
    assert held.in_channels == deferred.in_channels == 1 and held.sample_shape == deferred.sample_shape == (1, 32, 32)
    assert isinstance(deferred, EdgePairs)


@pytest.mark.parametrize("dataset, expected", [("fashion_mnist_edges", 32), ("paired", 256)])
def test_translate_defaults_the_demos_to_their_own_size(dataset, expected):
    cfg = parse(translate.Config, ["--dataset", dataset], resolve=translate.resolve_config)
    assert cfg.img_size == expected
    cfg = parse(translate.Config, ["--dataset", dataset, "--img_size", "64"], resolve=translate.resolve_config)
    assert cfg.img_size == 64


@pytest.mark.parametrize(
    "script, args, size",
    [
        (gan_celeba, ["--model", "dcgan", "--dataset", "fashion_mnist"], 64),
        (translate, ["--dataset", "fashion_mnist_edges"], 32),
    ],
)
def test_scripts_refuse_a_set_that_cannot_fit_in_one_line(mnist_dir, tmp_path, monkeypatch, capsys, script, args, size):
    monkeypatch.setenv(MEMORY_ENV, "50K")
    argv = [*args, "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path), "--loggers", "none"]
    line = cli_error(script.cli, argv, capsys)
    assert f"fashion_mnist (train) at {size}x{size} needs 196.0 KiB" in line and MEMORY_ENV in line, line
