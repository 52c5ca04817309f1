"""AC-GAN and BigGAN: the class loss and the orthogonal regulariser against hand-computed values and their closed
forms, BigGAN's hierarchical latents, conditional BN and truncation, and both models run through gan_mnist.py /
gan_celeba.py / sample.py (train, sample, bit-exact resume, two processes)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from losses import AuxClassifierLoss, orthogonal_penalty
from modelling import build_discriminator, build_generator
from modelling.biggan import LinearConditionalBatchNorm
from sampling import gan_images, seed_latents, truncated_latents
from tests.conftest import assert_one_line_error, read_stats, run_script, train
from tests.test_gan_mnist import _same_tree
from utils.ckpt import load_training_state

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# ------------------------------------------------------------------------------------------------ AC-GAN
def test_acgan_class_loss_on_hand_computed_logits():
    loss = AuxClassifierLoss()
    c_reals = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    c_fakes = torch.tensor([[1.0, 3.0, 0.0], [5.0, 5.0, 5.0]])
    real_labels, fake_labels = torch.tensor([0, 2]), torch.tensor([1, 0])
    # -log softmax: row [2, 0, -1] at 0 is log(1 + e^-2 + e^-3); [1, 3, 0] at 1 is the same; equal logits: log 3.
    a = math.log(1 + math.exp(-2) + math.exp(-3))
    expected_d = torch.tensor([a + a, math.log(3) + math.log(3)])
    torch.testing.assert_close(loss.d_loss(c_reals, c_fakes, real_labels, fake_labels), expected_d)
    torch.testing.assert_close(loss.g_loss(c_fakes, fake_labels), torch.tensor([a, math.log(3)]))
    # The fake term uses the labels the fakes were drawn for: another label costs log(1 + e^2 + e^-1) - ...
    wrong = loss.g_loss(c_fakes[:1], torch.tensor([0]))
    assert wrong.item() == pytest.approx(math.log(math.exp(1) + math.exp(3) + 1) - 1)
    # fp32 even from bf16 logits
    assert loss.g_loss(c_fakes.bfloat16(), fake_labels).dtype == torch.float32


def test_acgan_discriminator_has_a_class_head_and_ignores_labels():
    torch.manual_seed(0)
    disc = build_discriminator("acgan", img_size=16, img_channels=1, base_dim=8, n_classes=5, norm="none")
    x = torch.randn(3, 1, 16, 16)
    source, classes = disc(x, torch.tensor([0, 1, 2]), aux=True)
    assert source.shape == (3,) and classes.shape == (3, 5)
    assert torch.equal(source, disc(x)) and torch.equal(source, disc(x, torch.tensor([4, 4, 4])))
    (source.sum() + classes.sum()).backward()
    assert all(p.grad is not None for p in disc.parameters())
    # The trunk is DCGAN's (every layer but the last), the heads are k4 convs over the final 4x4 map.
    assert (disc.source.kernel_size, disc.classes.out_channels) == ((4, 4), 5)
    with pytest.raises(ValueError, match="no class head"):
        build_discriminator("acgan", img_size=16, img_channels=1, base_dim=8)(x, aux=True)


# ------------------------------------------------------------------------------------------------ BigGAN
def _off_diagonal_gram_norm(w: torch.Tensor) -> torch.Tensor:
    w = w.double().flatten(1)
    gram = w @ w.T
    return (gram * (1 - torch.eye(len(gram), dtype=torch.double))).square().sum()


def test_orthogonal_penalty_follows_its_formula():
    # W W^T = [[2, 1], [1, 1]]: off-diagonal entries 1 and 1 -> 2 (the diagonal, the filter norms, is free).
    square = nn.Linear(2, 2, bias=False)
    square.weight.data = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert orthogonal_penalty(square).item() == pytest.approx(2.0)
    # Tall W (3 filters of 2 inputs): W W^T = [[1, 0, 1], [0, 1, 1], [1, 1, 2]] -> 4 (the W^T W identity path).
    tall = nn.Linear(2, 3, bias=False)
    tall.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert orthogonal_penalty(tall).item() == pytest.approx(4.0)
    # Conv filters are the rows of the (out, in * k * k) reshape: (1, 0, 0, 0) . (1, 1, 0, 0) = 1 -> 2.
    conv = nn.Conv2d(1, 2, 2, bias=True)
    conv.weight.data = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    assert orthogonal_penalty(conv).item() == pytest.approx(2.0)  # the 1-D bias does not count
    # Orthogonal filters of any norms: 0.
    diagonal = nn.Linear(2, 2, bias=False)
    diagonal.weight.data = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    assert orthogonal_penalty(diagonal).item() == 0.0
    # Gradient: d/dW ||W W^T (.) (1 - I)||^2 = 4 ((W W^T) (.) (1 - I)) W, for wide and tall W.
    torch.manual_seed(0)
    for shape in [(5, 9), (9, 5)]:
        layer = nn.Linear(shape[1], shape[0], bias=False).double()
        orthogonal_penalty(layer).backward()
        w = layer.weight.detach()
        expected = 4 * ((w @ w.T) * (1 - torch.eye(shape[0], dtype=torch.double))) @ w
        torch.testing.assert_close(layer.weight.grad, expected)


def test_orthogonal_penalty_of_biggan_skips_the_shared_embedding_and_sees_raw_sn_weights():
    torch.manual_seed(0)
    gen = build_generator("biggan", img_size=16, img_channels=1, z_dim=9, base_dim=4, n_classes=3, shared_dim=4)
    for p in gen.parameters():  # off orthogonal init (which zeroes most terms, the embedding's included)
        p.data.normal_()
    gen.shared.weight.data.mul_(10)  # an embedding term as large as all the others: leaving it in shows
    named = dict(gen.named_parameters())
    assert "shared.weight" in named and not hasattr(gen.shared, "parametrizations")  # plain lookup table
    assert "dense.parametrizations.weight.original" in named  # SN: the raw weight is the parameter
    expected = sum(_off_diagonal_gram_norm(p) for n, p in named.items() if p.ndim >= 2 and not n.startswith("shared"))
    assert orthogonal_penalty(gen).item() == pytest.approx(expected.item(), rel=1e-5)
    assert orthogonal_penalty(gen, skip=()).item() > expected.item()  # the embedding would add to it


def test_biggan_hierarchical_latents_and_shared_embedding_reach_every_block():
    torch.manual_seed(0)
    gen = build_generator("biggan", img_size=32, img_channels=1, z_dim=10, base_dim=4, n_classes=5, shared_dim=6)
    assert gen.chunks == [3, 3, 2, 2]  # 3 blocks + the dense layer: tensor_split of 10
    seen = []
    for block in gen.blocks:
        block.bn1.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    zs, labels = torch.randn(4, 10), torch.tensor([0, 1, 4, 4])
    assert gen(zs, labels).shape == (4, 1, 32, 32)
    shared = gen.shared(labels)
    for i, cond in enumerate(seen):  # block i: concat(shared(y), chunk i + 1)
        lo = sum(gen.chunks[: i + 1])
        torch.testing.assert_close(cond, torch.cat([shared, zs[:, lo : lo + gen.chunks[i + 1]]], dim=1))
    with pytest.raises(ValueError, match="z_dim >= 4"):
        build_generator("biggan", img_size=32, img_channels=1, z_dim=3, base_dim=4)


def test_linear_conditional_batchnorm_formula():
    torch.manual_seed(0)
    cbn = LinearConditionalBatchNorm(3, 2)
    x, c = torch.randn(4, 3, 2, 2), torch.randn(4, 2)
    normalised = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / (
        x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    ).sqrt()
    gain, bias = 1 + c @ cbn.gain.weight.T, c @ cbn.bias.weight.T
    torch.testing.assert_close(cbn(x, c), normalised * gain[:, :, None, None] + bias[:, :, None, None])


def test_truncated_latents_are_a_truncated_normal_per_seed():
    threshold = 0.5
    zs = truncated_latents(list(range(1000)), 100, threshold)
    assert zs.abs().max() <= threshold
    # Var of N(0, 1) restricted to [-a, a]: 1 - 2 a phi(a) / (2 Phi(a) - 1) = 0.080589 at a = 0.5 (clamping instead of
    # redrawing would pile mass at +-a: 0.138).
    phi, cdf = math.exp(-(threshold**2) / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(threshold / math.sqrt(2)))
    expected_var = 1 - 2 * threshold * phi / (2 * cdf - 1)
    assert expected_var == pytest.approx(0.080589, abs=1e-6)
    assert zs.var().item() == pytest.approx(expected_var, rel=0.02)
    # One latent per seed, whatever the batch; a loose threshold changes nothing.
    torch.testing.assert_close(truncated_latents([7, 3], 100, threshold), zs[[7, 3]])
    torch.testing.assert_close(truncated_latents([5], 100, 1e9), seed_latents([5], 100))
    gen = build_generator("biggan", img_size=16, img_channels=1, z_dim=9, base_dim=4).eval()
    images, nfe = gan_images(gen, [5], None, "cpu", truncation=threshold)
    assert nfe == 1 and torch.equal(images, gen(truncated_latents([5], 9, threshold)))


# ------------------------------------------------------------------------------------------------ scripts
BIG = ["--model", "biggan", "--gen_kwargs", '{"base_dim": 8, "shared_dim": 8}', "--disc_kwargs", '{"base_dim": 8}']


def _celeba(data_dir, log_dir, *args, **kw):
    common = ["--dataset", "mnist", "--data_dir", data_dir, "--no-download", "--img_size", "16", "--z_dim", "8"]
    common += ["--batch_size", "4", "--num_workers", "0", "--loggers", "none", "--log_dir", log_dir]
    return run_script("gan_celeba.py", *common, *BIG, *map(str, args), **kw)


@pytest.mark.slow
def test_acgan_trains_resumes_bit_exactly_and_samples_classes(tmp_path, mnist_dir):
    args = ["--model", "acgan", "--conditional", "--ema", "--n_steps", "4", "--checkpoint_interval", "2"]
    args += ["--log_interval", "2", "--sample_interval", "4", "--loggers", "none"]
    train(mnist_dir, tmp_path, "--log_name", "straight", *args)
    train(mnist_dir, tmp_path, "--log_name", "split", *args, "--n_steps", "2")
    train(mnist_dir, tmp_path, "--log_name", "split", *args, "--resume", "latest")
    straight, split = (load_training_state(tmp_path / n / "states" / "state-00000004") for n in ("straight", "split"))
    for key in ("gen", "disc", "optim_g", "optim_d", "ema"):
        assert _same_tree(straight[key], split[key], key) == []
    assert any(k.startswith("classes.") for k in straight["disc"])  # the class head was trained and saved
    row = read_stats(tmp_path / "straight")[-1]
    assert row["loss/d_class"] > 0 and row["loss/g_class"] > 0 and 0 <= row["d/class_acc"] <= 1
    run_script("sample.py", "--checkpoint", tmp_path / "straight", "--n_samples", "4", "--class_label", "3",
               "--out_dir", tmp_path / "s")  # fmt: skip
    info = json.loads((tmp_path / "s" / "sample_info.json").read_text())
    assert info["model"] == "acgan" and info["n_classes"] == 10 and info["class_label"] == 3
    bad = train(mnist_dir, tmp_path, "--log_name", "x", "--model", "acgan", ok=False)
    assert_one_line_error(bad, "--model acgan is class-conditional", "--conditional")


@pytest.mark.slow
def test_biggan_defaults_train_resume_bit_exactly_and_sample_truncated(tmp_path, mnist_dir):
    args = ["--conditional", "--ema", "--n_steps", "5", "--checkpoint_interval", "3", "--log_interval", "1"]
    args += ["--sample_interval", "5"]
    _celeba(mnist_dir, tmp_path, "--log_name", "straight", *args)
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert (config["method"], config["lr"], config["lr_d"], config["beta1"], config["beta2"]) == (
        "hinge", 5e-5, 2e-4, 0.0, 0.999)  # fmt: skip
    assert (config["train_g_interval"], config["ortho_reg"]) == (2, 1e-4)
    rows = read_stats(tmp_path / "straight")
    assert ["penalty/ortho" in r for r in rows] == [True, False, True, False, True]  # G steps at 0, 2, 4
    # Split at step 3: between two G steps (2 D steps per G step).
    _celeba(mnist_dir, tmp_path, "--log_name", "split", *args, "--n_steps", "3")
    _celeba(mnist_dir, tmp_path, "--log_name", "split", *args, "--resume", "latest")
    straight, split = (load_training_state(tmp_path / n / "states" / "state-00000005") for n in ("straight", "split"))
    for key in ("gen", "disc", "optim_g", "optim_d", "ema"):
        assert _same_tree(straight[key], split[key], key) == []
    run_script("sample.py", "--checkpoint", tmp_path / "straight", "--n_samples", "4", "--truncation", "0.5",
               "--class_label", "1", "--out_dir", tmp_path / "s")  # fmt: skip
    info = json.loads((tmp_path / "s" / "sample_info.json").read_text())
    assert info["sampler"] == {"truncation": 0.5} and info["model"] == "biggan"
    assert np.asarray(Image.open(tmp_path / "s" / "000000.png")).shape == (16, 16)
    bad = run_script("sample.py", "--checkpoint", tmp_path / "straight", "--truncation", "0", ok=False)
    assert_one_line_error(bad, "biggan: --truncation is a threshold > 0")


@pytest.mark.parametrize("script", ["gan_mnist", "gan_celeba"])
def test_two_processes(tmp_path, mnist_dir, script):
    """gan_mnist.py AC-GAN under WGAN-GP (the penalty on the source head only, the class head trained by the class
    loss), gan_celeba.py BigGAN with its orthogonal penalty: both ranks end with identical weights."""
    args = ["--log_name", "ddp", "--n_steps", "2", "--checkpoint_interval", "2", "--log_interval", "2"]
    if script == "gan_mnist":
        extra = ["--model", "acgan", "--conditional", "--method", "wgan-gp", "--loggers", "none"]
        result = train(mnist_dir, tmp_path, *args, *extra, launcher=TORCHRUN)
    else:
        result = _celeba(mnist_dir, tmp_path, *args, "--conditional", "--train_g_interval", "1", launcher=TORCHRUN)
    assert "parameters identical on 2 process(es)" in result.stdout
    row = read_stats(tmp_path / "ddp")[-1]
    assert row["kimg"] == pytest.approx(2 * 2 * (8 if script == "gan_mnist" else 4) / 1000)
    assert ("loss/d_class" if script == "gan_mnist" else "penalty/ortho") in row
