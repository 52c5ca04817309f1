"""translate.py's training steps pinned: the loss of each optimizer step (pix2pix's D and G steps, CycleGAN's G step
and its D step for both discriminators), as the script's own step functions assemble it, equals the papers' formula
written out here on a fixed tiny batch through tiny real networks, and only the network being trained receives a
gradient; the training images' random jitter and mirroring (one draw per pair, off with --no-augment); and a short
pix2pix run that learns, with its evaluation on the held-out pairs as they are."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import translate
from modelling import build_translator
from modelling.translation import PatchDiscriminator
from utils.ckpt import build_from_snapshot, load_snapshot
from utils.grid import to_uint8
from utils.pairs import fashion_mnist_edges, jitter_size, random_jitter

TRANSLATE_SIZE = 16  # pixels: a 2 x 2 patch map from a PatchGAN with n_layers 2


def _translate_images(seed: int, *shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g) * 2 - 1 for shape in shapes]


def _translate_disc(seed: int, channels: int, cond_channels: int = 0) -> PatchDiscriminator:
    """A tiny PatchGAN whose weights are redrawn larger than the N(0, 0.02) init, so that its outputs on reals and on
    fakes differ by O(1): a swapped label or a dropped term then moves a loss far beyond the tolerance."""
    torch.manual_seed(seed)
    disc = PatchDiscriminator(
        img_size=TRANSLATE_SIZE, in_channels=channels, cond_channels=cond_channels, base_dim=4, n_layers=2
    )
    with torch.no_grad():
        for p in disc.parameters():
            p.normal_(0, 0.2)
    return disc


def _translate_bce(logits: torch.Tensor, target: float) -> float:
    """Binary cross-entropy with logits l, averaged: -log sigmoid(l) for target 1, -log(1 - sigmoid(l)) for 0."""
    l = logits.detach().double().numpy()  # noqa: E741
    p = 1 / (1 + np.exp(-l))
    return float(np.mean(-np.log(p) if target == 1 else -np.log(1 - p)))


def _translate_sq(values: torch.Tensor, target: float) -> float:
    return float(np.mean((values.detach().double().numpy() - target) ** 2))


def _translate_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean(np.abs(a.detach().double().numpy() - b.detach().double().numpy())))


def _translate_grads(module) -> list:
    return [p.grad for p in module.parameters()]


# ------------------------------------------------------------------------------------------------ pix2pix
def _translate_pix2pix():
    """U-Net G (1 -> 3 channels, so that the D's image and condition cannot be swapped silently), conditional D,
    a batch of two pairs, and the G output the loop computes once per step."""
    torch.manual_seed(0)
    gen = build_translator("unet", img_size=TRANSLATE_SIZE, in_channels=1, out_channels=3, base_dim=4)
    disc = _translate_disc(1, 3, 1)
    inputs, targets = _translate_images(
        2, (2, 1, TRANSLATE_SIZE, TRANSLATE_SIZE), (2, 3, TRANSLATE_SIZE, TRANSLATE_SIZE)
    )
    return gen, disc, inputs, targets, gen(inputs)


def test_pix2pix_d_step_is_half_the_bce_of_real_and_fake_pairs_and_trains_d_only():
    gen, disc, inputs, targets, outputs = _translate_pix2pix()
    d_real, d_fake = disc(targets, inputs), disc(outputs, inputs)  # D on (x, y) and on (x, G(x))
    assert abs(d_real.mean().item() - d_fake.mean().item()) > 0.1  # the batch tells reals from fakes apart
    expected = 0.5 * (_translate_bce(d_real, 1) + _translate_bce(d_fake, 0))
    loss, d_reals, d_fakes = translate.pix2pix_d_loss(disc, inputs, targets, outputs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close((d_reals, d_fakes), (d_real, d_fake))
    loss.backward()
    assert all(g is None for g in _translate_grads(gen))  # G(x) is detached: the D step leaves G alone
    assert all(g is not None and g.abs().sum() > 0 for g in _translate_grads(disc))


@pytest.mark.parametrize("l1_weight", [None, 7.0])  # None: the default, the paper's lambda = 100
def test_pix2pix_g_step_is_bce_plus_lambda_l1_and_trains_g_only(l1_weight):
    gen, disc, inputs, targets, outputs = _translate_pix2pix()
    cfg = translate.Config() if l1_weight is None else translate.Config(l1_weight=l1_weight)
    lam = 100.0 if l1_weight is None else l1_weight
    expected_l1 = _translate_l1(outputs, targets)  # over the output only, not the (input, output) pair
    expected = _translate_bce(disc(outputs, inputs), 1) + lam * expected_l1
    disc.requires_grad_(False)  # as the loop does around the G step
    loss, l1 = translate.pix2pix_g_loss(disc, inputs, targets, outputs, cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and l1.item() == pytest.approx(expected_l1, rel=1e-5)
    loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _translate_grads(gen))
    assert all(g is None for g in _translate_grads(disc))


# ------------------------------------------------------------------------------------------------ CycleGAN
def _translate_cyclegan():
    """G: A -> B and F: B -> A (ResNet, one block), D_B and D_A with different weights, a batch of two per domain."""
    torch.manual_seed(3)
    pair = build_translator("cycle", img_size=TRANSLATE_SIZE, a_channels=1, b_channels=1, base_dim=4, n_blocks=1)
    with torch.no_grad():  # outputs that depend more on the inputs: cycle and identity terms then differ
        for p in pair.parameters():
            p.mul_(5)
    shape = (2, 1, TRANSLATE_SIZE, TRANSLATE_SIZE)
    reals_a, reals_b = _translate_images(4, shape, shape)
    return pair.ab, pair.ba, _translate_disc(5, 1), _translate_disc(6, 1), reals_a, reals_b


@pytest.mark.parametrize(
    "weights", [None, {"cycle_weight": 3.0, "identity_weight": 0.2}, {"identity_weight": 0.0}]
)  # None: the defaults, lambda = 10 and identity 0.5 x lambda as the reference code
def test_cyclegan_g_step_is_lsgan_plus_cycle_plus_identity_and_trains_both_generators(weights):
    gen_ab, gen_ba, disc_b, disc_a, reals_a, reals_b = _translate_cyclegan()
    cfg = translate.Config(**(weights or {}))
    lam, idt = (10.0, 0.5) if weights is None else (weights.get("cycle_weight", 10.0), weights["identity_weight"])
    fake_b, fake_a = gen_ab(reals_a), gen_ba(reals_b)
    adversarial = _translate_sq(disc_b(fake_b), 1) + _translate_sq(disc_a(fake_a), 1)  # D_B judges B, D_A judges A
    cycle = _translate_l1(gen_ba(fake_b), reals_a) + _translate_l1(gen_ab(fake_a), reals_b)
    identity = _translate_l1(gen_ab(reals_b), reals_b) + _translate_l1(gen_ba(reals_a), reals_a)
    # Every term counts, and cycle and identity differ by far more than the tolerance (rel 1e-5 of about 20), so that
    # trading their weights or their inputs shows.
    assert min(adversarial, cycle, identity) > 0.05 and abs(cycle - identity) > 0.02
    expected = adversarial + lam * cycle + idt * lam * identity
    for disc in (disc_b, disc_a):
        disc.requires_grad_(False)  # as the loop does around the G step
    loss, fakes, stats = translate.cyclegan_g_loss((gen_ab, gen_ba), (disc_b, disc_a), reals_a, reals_b, cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(fakes, (fake_b, fake_a))  # what the D step's pools receive
    assert stats["loss/cycle"].item() == pytest.approx(cycle, rel=1e-5)
    assert ("loss/identity" in stats) == (idt > 0)
    loss.backward()
    for module in (gen_ab, gen_ba):
        assert all(g is not None and g.abs().sum() > 0 for g in _translate_grads(module))
    assert all(g is None for d in (disc_b, disc_a) for g in _translate_grads(d))


@pytest.mark.parametrize("pool_size", [0, 2])
def test_cyclegan_d_step_is_half_the_lsgan_loss_of_each_domain_and_trains_the_discriminators_only(pool_size):
    gen_ab, gen_ba, disc_b, disc_a, reals_a, reals_b = _translate_cyclegan()
    fakes = gen_ab(reals_a), gen_ba(reals_b)  # the G step's outputs, still attached to the generators' graph
    pools = [translate.ImagePool(pool_size, (1, TRANSLATE_SIZE, TRANSLATE_SIZE), "cpu") for _ in range(2)]
    for pool, value in zip(pools, (0.9, -0.9), strict=True):  # full histories that tell B's pool from A's
        pool.images.fill_(value)
        pool.count = pool_size
    # The images each D judges: its domain's pool answering that domain's fakes, drawn from the RNG as the step
    # draws them (ImagePool's rule itself is pinned in tests/test_translate.py).
    replicas = copy.deepcopy(pools)
    torch.manual_seed(1)
    pooled_b, pooled_a = replicas[0].query(fakes[0]), replicas[1].query(fakes[1])
    if pool_size:  # this seed hands each D a stored image and a fresh fake
        for pooled, stored in ((pooled_b, 0.9), (pooled_a, -0.9)):
            assert sorted((x == stored).all().item() for x in pooled) == [False, True]
    terms_b = _translate_sq(disc_b(reals_b), 1), _translate_sq(disc_b(pooled_b), 0)
    terms_a = _translate_sq(disc_a(reals_a), 1), _translate_sq(disc_a(pooled_a), 0)
    expected = 0.5 * sum(terms_b) + 0.5 * sum(terms_a)
    torch.manual_seed(1)
    loss, d_reals, d_fakes = translate.cyclegan_d_loss((disc_b, disc_a), pools, reals_a, reals_b, fakes)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close((d_reals, d_fakes), (disc_b(reals_b), disc_b(pooled_b)))  # logged: D_B's
    loss.backward()
    assert all(g is None for module in (gen_ab, gen_ba) for g in _translate_grads(module))
    for disc in (disc_b, disc_a):
        assert all(g is not None and g.abs().sum() > 0 for g in _translate_grads(disc))


# ------------------------------------------------------------------------------------------------ augmentation
def test_random_jitter_crops_and_flips_both_images_of_a_pair_alike_and_is_off_with_no_augment():
    assert (jitter_size(256), jitter_size(32), jitter_size(8)) == (286, 36, 9)  # the reference's 286 for 256
    size, load, n = 8, jitter_size(8), 400
    (inputs,) = _translate_images(7, (n, 1, size, size))
    targets = -inputs.expand(-1, 3, -1, -1)  # a pixelwise map of the input with other channels: a pair
    torch.manual_seed(0)
    out_in, out_tg = translate.augment_batch(translate.Config(img_size=size), inputs, targets)
    assert out_in.shape == inputs.shape and out_tg.shape == targets.shape
    torch.testing.assert_close(out_tg, -out_in.expand(-1, 3, -1, -1))  # the same crop and flip for both
    # Every output is one of the (load - size + 1)^2 crops of the resized image, mirrored or not, and all of them
    # occur, each about equally often (400 draws of 8 cases: 50 expected, binomial sd 6.6).
    big = F.interpolate(inputs, size=(load, load), mode="bicubic", align_corners=False).clamp(-1, 1)
    cases = [(t, left, flip) for t in range(load - size + 1) for left in range(load - size + 1) for flip in (0, 1)]
    counts = dict.fromkeys(cases, 0)
    for i in range(n):
        found = [c for c in cases if torch.allclose(out_in[i], (lambda x: x.flip(-1) if c[2] else x)(
            big[i, :, c[0] : c[0] + size, c[1] : c[1] + size]))]  # fmt: skip
        assert len(found) >= 1, i
        counts[found[0]] += 1
    assert min(counts.values()) >= 25 and max(counts.values()) <= 75, counts
    # A function of the RNG state the loop reseeds every step: the same seed repeats the draw, another one does not.
    torch.manual_seed(0)
    torch.testing.assert_close(translate.augment_batch(translate.Config(img_size=size), inputs)[0], out_in)
    torch.manual_seed(1)
    assert not torch.equal(translate.augment_batch(translate.Config(img_size=size), inputs)[0], out_in)
    # --no-augment: the batch as it came.
    plain = translate.augment_batch(translate.Config(img_size=size, augment=False), inputs, targets)
    assert plain[0] is inputs and plain[1] is targets
    assert translate.Config().augment  # on by default, as in both papers' code
    # Explicit generator: the pair's tensors on their own still get one draw per sample.
    a, b = random_jitter((inputs[:4], -inputs[:4]), load, torch.Generator().manual_seed(3))
    torch.testing.assert_close(b, -a)


def _translate_config(tmp_path, mnist_dir, model: str, name: str, **kw) -> "translate.Config":
    demo = "fashion_mnist_edges" if model == "pix2pix" else "fashion_mnist_sneakers_boots"
    gen = {"base_dim": 8} if model == "pix2pix" else {"base_dim": 4, "n_blocks": 1}
    return translate.Config(
        model=model, dataset=demo, data_dir=str(mnist_dir), download=False, img_size=TRANSLATE_SIZE, batch_size=8,
        gen_kwargs=gen, disc_kwargs={"base_dim": 8, "n_layers": 2}, num_workers=0, log_interval=1, sample_interval=0,
        log_dir=str(tmp_path), log_name=name, loggers="none", **kw,
    )  # fmt: skip


def _translate_stats(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["pix2pix", "cyclegan"])
def test_the_loop_trains_on_jittered_batches_unless_no_augment(tmp_path, mnist_dir, model):
    """One step from the same seed and weights: the losses differ only through the batch the loop jitters."""
    for augment in (True, False):
        translate.main(_translate_config(tmp_path, mnist_dir, model, f"aug-{augment}", n_steps=1, augment=augment))
    rows = [_translate_stats(tmp_path / f"aug-{augment}")[0] for augment in (True, False)]
    key = "loss/l1" if model == "pix2pix" else "loss/cycle"
    assert abs(rows[0][key] - rows[1][key]) > 1e-4 * rows[1][key], rows


# ------------------------------------------------------------------------------------------------ a short run
def test_pix2pix_learns_edges_to_images_and_evaluates_the_held_out_pairs_as_they_are(tmp_path, mnist_dir):
    """40 steps of 8 pairs (augmented, the default) on the synthetic IDX data: the training L1 to the targets falls
    well below its start, and the evaluation's L1 is that of the saved generator on the unaugmented held-out pairs."""
    n_steps, n_eval = 40, 16
    cfg = _translate_config(tmp_path, mnist_dir, "pix2pix", "learn", lr=1e-3, lr_decay_start=1.0, n_steps=n_steps)
    cfg.eval_interval, cfg.eval_samples, cfg.checkpoint_interval = n_steps, n_eval, n_steps
    translate.main(cfg)
    rows = _translate_stats(tmp_path / "learn")
    l1 = [r["loss/l1"] for r in rows]
    assert len(l1) == n_steps and np.mean(l1[-5:]) < 0.5 * np.mean(l1[:3]), l1
    evaluation = json.loads((tmp_path / "learn" / "eval" / f"step-{n_steps:08d}.json").read_text())
    meta, state = load_snapshot(tmp_path / "learn")
    model = build_from_snapshot(meta, state, build_translator).eval()
    inputs, targets = fashion_mnist_edges(str(mnist_dir), TRANSLATE_SIZE, False, False)[list(range(n_eval))]
    with torch.no_grad():
        outputs = to_uint8(model(inputs)).double() / 255
    expected = (outputs - to_uint8(targets).double() / 255).abs().mean().item()
    assert evaluation["l1"] == pytest.approx(expected, rel=1e-6)


def test_cyclegan_learns_to_close_the_cycle(tmp_path, mnist_dir):
    """40 steps of 8 images per domain (the synthetic IDX data's classes 7 and 9): the cycle loss |F(G(a)) - a| +
    |G(F(b)) - b| falls well below its start, and both discriminators learn to tell reals from pooled fakes."""
    n_steps = 40
    cfg = _translate_config(tmp_path, mnist_dir, "cyclegan", "learn", lr=1e-3, lr_decay_start=1.0, n_steps=n_steps)
    cfg.checkpoint_interval = n_steps
    translate.main(cfg)
    rows = _translate_stats(tmp_path / "learn")
    assert len(rows) == n_steps
    for key in ("loss/cycle", "loss/d"):
        values = [r[key] for r in rows]
        assert np.mean(values[-5:]) < 0.4 * np.mean(values[:3]), (key, values)
