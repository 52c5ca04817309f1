"""translate.py: pix2pix and CycleGAN losses against hand-computed values, the image pool's probability, SSIM's
closed forms, the paired/unpaired data readers, the networks' layouts, and the script run the way users run it
(demos on tiny IDX data and image folders: artefacts, bit-exact resume with the pools, two processes, --only_test,
sample.py --input_dir writing exactly one output per input)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from losses import LeastSquaresLoss, Pix2PixLoss, cycle_loss, identity_loss
from metrics.ssim import ssim
from modelling import build_translator
from modelling.translation import PatchDiscriminator
from tests.conftest import cli_error, read_stats, run_script
from tests.test_gan_mnist import _same_tree
from translate import ImagePool
from utils.ckpt import load_training_state
from utils.cli import UserError
from utils.pairs import paired_folder, sobel_edges, unpaired_folders

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SOFTPLUS = lambda x: math.log1p(math.exp(x))  # noqa: E731  BCE with logits: -log sigmoid(x) = softplus(-x)


# ------------------------------------------------------------------------------------------------ losses
def test_pix2pix_loss_on_hand_computed_inputs():
    loss = Pix2PixLoss(l1_weight=100.0)
    d_reals = torch.tensor([[[2.0, -1.0], [0.0, 0.0]]])  # one sample, a 2x2 patch map
    d_fakes = torch.tensor([[[0.0, 1.0], [-3.0, 0.0]]])
    # D: 0.5 * (mean BCE(real patches, 1) + mean BCE(fake patches, 0)), with BCE(x, 1) = softplus(-x)
    # and BCE(x, 0) = softplus(x)
    real_term = (SOFTPLUS(-2) + SOFTPLUS(1) + 2 * math.log(2)) / 4
    fake_term = (math.log(2) + SOFTPLUS(1) + SOFTPLUS(-3) + math.log(2)) / 4
    assert loss.d_loss(d_reals, d_fakes).item() == pytest.approx(0.5 * (real_term + fake_term), rel=1e-6)
    # G: mean BCE(fake patches, 1) + 100 * mean |output - target| over the output's pixels only.
    outputs = torch.tensor([[[[0.5, -0.5], [0.0, 1.0]]]])
    targets = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]]])
    adversarial = (math.log(2) + SOFTPLUS(-1) + SOFTPLUS(3) + math.log(2)) / 4
    assert loss.g_loss(d_fakes, outputs, targets).item() == pytest.approx(adversarial + 100 * 0.5, rel=1e-6)
    assert Pix2PixLoss(l1_weight=0).g_loss(d_fakes, outputs, targets).item() == pytest.approx(adversarial, rel=1e-6)
    # Per sample: two samples give two values.
    assert loss.g_loss(d_fakes.repeat(2, 1, 1), outputs.repeat(2, 1, 1, 1), targets.repeat(2, 1, 1, 1)).shape == (2,)


def test_least_squares_loss():
    lsgan = LeastSquaresLoss()
    ones, zeros = torch.ones(2, 3, 3), torch.zeros(2, 3, 3)
    assert lsgan.d_loss(ones, zeros).tolist() == [0.0, 0.0] and lsgan.g_loss(ones).tolist() == [0.0, 0.0]
    # 0.5 * ((0.5 - 1)^2 + 2^2) = 2.125; G: (2 - 1)^2 = 1
    assert lsgan.d_loss(torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 2.0)).item() == pytest.approx(2.125)
    assert lsgan.g_loss(torch.full((1, 2, 2), 2.0)).item() == pytest.approx(1.0)


def test_cycle_loss_is_zero_for_identity_maps_and_measures_the_round_trip():
    torch.manual_seed(0)
    a, b = torch.rand(3, 1, 4, 4) * 2 - 1, torch.rand(3, 1, 4, 4) * 2 - 1
    identity = nn.Identity()
    assert cycle_loss(identity, identity, a, b).tolist() == [0.0, 0.0, 0.0]
    shift_up, shift_down = (lambda x: x + 0.25), (lambda x: x - 0.25)
    assert cycle_loss(shift_up, shift_down, a, b).abs().max() < 1e-6  # inverse maps: the round trip is exact
    # G = 2x, F = identity: F(G(a)) - a = a and G(F(b)) - b = b.
    doubled = cycle_loss(lambda x: 2 * x, identity, a, b)
    torch.testing.assert_close(doubled, a.abs().flatten(1).mean(1) + b.abs().flatten(1).mean(1))
    # G = F = +0.25: each round trip is off by 0.5 everywhere.
    torch.testing.assert_close(cycle_loss(shift_up, shift_up, a, b), torch.full((3,), 1.0))
    # Passing G(a) and F(b) in gives the same as computing them.
    torch.testing.assert_close(cycle_loss(shift_up, shift_up, a, b, a + 0.25, b + 0.25), torch.full((3,), 1.0))
    # Identity loss: G(b) - b and F(a) - a, here 0.25 each.
    torch.testing.assert_close(identity_loss(shift_up, shift_down, a, b), torch.full((3,), 0.5))


def test_image_pool_returns_stored_images_with_probability_one_half():
    torch.manual_seed(0)
    pool = ImagePool(4, (1, 1, 1), "cpu")
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and torch.equal(pool.images, first)  # filling: stored and returned
    n, from_pool, stored = 20000, 0, set(range(4))
    for k in range(4, 4 + n):
        out = int(pool.query(torch.full((1, 1, 1, 1), float(k))).item())
        if out != k:  # a stored image came back, and the new one took its place
            assert out in stored
            stored.remove(out)
            stored.add(k)
            from_pool += 1
        assert stored == set(int(v) for v in pool.images.flatten().tolist())
    # Binomial(20000, 1/2): standard deviation 0.0035; 0.015 is 4.2 of them (p = 0.6 or 0.4 would fail).
    assert from_pool / n == pytest.approx(0.5, abs=0.015)
    assert torch.equal(ImagePool(0, (1, 1, 1), "cpu").query(first), first)  # size 0: no history


# ------------------------------------------------------------------------------------------------ metrics, data
def test_ssim_closed_forms():
    x = torch.rand(2, 3, 16, 16, dtype=torch.double)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.double))
    # Constant images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2.
    a, b = torch.full((1, 1, 12, 12), 0.2, dtype=torch.double), torch.full((1, 1, 12, 12), 0.6, dtype=torch.double)
    assert ssim(a, b).item() == pytest.approx((2 * 0.12 + 1e-4) / (0.04 + 0.36 + 1e-4), rel=1e-9)
    # One 11x11 window (a single valid position): Gaussian-weighted moments written out with NumPy.
    rng = np.random.default_rng(0)
    u, v = rng.random((11, 11)), rng.random((11, 11))
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_u, mu_v = (w * u).sum(), (w * v).sum()
    var_u, var_v, cov = (w * u * u).sum() - mu_u**2, (w * v * v).sum() - mu_v**2, (w * u * v).sum() - mu_u * mu_v
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mu_u * mu_v + c1) * (2 * cov + c2) / ((mu_u**2 + mu_v**2 + c1) * (var_u + var_v + c2))
    got = ssim(torch.from_numpy(u)[None, None], torch.from_numpy(v)[None, None]).item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_sobel_edges_mark_a_step_only_where_it_is():
    step = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    step[..., 4:] = 255  # a vertical 0 -> 1 step between columns 3 and 4: Sobel |d/dx| = 4 on both columns
    edges = sobel_edges(step)
    assert edges.dtype == torch.uint8 and set(edges.unique().tolist()) == {0, 255}
    assert (edges[0, 0] > 0).any(dim=0).nonzero().flatten().tolist() == [3, 4]
    assert not sobel_edges(torch.full((1, 1, 8, 8), 200, dtype=torch.uint8)).any()  # flat: no edge, even at borders


def _png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def test_paired_and_unpaired_folders(tmp_path):
    # Side by side: A (left, value 10) | B (right, value 200), 8 x 16 -> two 8 x 8 halves.
    side = tmp_path / "side"
    for i in range(3):
        _png(side / f"{i}.png", np.concatenate([np.full((8, 8), 10), np.full((8, 8), 200)], axis=1))
    data = paired_folder(str(side), 8)
    inputs, targets = data[[0, 2]]
    assert inputs.shape == (2, 1, 8, 8) and torch.allclose(inputs, torch.tensor(10 / 127.5 - 1))
    assert torch.allclose(targets, torch.tensor(200 / 127.5 - 1))
    swapped = paired_folder(str(side), 8, reverse=True)[[1]]
    assert torch.equal(swapped[0], targets[:1]) and torch.equal(swapped[1], inputs[:1])
    # Two folders matched by name (extension aside), RGB targets for grey inputs.
    two = tmp_path / "two"
    for name, value in (("x", 1), ("y", 2)):
        _png(two / "A" / f"{name}.png", np.full((8, 8), value))
        _png(two / "B" / f"{name}.png", np.full((8, 8, 3), 100 + value))
    data = paired_folder(str(two), 8)
    inputs, targets = data[[1]]
    assert (data.in_channels, data.out_channels) == (1, 3)
    assert torch.allclose(inputs, torch.tensor(2 / 127.5 - 1)) and torch.allclose(
        targets, torch.tensor(102 / 127.5 - 1)
    )
    _png(two / "B" / "z.png", np.full((8, 8, 3), 9))
    with pytest.raises(UserError, match="1 image\\(s\\) in B/ have no partner"):
        paired_folder(str(two), 8)
    # Unpaired: CycleGAN's trainA/trainB layout, any sizes.
    (tmp_path / "un" / "trainA").mkdir(parents=True)
    _png(tmp_path / "un" / "trainA" / "a.png", np.full((8, 8), 5))
    for i in range(3):
        _png(tmp_path / "un" / "trainB" / f"{i}.png", np.full((8, 8), 7))
    domain_a, domain_b = unpaired_folders(str(tmp_path / "un"), 8)
    assert (len(domain_a), len(domain_b)) == (1, 3)
    with pytest.raises(UserError, match="needs two folders"):
        unpaired_folders(str(side), 8)


def test_networks_follow_their_papers_layouts():
    unet = build_translator("unet", img_size=32, in_channels=1, out_channels=3, base_dim=4)
    assert len(unet.down) == 5 and unet(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)  # 32 -> 1 -> 32
    # No norm on the first and the innermost (1x1) encoder layers; dropout in the three innermost decoder layers.
    assert [type(layer[1]).__name__ for layer in unet.down] == ["Identity", *["InstanceNorm2d"] * 3, "Identity"]
    assert [any(isinstance(m, nn.Dropout) for m in layer.modules()) for layer in unet.up] == [
        False,
        False,
        True,
        True,
        True,
    ]
    # 70x70 PatchGAN (n_layers 3): output h = S / 8 - 2, on (input, output) pairs when conditional.
    patch = PatchDiscriminator(img_size=64, in_channels=3, cond_channels=1, base_dim=4)
    assert patch(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)).shape == (2, 6, 6)
    assert patch.net[0].in_channels == 4
    resnet = build_translator("resnet", img_size=16, in_channels=1, out_channels=1, base_dim=4, n_blocks=2)
    assert resnet(torch.randn(1, 1, 16, 16)).shape == (1, 1, 16, 16)
    pair = build_translator("cycle", img_size=16, a_channels=1, b_channels=3, base_dim=4, n_blocks=1)
    assert pair(torch.randn(1, 1, 16, 16)).shape == (1, 3, 16, 16)
    assert pair(torch.randn(1, 3, 16, 16), reverse=True).shape == (1, 1, 16, 16)


# ------------------------------------------------------------------------------------------------ the script
SMALL = {
    "pix2pix": ["--gen_kwargs", '{"base_dim": 4}', "--disc_kwargs", '{"base_dim": 4, "n_layers": 2}'],
    "cyclegan": ["--gen_kwargs", '{"base_dim": 4, "n_blocks": 1}', "--disc_kwargs", '{"base_dim": 4, "n_layers": 2}'],
}
DEMO = {"pix2pix": "fashion_mnist_edges", "cyclegan": "fashion_mnist_sneakers_boots"}


def translate(model, log_dir, *args, data=None, **kw):
    data = data or ["--dataset", DEMO[model]]
    common = ["--model", model, *data, "--img_size", "16", "--batch_size", "4", "--log_dir", log_dir]
    common += ["--loggers", "none", "--num_workers", "0", "--no-download", *SMALL[model]]
    return run_script("translate.py", *common, *map(str, args), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pix2pix", "cyclegan"])
def test_demo_trains_evaluates_resumes_bit_exactly_and_translates_folders(tmp_path, mnist_dir, model):
    data = ["--dataset", DEMO[model], "--data_dir", mnist_dir]
    # CycleGAN: pools of 3 at batch 4 fill in the first step, so the resumed half draws from them.
    args = ["--n_steps", "4", "--checkpoint_interval", "2", "--log_interval", "1", "--eval_interval", "4"]
    args += ["--eval_samples", "8", "--sample_interval", "4", "--pool_size", "3", "--ema", "--lr_decay_start", "0.5"]
    translate(model, tmp_path, "--log_name", "straight", *args, data=data)
    translate(model, tmp_path, "--log_name", "split", *args, "--n_steps", "2", data=data)
    result = translate(model, tmp_path, "--log_name", "split", *args, "--resume", "latest", data=data)
    assert "resuming from" in result.stdout
    straight, split = (load_training_state(tmp_path / n / "states" / "state-00000004") for n in ("straight", "split"))
    nets = ["gen", "disc"] if model == "pix2pix" else ["gen_ab", "gen_ba", "disc_b", "disc_a", "pools"]
    for key in nets + ["optim_g", "optim_d", "ema"]:
        assert _same_tree(straight[key], split[key], key) == []
    if model == "cyclegan":
        assert straight["pools"]["counts"].tolist() == [[3, 3]]  # (processes, domains): both pools full
    rows = read_stats(tmp_path / "straight")
    assert [r["lr"] for r in rows] == pytest.approx([2e-4, 2e-4, 2e-4, 1e-4])  # constant, then linear to 0
    untimed = [[{k: v for k, v in r.items() if k not in ("sec_per_kimg", "mem_gb", "n_steps")} for r in read_stats(
        tmp_path / name)] for name in ("straight", "split")]  # fmt: skip
    assert untimed[0] == untimed[1]  # every logged loss of the resumed run equals the uninterrupted one
    evaluation = json.loads((tmp_path / "straight" / "eval" / "step-00000004.json").read_text())
    metric = "l1" if model == "pix2pix" else "fd_target"
    assert evaluation["metric"] == metric and np.isfinite(evaluation["value"])
    if model == "pix2pix":
        assert 0 < evaluation["l1"] < 2 and -1 <= evaluation["ssim"] <= 1 and evaluation["n_samples"] == 8
    # Grid: 2 triplets a row; pix2pix 8 held-out pairs -> 4 rows (synthetic test split: 64 images).
    grid = Image.open(tmp_path / "straight" / "grids" / "ema-00000004.png")
    assert grid.size[0] == 6 * 18 + 2

    # sample.py: exactly one output per input (nested folders, JPEG and PNG, any size), one report.
    inputs = tmp_path / "inputs"
    for i in range(5):
        _png(inputs / ("sub" if i % 2 else "") / f"{i}.png", np.full((20, 12), 30 * i))
    _png(inputs / "grey.jpg", np.full((16, 16), 90))
    out = tmp_path / "out"
    extra = ["--reverse"] if model == "cyclegan" else []
    result = run_script("sample.py", "--checkpoint", tmp_path / "straight", "--input_dir", inputs, "--out_dir", out,
                        "--batch_size", "2", *extra, launcher=TORCHRUN)  # fmt: skip
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png") if p.name != "grid.png")
    assert written == ["0.png", "2.png", "4.png", "grey.png", "sub/1.png", "sub/3.png"]
    assert all(Image.open(out / w).size == (16, 16) for w in written)
    assert result.stdout.count("wrote 6 translations") == 1
    info = json.loads((out / "sample_info.json").read_text())
    assert info["n_inputs"] == info["n_outputs"] == 6 and info["reverse"] == (model == "cyclegan")
    # --only_test scores the newest snapshot with the same metric, in its own folder.
    result = translate(model, tmp_path, "--log_name", "straight", "--only_test", "--eval_samples", "8", data=data)
    test_file = json.loads(next((tmp_path / "straight" / "test").glob("last-*.json")).read_text())
    assert test_file["metric"] == metric and test_file["value"] == pytest.approx(evaluation["value"], rel=1e-9)
    if model == "cyclegan":  # next to it, the same FD of the A images untranslated: what translating must beat
        assert test_file["fd_target_untranslated"] > 0 and test_file["fd_target_untranslated"] != test_file["value"]


@pytest.mark.parametrize("model", ["pix2pix", "cyclegan"])
def test_two_processes_on_image_folders(tmp_path, model):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(6):
        if model == "pix2pix":  # A|B side by side, RGB
            _png(root / f"{i}.jpg", rng.integers(0, 256, (16, 32, 3)))
        else:
            _png(root / "trainA" / f"{i}.png", rng.integers(0, 256, (16, 16)))
            _png(root / "trainB" / f"{i}.png", rng.integers(0, 256, (18, 18)))
    data = ["--dataset", "paired" if model == "pix2pix" else "unpaired", "--data_dir", root]
    args = ["--log_name", "ddp", "--n_steps", "2", "--checkpoint_interval", "2", "--log_interval", "2"]
    result = translate(model, tmp_path, *args, "--eval_interval", "2", "--eval_samples", "4", data=data,
                       launcher=TORCHRUN)  # fmt: skip
    assert "parameters identical on 2 process(es)" in result.stdout
    assert read_stats(tmp_path / "ddp")[-1]["kimg"] == pytest.approx(2 * 2 * 4 / 1000)
    if model == "cyclegan":
        assert load_training_state(tmp_path / "ddp" / "states" / "state-00000002")["pools"]["counts"].shape == (2, 2)


def test_bad_input_gives_one_line(tmp_path, mnist_dir, capsys):
    import translate as script

    base = ["--log_dir", str(tmp_path), "--no-download", "--data_dir", str(mnist_dir), "--img_size", "16"]
    cases = [
        (["--model", "pix2pix", "--dataset", "unpaired"], "--model pix2pix trains on fashion_mnist_edges or paired"),
        (["--model", "cyclegan", "--eval_metric", "ssim", "--dataset", "unpaired"], "does not apply to cyclegan"),
        (["--model", "pix2pix", "--dataset", "paired", "--data_dir", str(tmp_path / "none")], "no such folder"),
        (["--model", "pix2pix", "--dataset", "fashion_mnist_edges", "--gen_kwargs", '{"depth": 9}'], "divisible"),
        (["--model", "pix2pix", "--lr_decay_start", "2"], "--lr_decay_start in [0, 1]"),
    ]
    for args, fragment in cases:
        assert fragment in cli_error(script.cli, base + args, capsys)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"] == []  # nothing was written
