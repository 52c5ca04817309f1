"""sample.py end to end: per-seed determinism, sharding over processes, class labels, bad checkpoints."""

import json
import pickle
import sys

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, assert_same_images, run_script, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_dir):
    log_dir = tmp_path_factory.mktemp("runs")
    train(mnist_dir, log_dir, "--log_name", "uncond", "--n_steps", "2", "--ema")
    train(mnist_dir, log_dir, "--log_name", "cond", "--n_steps", "2", "--conditional")
    return log_dir


def _sample(checkpoint, out_dir, *args, **kw):
    """sample.py on `checkpoint`, writing into `out_dir`."""
    return run_script("sample.py", "--checkpoint", checkpoint, *args, "--out_dir", out_dir, **kw)


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("0*.png"))}


@pytest.mark.slow
def test_images_depend_only_on_seed_not_batch_or_processes(tmp_path, runs):
    seeds_3_to_14 = ["--start_seed", "3", "--end_seed", "14"]
    _sample(runs / "uncond", tmp_path / "a", "--n_samples", "12", "--seed", "3", "--batch_size", "5")
    _sample(runs / "uncond", tmp_path / "b", *seeds_3_to_14, "--batch_size", "12")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = _sample(runs / "uncond", tmp_path / "c", *seeds_3_to_14, "--batch_size", "4", launcher=launcher)
    a = _pngs(tmp_path / "a")
    assert sorted(a) == [f"{s:06d}.png" for s in range(3, 15)]
    assert (
        assert_same_images(tmp_path / "a", tmp_path / "b") == assert_same_images(tmp_path / "a", tmp_path / "c") == 12
    )
    assert len(set(a.values())) == 12  # and the seeds do give different images
    assert result.stdout.count("wrote 12 images") == 1  # one report, from rank 0
    info = json.loads((tmp_path / "c" / "sample_info.json").read_text())
    assert info["seeds"] == [3, 14] and info["n_images"] == 12 and info["nfe"] == 1 and info["step"] == 2
    assert (tmp_path / "c" / "grid.png").is_file()


def test_class_labels(tmp_path, runs):
    _sample(runs / "cond", tmp_path / "mixed", "--n_samples", "20")
    _sample(runs / "cond", tmp_path / "threes", "--n_samples", "20", "--class_label", "3")
    mixed, threes = _pngs(tmp_path / "mixed"), _pngs(tmp_path / "threes")
    # Without --class_label, seed s gets class s mod 10: seeds 3 and 13 match the all-threes run, others do not.
    same = sorted(name for name in mixed if mixed[name] == threes[name])
    assert same == ["000003.png", "000013.png"]
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "mixed" / "grid.png"))
    assert grid.shape[:2] == (10 * 32 + 11 * 2, 2 * 32 + 3 * 2)  # one row per class, 2 images each
    # Row 3 holds seeds 3 and 13 (class 3) in seed order: the grid tile equals the written file.
    tile = grid[2 + 3 * 34 : 2 + 3 * 34 + 32, 2 + 34 : 2 + 34 + 32]
    assert (tile[..., 0] if tile.ndim == 3 else tile).tolist() == np.asarray(
        Image.open(tmp_path / "mixed" / "000013.png")
    ).tolist()


@pytest.mark.slow
def test_bad_checkpoints_and_flags(tmp_path, runs):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    state = next((runs / "uncond" / "states").iterdir())
    cases = [
        (["--checkpoint", evil], ["not a genzoo snapshot"]),
        (["--checkpoint", state / "tensors.safetensors"], ["not a genzoo snapshot"]),
        (["--checkpoint", state], ["no snapshots"]),
        (["--checkpoint", tmp_path / "nope"], ["no such"]),
        ([], ["--checkpoint is required"]),
        (["--checkpoint", runs / "uncond", "--class_label", "2"], ["unconditional"]),
        (["--checkpoint", runs / "cond", "--class_label", "10"], ["labels are 0..9"]),
        (["--checkpoint", runs / "cond", "--start_seed", "5"], ["--end_seed"]),
    ]
    for args, fragments in cases:
        result = run_script("sample.py", *args, "--out_dir", tmp_path / "out", ok=False)
        assert_one_line_error(result, *fragments)
