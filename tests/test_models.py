import itertools
import re

import pytest
import torch
from torch import nn

from modelling import (
    DENOISERS,
    GENERATORS,
    NETWORK_PRESETS,
    acgan,
    build_denoiser,
    build_discriminator,
    build_generator,
    build_network,
    translation,
)
from modelling.common import apply_spectral_norm, init_dcgan, latent_batches, recalibrate_batchnorm

# The families with tanh outputs, base_dim, spectral_norm and conditioning; the NVIDIA families (no tanh, other
# width kwargs, unconditional) are covered model by model in tests/test_gan_zoo.py.
CASES = list(itertools.product(["dcgan", "sagan"], [0, 10], [False, True], [16, 32, 64]))


@pytest.mark.parametrize("name,n_classes,sn,img_size", CASES)
def test_registry_builds_forward_backward(name, n_classes, sn, img_size):
    torch.manual_seed(0)
    gen = build_generator(
        name, img_size=img_size, img_channels=3, z_dim=16, base_dim=8, n_classes=n_classes, spectral_norm=sn
    )
    disc = build_discriminator(
        name, img_size=img_size, img_channels=3, base_dim=8, n_classes=n_classes, spectral_norm=sn
    )
    zs = torch.randn(4, 16)
    labels = torch.tensor([0, 3, 9, 1]) if n_classes else None
    fakes = gen(zs, labels)
    assert fakes.shape == (4, 3, img_size, img_size)
    assert fakes.abs().max() <= 1  # tanh output
    scores = disc(fakes, labels)
    assert scores.shape == (4,)
    scores.sum().backward()
    for module in (gen, disc):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_dcgan_32_layout_matches_the_paper_table():
    gen = build_generator("dcgan", img_size=32, img_channels=1, z_dim=128)
    convs = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 256), (256, 128), (128, 64), (64, 1)]
    disc = build_discriminator("dcgan", img_size=32, img_channels=1)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 64), (64, 128), (128, 256), (256, 1)]
    # No norm on D's first layer; BN follows the two middle convs; the critic variant has none.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 2
    critic = build_discriminator("dcgan", img_size=32, img_channels=1, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())


def test_conditional_inputs_are_concatenated():
    disc = build_discriminator("dcgan", img_size=32, img_channels=1, n_classes=10, label_dim=64)
    first = next(m for m in disc.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1 + 64
    gen = build_generator("dcgan", img_size=32, z_dim=128, n_classes=10, label_dim=64)
    first = next(m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d))
    assert first.in_channels == 128 + 64
    # The label changes the output: conditioning is wired in.
    gen.eval()
    zs = torch.randn(2, 128)
    assert not torch.allclose(gen(zs, torch.tensor([0, 0])), gen(zs, torch.tensor([1, 1])))


@pytest.mark.parametrize("img_size,img_channels,sn", [(32, 1, False), (16, 3, True), (64, 1, False)])
def test_conditional_dcgan_disc_equals_conv_of_the_broadcast_labels(img_size, img_channels, sn):
    """The first conv without the broadcast equals the literal conv(concat(imgs, embed(y) over H x W)) with the
    same weights: outputs, gradients of the weights and embedding, and the input gradient's own gradient
    (WGAN-GP's second order), in fp64. The border positions, where taps fall on the zero padding, are where a
    wrong in-bounds mask would differ."""
    torch.manual_seed(0)
    disc = build_discriminator(
        "dcgan", img_size=img_size, img_channels=img_channels, n_classes=10, norm="none", spectral_norm=sn
    ).double()
    disc.eval()  # spectral norm's power iteration stays put between the two forwards (no BatchNorm with norm none)
    imgs = torch.randn(5, img_channels, img_size, img_size, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 9, 3, 7])

    def literal(x):
        n, _, h, w = x.shape
        return disc.net(torch.cat([x, disc.embed(labels)[:, :, None, None].expand(n, -1, h, w)], 1)).flatten()

    def penalised(forward):
        out = forward(imgs, labels) if forward is disc else forward(imgs)
        (grad,) = torch.autograd.grad(out.sum(), imgs, create_graph=True)
        loss = out.square().sum() + grad.square().sum()
        return [out.detach(), *torch.autograd.grad(loss, [*disc.parameters(), imgs])]

    for got, want in zip(penalised(disc), penalised(literal), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    first = disc.net[0]
    assert first.in_channels == img_channels + 64 and first.weight.shape[1] == img_channels + 64  # same weights


def test_unknown_name_and_bad_size_give_clear_errors():
    with pytest.raises(KeyError, match=re.escape(f"valid: {sorted(GENERATORS)}")):
        build_generator("stylegan9")
    with pytest.raises(KeyError, match="valid"):
        build_discriminator("nope")
    with pytest.raises(ValueError, match="img_size"):
        build_generator("dcgan", img_size=30)
    with pytest.raises(ValueError, match="norm"):
        build_discriminator("dcgan", norm="layer-typo")


def test_init_follows_dcgan():
    torch.manual_seed(0)
    gen = build_generator("dcgan", img_size=64, base_dim=64)
    weights = torch.cat([m.weight.flatten() for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    bn_weights = torch.cat([m.weight for m in gen.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn_weights.mean().item() - 1) < 5e-3


def test_dcgan_init_draws_every_weight_in_module_order():
    """N(0, 0.02) conv, dense and embedding weights, N(1, 0.02) affine norm scales, one draw per weight in
    `modules()` order (what makes a checkpoint's initial values a function of the seed), biases 0."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ConvTranspose2d(8, 4, 4, bias=False),
        nn.InstanceNorm2d(4, affine=True), nn.InstanceNorm2d(4), nn.Linear(16, 5), nn.Embedding(10, 5),
    )  # fmt: skip
    for m in net.modules():  # away from the values under test
        for p in m.parameters(recurse=False):
            nn.init.constant_(p, 7.0)
    torch.manual_seed(0)
    init_dcgan(net)
    torch.manual_seed(0)
    for m in net:
        if getattr(m, "weight", None) is None:
            continue  # the non-affine InstanceNorm
        mean = 1.0 if isinstance(m, nn.modules.batchnorm._NormBase) else 0.0
        assert torch.equal(m.weight, torch.empty_like(m.weight).normal_(mean, 0.02)), type(m).__name__
        if getattr(m, "bias", None) is not None:
            assert not m.bias.any(), type(m).__name__


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_generator("dcgan", img_size=32, base_dim=32, n_classes=10),
        lambda: build_discriminator("dcgan", img_size=32, base_dim=32, n_classes=10),
        lambda: acgan.Discriminator(32, base_dim=32, n_classes=10),
        lambda: translation.UNetGenerator(32, 1, 3, base_dim=32, norm="batch"),
        lambda: translation.PatchDiscriminator(64, 3, 1, base_dim=32, norm="batch"),
        lambda: translation.ResnetGenerator(32, 3, 3, base_dim=32, n_blocks=2, norm="batch"),
    ],
    ids=["dcgan-g", "dcgan-d", "acgan-d", "pix2pix-unet", "pix2pix-patch", "cyclegan-resnet"],
)
def test_dcgan_and_pix2pix_families_start_from_the_dcgan_init(build):
    torch.manual_seed(0)
    net = build()
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding))]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    weights = torch.cat([m.weight.flatten() for m in layers])
    scales = torch.cat([m.weight for m in norms]) if norms else torch.ones(1)
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    assert abs(scales.mean().item() - 1) < 0.01 and scales.std().item() < 0.03
    assert all(not m.bias.any() for m in layers + norms if getattr(m, "bias", None) is not None)


def test_spectral_norm_reaches_one_with_a_spectral_gap():
    """Reference sanity test 6.4: W = U diag(s) V^T with s1 = 3, s2 = 1.5; after 15 training forwards (one power
    iteration each) sigma_max of the normalised weight is 1 within 1e-6; in eval mode it stops changing."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(128, 64, dtype=torch.float64))
    s = torch.cat([torch.tensor([3.0, 1.5], dtype=torch.float64), torch.rand(62, dtype=torch.float64)])
    layer = nn.Linear(128, 64, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T)
    apply_spectral_norm(layer)
    x = torch.randn(2, 128, dtype=torch.float64)
    for _ in range(15):
        layer(x)
    assert abs(torch.linalg.matrix_norm(layer.weight, 2).item() - 1) < 1e-6
    layer.eval()
    w1 = layer.weight.clone()
    layer(x)
    torch.testing.assert_close(layer.weight, w1, rtol=0, atol=0)


def test_spectral_norm_on_conv_uses_reshaped_matrix():
    torch.manual_seed(0)
    disc = build_discriminator("dcgan", img_size=16, img_channels=1, base_dim=4, spectral_norm=True, norm="none")
    x = torch.randn(2, 1, 16, 16)
    for _ in range(300):  # a random matrix has no spectral gap: many iterations
        disc(x)
    for m in disc.modules():
        if isinstance(m, nn.Conv2d):
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), 2).item()
            assert abs(sigma - 1) < 2e-3, sigma


def test_recalibrated_generator_is_batch_independent():
    torch.manual_seed(0)
    gen = build_generator("dcgan", img_size=16, z_dim=8, base_dim=8, n_classes=3)
    recalibrate_batchnorm(gen, latent_batches(8, 3, n_batches=4, batch_size=32, seed=1))
    assert not gen.training
    bn = next(m for m in gen.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked == 4 and bn.momentum == 0.1  # momentum restored after the exact average
    zs, labels = torch.randn(16, 8), torch.randint(3, (16,))
    with torch.no_grad():
        full = gen(zs, labels)
        singles = torch.cat([gen(zs[i : i + 1], labels[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-6)


DENOISER_CASES = [
    (
        "ddpmpp",
        dict(img_size=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    ),
    ("ddpmpp", dict(img_size=28, img_channels=1, model_channels=8, channel_mult=[1, 2, 2], num_blocks=1)),
    ("mlp", dict(dim=2, width=32, depth=2)),
]


@pytest.mark.parametrize("method", sorted(DENOISERS))
@pytest.mark.parametrize("net,kwargs", DENOISER_CASES)
@pytest.mark.parametrize("n_classes", [0, 5])
def test_denoiser_registry_builds_forward_backward(method, net, kwargs, n_classes):
    torch.manual_seed(0)
    den = build_denoiser(method, net=net, net_kwargs=kwargs | dict(n_classes=n_classes))
    x = torch.randn(4, *den.sample_shape)
    labels = torch.tensor([0, 1, 4, 2]) if n_classes else None
    out = den(x, torch.tensor([0.1, 0.5, 0.9, 0.3]), labels)
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in den.parameters())
    if n_classes:  # the label is wired in (compare the network: the U-Net's output layer starts at 1e-5 scale)
        c_noise, zeros = torch.zeros(4), torch.zeros(4, dtype=torch.long)
        assert not torch.equal(den.eval().net(x, c_noise, zeros), den.net(x, c_noise, zeros + 1))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(KeyError, match="valid: \\['ddpmpp', 'mlp'\\]"):
        build_denoiser("edm", net="resnet", net_kwargs={})
    with pytest.raises(KeyError, match="valid: \\['edm', 'follmer'\\]"):
        build_denoiser("vp", net="mlp", net_kwargs={})


@pytest.mark.parametrize("preset", ["ddpmpp-small", "ddpmpp-mnist"])
def test_unet_presets_and_reduced_precision(preset):
    """Presets build at 28 and 32 pixels; under reduced-precision autocast GroupNorm and attention run in fp32 and
    the preconditioned output is fp32 (EDM's policy: only the U-Net's convolutions drop precision)."""
    name, kwargs = NETWORK_PRESETS[preset]
    for size in (28, 32):
        den = build_denoiser("edm", net=name, net_kwargs=kwargs | dict(img_size=size, img_channels=1))
        x = torch.randn(2, 1, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = den(x, torch.tensor([0.01, 50.0]))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        # Dropout (the mnist preset's 0.1) draws new masks in train mode; eval mode ignores the RNG.
        outputs = {}
        for mode in ("train", "eval"):
            den.train(mode == "train")
            for seed in (1, 2):
                torch.manual_seed(seed)
                outputs[mode, seed] = den(x, 0.5)
        assert torch.equal(outputs["eval", 1], outputs["eval", 2])
        assert torch.equal(outputs["train", 1], outputs["train", 2]) == (kwargs["dropout"] == 0)


def test_unet_rejects_sizes_that_do_not_halve():
    with pytest.raises(ValueError, match="does not halve"):
        build_network("ddpmpp", img_size=30, channel_mult=[1, 2, 2])


def test_dcgan_widths_stop_doubling_at_channel_max():
    """The paper's 64x64 layout is untouched (512 -> 256 -> 128 -> 64 in G, mirrored in D); at 512x512 the widths
    stop at channel_max instead of starting from 8,192 channels (187M parameters in G alone)."""
    from modelling.dcgan import Discriminator, Generator

    def widths(net, kind):
        return [m.out_channels for m in net.modules() if isinstance(m, kind)]

    conv_t, conv = torch.nn.ConvTranspose2d, torch.nn.Conv2d
    assert widths(Generator(img_size=64), conv_t) == [512, 256, 128, 64, 1]
    assert widths(Discriminator(img_size=64), conv) == [64, 128, 256, 512, 1]
    assert widths(Generator(img_size=512), conv_t) == [1024, 1024, 1024, 512, 256, 128, 64, 1]
    assert widths(Discriminator(img_size=512), conv) == [64, 128, 256, 512, 1024, 1024, 1024, 1]
    assert widths(Generator(img_size=32, channel_max=128), conv_t) == [128, 128, 64, 1]


def test_standing_statistics_batches_shrink_only_above_64_px():
    """Up to 64x64 the standing BatchNorm statistics use the same 8 x 128 latents as ever; above, smaller batches
    (at most 128 x 64 x 64 output pixels each) of the same 1,024 images."""
    from modelling.common import standing_batches

    assert standing_batches(32) == standing_batches(64) == (8, 128)
    assert standing_batches(128) == (32, 32) and standing_batches(512) == (512, 2)
