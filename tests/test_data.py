import gzip
import io
import math

import pytest
import torch
from PIL import Image

from tests.idx import make_mnist_dir, synthetic_digits, write_idx
from utils import data
from utils.cli import UserError
from utils.data import (
    DATASETS,
    InfiniteSampler,
    PointDataset,
    build_dataset,
    load_mnist_like,
    read_idx,
    step_seed,
    toy_moments,
)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip(tmp_path, compress):
    images, labels = synthetic_digits(10)
    path = write_idx(tmp_path / "imgs", images, compress)
    assert torch.equal(read_idx(path), images)
    assert torch.equal(read_idx(write_idx(tmp_path / "lbl", labels, compress)).long(), labels)


def test_corrupt_idx_files_give_clear_errors(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 40)
    with pytest.raises(UserError, match="bad magic"):
        read_idx(bad_magic)
    images, _ = synthetic_digits(4)
    full = write_idx(tmp_path / "full", images, compress=False).read_bytes()
    truncated = tmp_path / "trunc"
    truncated.write_bytes(full[:-100])
    with pytest.raises(UserError, match="announces"):
        read_idx(truncated)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(full)[:50])
    with pytest.raises(UserError, match="cannot read"):
        read_idx(broken_gz)


def test_lookup_order_data_dir_then_system_then_download(tmp_path, monkeypatch):
    system = tmp_path / "system"
    make_mnist_dir(system / "fashion-mnist", n_train=12, n_test=4)
    monkeypatch.setattr(data, "SYSTEM_DIRS", [str(system)])
    # Nothing in --data_dir: the system copy is used.
    images, labels = load_mnist_like("fashion_mnist", str(tmp_path / "empty"), download=False)
    assert images.shape == (12, 28, 28) and labels.shape == (12,)
    # A copy in --data_dir (torchvision's layout) wins over the system copy.
    make_mnist_dir(tmp_path / "mine" / "FashionMNIST" / "raw", n_train=20, n_test=4)
    images, _ = load_mnist_like("fashion_mnist", str(tmp_path / "mine"), download=False)
    assert images.shape[0] == 20
    # The test split.
    images, _ = load_mnist_like("fashion_mnist", str(tmp_path / "mine"), train=False, download=False)
    assert images.shape[0] == 4


def test_missing_data_names_the_three_ways(tmp_path, monkeypatch):
    import torchvision

    def unreachable(*args, **kwargs):  # the network, not the code under test: fail as an offline download does
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got URLError")

    monkeypatch.setattr(data, "SYSTEM_DIRS", [str(tmp_path / "nowhere")])
    monkeypatch.setattr(torchvision.datasets, "MNIST", unreachable)
    with pytest.raises(UserError) as err:
        load_mnist_like("mnist", str(tmp_path / "empty"), download=True)
    message = str(err.value)
    assert "(1)" in message and "(2)" in message and "(3)" in message and "download failed" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="not tried"):
        load_mnist_like("fashion_mnist", str(tmp_path / "empty"), download=False)
    with pytest.raises(UserError, match="unknown dataset"):
        load_mnist_like("cifar11", None)


def test_build_dataset_pads_to_32_in_minus_one_to_one(tmp_path):
    root = make_mnist_dir(tmp_path / "m", n_train=8, n_test=2)
    ds = build_dataset("mnist", str(root), img_size=32)
    imgs, labels = ds[[0, 1, 2]]
    assert imgs.shape == (3, 1, 32, 32) and imgs.dtype == torch.float32 and labels.shape == (3,)
    assert imgs.min() >= -1 and imgs.max() <= 1
    assert (imgs[:, :, :2] == -1).all() and (imgs[:, :, :, -2:] == -1).all()  # zero padding = black
    assert build_dataset("mnist", str(root), img_size=16)[[0]][0].shape == (1, 1, 16, 16)


def _take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_sampler_resumes_mid_epoch_exactly():
    straight = _take(InfiniteSampler(10, 3, seed=5), 12)  # 36 positions: crosses three epoch boundaries
    resumed = _take(InfiniteSampler(10, 3, seed=5, start_step=7), 5)
    assert straight[7:] == resumed
    flat = sum(straight[:10], [])[:30]
    for epoch in range(3):  # every epoch is a permutation
        assert sorted(flat[epoch * 10 : (epoch + 1) * 10]) == list(range(10))


def test_sampler_ranks_split_the_global_batch():
    one = _take(InfiniteSampler(50, 8, rank=0, world_size=1, seed=1), 4)
    r0 = _take(InfiniteSampler(50, 4, rank=0, world_size=2, seed=1), 4)
    r1 = _take(InfiniteSampler(50, 4, rank=1, world_size=2, seed=1), 4)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one


def test_step_seed_differs_by_rank_and_step():
    seeds = {step_seed(0, r, s) for r in range(4) for s in range(1000)}
    assert len(seeds) == 4000 and all(0 <= s < 2**63 for s in seeds)


def test_build_dataset_rejects_unknown_names_listing_all():
    assert DATASETS == sorted(["mnist", "fashion_mnist", "cifar10", "folder", "celeba", "gaussians", "rings"])
    with pytest.raises(UserError) as err:
        build_dataset("cifar11", None, 32)
    assert all(name in str(err.value) for name in DATASETS)


def test_image_dataset_sample_shape(tmp_path):
    root = make_mnist_dir(tmp_path / "m", n_train=4, n_test=2)
    assert build_dataset("mnist", str(root), img_size=32).sample_shape == (1, 32, 32)


# ---------------------------------------------------------------------------------------------------- CIFAR-10
def _cifar_records(labels: list[int], seed: int) -> tuple[bytes, torch.Tensor]:
    """Records as the official binary files hold them: label byte, then the R, G, B planes row by row."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    blob = b"".join(bytes([y]) + img.numpy().tobytes() for y, img in zip(labels, images, strict=True))
    return blob, images


def test_cifar10_binary_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", [str(tmp_path / "nowhere")])
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    blob1, imgs1 = _cifar_records([3, 0, 9], seed=0)
    blob2, imgs2 = _cifar_records([7, 1], seed=1)
    blob_test, imgs_test = _cifar_records([5, 2], seed=2)
    # Pin the layout by byte offset, independently of any reshape: record 1 of batch 1, green plane, row 5, col 7.
    blob1 = bytearray(blob1)
    blob1[3073 + 1 + 1 * 1024 + 5 * 32 + 7] = 201
    (folder / "data_batch_1.bin").write_bytes(bytes(blob1))
    (folder / "data_batch_2.bin").write_bytes(blob2)
    (folder / "test_batch.bin").write_bytes(blob_test)

    ds = build_dataset("cifar10", str(tmp_path), img_size=32, download=False)  # found in data_dir/cifar-10-batches-bin
    assert ds.images.shape == (5, 3, 32, 32) and ds.images.dtype == torch.uint8 and ds.n_classes == 10
    assert ds.sample_shape == (3, 32, 32)
    assert ds.labels.tolist() == [3, 0, 9, 7, 1] and ds.labels.dtype == torch.int64
    assert int(ds.images[1, 1, 5, 7]) == 201
    imgs1[1, 1, 5, 7] = 201
    assert torch.equal(ds.images, torch.cat([imgs1, imgs2]))
    test = build_dataset("cifar10", str(folder), img_size=32, train=False)  # files directly in data_dir
    assert torch.equal(test.images, imgs_test) and test.labels.tolist() == [5, 2]
    assert build_dataset("cifar10", str(folder), img_size=16).images.shape == (5, 3, 16, 16)

    # The system copy is used when --data_dir has none.
    system = tmp_path / "system"
    (system / "cifar10").mkdir(parents=True)
    (system / "cifar10" / "test_batch.bin").write_bytes(blob_test)
    monkeypatch.setattr(data, "SYSTEM_DIRS", [str(system)])
    assert len(build_dataset("cifar10", str(tmp_path / "empty"), 32, train=False)) == 2

    (folder / "data_batch_2.bin").write_bytes(blob2[:-10])
    with pytest.raises(UserError, match="data_batch_2.bin.*not a positive multiple of 3073"):
        build_dataset("cifar10", str(folder), img_size=32)


def test_cifar10_missing_names_where_and_the_binary_tarball(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIRS", [str(tmp_path / "nowhere")])
    (tmp_path / "cifar-10-batches-py").mkdir()  # the pickled version: never read
    with pytest.raises(UserError) as err:
        build_dataset("cifar10", str(tmp_path), 32)
    message = str(err.value)
    assert "cifar-10-binary.tar.gz" in message and "--data_dir" in message and "pickled" in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------------- folder of images
def _save(path, array: torch.Tensor, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = array.numpy() if mode == "L" else array.permute(1, 2, 0).numpy()
    Image.fromarray(pixels, mode=mode).save(path)


def test_folder_labels_channels_and_centre_crop(tmp_path):
    root = tmp_path / "imgs"
    # 30 wide x 10 high: black | white | black; the centre square is the white third.
    wide = torch.zeros(10, 30, dtype=torch.uint8)
    wide[:, 10:20] = 255
    _save(root / "zebra" / "a.PNG", wide, "L")
    _save(root / "cat" / "sub" / "b.bmp", torch.full((12, 12), 100, dtype=torch.uint8), "L")
    _save(root / "cat" / "c.png", torch.full((8, 16), 50, dtype=torch.uint8), "L")
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    (root / "cat" / "._c.png").write_bytes(b"macOS resource fork, hidden: ignored")
    ds = build_dataset("folder", str(root), img_size=8)
    assert ds.images.shape == (3, 1, 8, 8) and ds.images.dtype == torch.uint8 and ds.sample_shape == (1, 8, 8)
    assert ds.n_classes == 2 and ds.classes == ["cat", "zebra"]
    assert ds.labels.tolist() == [0, 0, 1]  # sorted paths: cat/c.png, cat/sub/b.bmp, zebra/a.PNG
    assert (ds.images[0] == 50).all() and (ds.images[1] == 100).all()
    assert (ds.images[2] == 255).all()  # only the white centre square survives the crop

    # One RGB image makes every image RGB; grayscale ones repeat their channel.
    rgb = torch.stack([torch.full((16, 16), v, dtype=torch.uint8) for v in (10, 20, 30)])
    _save(root / "zebra" / "d.jpg", rgb, "RGB")
    ds = build_dataset("folder", str(root), img_size=4)
    assert ds.images.shape == (4, 3, 4, 4) and ds.labels.tolist() == [0, 0, 1, 1]
    assert (ds.images[0] == 50).all()
    assert ds.images[3].float().mean(dim=(1, 2)).sub(torch.tensor([10.0, 20.0, 30.0])).abs().max() <= 3  # JPEG

    # An image directly in data_dir: no classes.
    _save(root / "top.webp", rgb, "RGB")
    ds = build_dataset("folder", str(root), img_size=4)
    assert ds.n_classes == 0 and ds.labels.tolist() == [0] * 5 and ds.classes is None


def _corrupt_bytes(content: str) -> bytes:
    if content == "garbage":
        return b"this is not an image"
    buffer = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]  # truncated


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_folder_corrupt_image_is_skipped_and_named(tmp_path, content, capsys):
    """In memory and on demand alike: a corrupt file is skipped with one warning naming it, never fatal."""
    _save(tmp_path / "a" / "ok.png", torch.full((8, 8), 7, dtype=torch.uint8), "L")
    (tmp_path / "a" / "broken.png").write_bytes(_corrupt_bytes(content))
    in_memory = build_dataset("folder", str(tmp_path), 8)
    assert len(in_memory) == 1 and (in_memory.images == 7).all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: skipped" in line]
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "(1 unreadable so far)" in warnings[0]
    on_demand = build_dataset("folder", str(tmp_path), 8, in_memory=False)
    images, _ = on_demand[[0, 1]]  # broken.png sorts first: the next readable file stands in for it
    assert len(on_demand) == 2 and (images == 7 / 127.5 - 1).all()


def test_replacement_of_a_corrupt_image_takes_its_own_label(tmp_path):
    """The file that stands in for an unreadable one brings its own label, not the unreadable file's class."""
    _save(tmp_path / "a" / "1.png", torch.full((8, 8), 10, dtype=torch.uint8), "L")
    (tmp_path / "a" / "2.png").write_bytes(b"corrupt")
    _save(tmp_path / "b" / "1.png", torch.full((8, 8), 200, dtype=torch.uint8), "L")
    ds = build_dataset("folder", str(tmp_path), 8, in_memory=False)
    assert ds.labels.tolist() == [0, 0, 1]
    images, labels = ds[[0, 1, 2]]  # a/2.png is replaced by b/1.png (class 1)
    assert labels.tolist() == [0, 1, 1]
    assert images[1].eq(200 / 127.5 - 1).all()


def test_one_image_reader_for_every_mode(tmp_path):
    """16-bit grey is scaled (not clipped), 1-bit grey and palette images decode, hidden ._ files are ignored,
    and a decompression bomb is refused with one line."""
    wide = (torch.arange(64, dtype=torch.int32).reshape(8, 8) * 1000).numpy().astype("uint16")
    Image.fromarray(wide).save(tmp_path / "wide.png")  # a 16-bit greyscale PNG
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    assert data.read_image(tmp_path / "wide.png").tolist()[0][7][7] == round(63000 / 257)
    Image.new("1", (4, 4), 1).save(tmp_path / "bit.png")
    assert (
        data.read_image(tmp_path / "bit.png").shape == (1, 4, 4)
        and (data.read_image(tmp_path / "bit.png") == 255).all()
    )
    Image.new("P", (4, 4), 3).save(tmp_path / "palette.png")
    assert data.read_image(tmp_path / "palette.png").shape == (3, 4, 4)
    (tmp_path / "._wide.png").write_bytes(b"resource fork")
    assert [p.name for p in data.image_files(tmp_path)] == ["bit.png", "palette.png", "wide.png"]
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 64 * 64 // 4  # more than twice the limit: PIL raises DecompressionBombError
        with pytest.raises(UserError, match="bomb.png.*DecompressionBombError"):
            data.read_image(tmp_path / "bomb.png")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_empty_idx_files_give_one_line(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", torch.zeros(0, 28, 28, dtype=torch.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(0, dtype=torch.uint8))
    with pytest.raises(UserError, match="holds no items"):
        load_mnist_like("mnist", str(tmp_path), download=False)


def test_folder_empty_missing_or_unset(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="no image files"):
        build_dataset("folder", str(tmp_path / "empty"), 8)
    with pytest.raises(UserError, match="no such folder"):
        build_dataset("folder", str(tmp_path / "missing"), 8)
    with pytest.raises(UserError, match="needs --data_dir"):
        build_dataset("folder", None, 8)


# ------------------------------------------------------------------------------------------------ 2-D toy data
def test_toy_moments_closed_form():
    mean, cov = toy_moments("gaussians")
    assert mean.dtype == cov.dtype == torch.float64 and mean.shape == (2,) and cov.shape == (2, 2)
    # Against the definition: std^2 I + the average of c c^T over the 5 centres (which sum to 0).
    angles = torch.tensor([-2 * math.pi * k / 5 for k in range(5)], dtype=torch.float64)
    centres = 3 * torch.stack([angles.cos(), angles.sin()], dim=1)
    assert centres.sum(0).abs().max() < 1e-12 and torch.equal(mean, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(cov, 0.25 * torch.eye(2, dtype=torch.float64) + centres.T @ centres / 5, atol=1e-12)
    assert torch.allclose(cov, (0.25 + 9 / 2) * torch.eye(2, dtype=torch.float64), atol=1e-12)
    mean, cov = toy_moments("rings")
    assert torch.equal(mean, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(cov, ((1 + 4 + 9) / 3 + 0.05**2) / 2 * torch.eye(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("name", ["gaussians", "rings"])
def test_toy_data_matches_exact_moments(name):
    ds = build_dataset(name, None, img_size=999)
    x = ds.points.double()
    n = len(x)
    assert n == 100_000 and ds.points.dtype == torch.float32 and ds.sample_shape == (2,)
    mean, cov = toy_moments(name)
    # Each sample moment is a mean of n i.i.d. terms: its standard error is the terms' std / sqrt(n), estimated
    # from the data. 5 standard errors: a false failure has probability ~1e-6 per entry (and the data are fixed).
    se_mean = x.std(0) / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all()
    centred = x - mean  # the exact mean, so the mean of the products is an unbiased estimate of cov
    products = centred[:, :, None] * centred[:, None, :]
    se_cov = products.std(0) / math.sqrt(n)
    assert ((products.mean(0) - cov).abs() < 5 * se_cov).all()
    # Labels are the mixture component.
    if name == "gaussians":
        assert ds.n_classes == 5
        for k in range(5):
            angle = -2 * math.pi * k / 5
            centre = torch.tensor([3 * math.cos(angle), 3 * math.sin(angle)], dtype=torch.float64)
            assert (x[ds.labels == k].mean(0) - centre).abs().max() < 0.02  # se = 0.5 / sqrt(20k) = 0.0035
    else:
        assert ds.n_classes == 3
        radius = x.norm(dim=1)
        for k in range(3):
            assert abs(radius[ds.labels == k].mean().item() - (k + 1)) < 0.005  # se = 0.05 / sqrt(33k)


def test_toy_data_is_fixed_and_split():
    a, b = build_dataset("rings", None, 32), build_dataset("rings", "/ignored", 64)
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    test = build_dataset("rings", None, 32, train=False)
    assert len(test) == 10_000 and not torch.equal(test.points[:100], a.points[:100])


def test_point_dataset_list_indexing():
    points = torch.arange(20, dtype=torch.float32).view(10, 2)
    ds = PointDataset(points, torch.arange(10) % 3, n_classes=3)
    x, y = ds[[4, 0, 9]]
    assert torch.equal(x, points[[4, 0, 9]]) and y.tolist() == [1, 0, 0]
    assert len(ds) == 10 and ds.sample_shape == (2,) and ds.n_classes == 3
