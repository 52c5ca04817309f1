import gzip

import pytest
import torch

from tests.idx import make_mnist_dir, synthetic_digits, write_idx
from utils import data
from utils.cli import UserError
from utils.data import InfiniteSampler, build_dataset, load_mnist_like, read_idx, step_seed


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
    monkeypatch.setattr(data, "SYSTEM_DIRS", [str(tmp_path / "nowhere")])
    with pytest.raises(UserError) as err:
        load_mnist_like("mnist", str(tmp_path / "empty"), download=True)  # no network here: the download fails
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
