"""Unit tests of the GAN architecture zoo (modelling/{nvidia_ops,progressive_gan,stylegan,stylegan2,sagan}.py) and
its regularisers (R1, WGAN-GP, path length), against closed forms, finite differences and plain re-implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import gradient_penalty, path_lengths, r1_penalty
from modelling import DISCRIMINATORS, GENERATORS, build_discriminator, build_generator
from modelling.nvidia_ops import (
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    PixelNorm,
    _upfirdn2d_plain,
    downsample2d,
    lrelu,
    make_filter,
    upfirdn2d,
    upsample2d,
)
from modelling.progressive_gan import growth_at, stage_changed
from modelling.sagan import SelfAttention
from modelling.stylegan2 import ModulatedConv2d
from utils.optim import make_optimizer

NV = dict(channel_base=64, channel_max=8)  # tiny NVIDIA-family nets
TINY = {
    "dcgan": dict(base_dim=4),
    "progressive_gan": NV,
    "stylegan": NV,
    "stylegan2": NV,
    "sagan": dict(base_dim=8),
    "acgan": dict(base_dim=4),
    "biggan": dict(base_dim=8),
}
STYLE_G = dict(w_dim=8, n_mlp=2)


def tiny_pair(name: str, img_size: int = 16, n_classes: int = 0, img_channels: int = 3):
    kw = dict(img_size=img_size, img_channels=img_channels, n_classes=n_classes) | TINY[name]
    g_extra = STYLE_G if name in ("stylegan", "stylegan2") else {}
    return build_generator(name, z_dim=8, **kw, **g_extra), build_discriminator(name, **kw)


# ------------------------------------------------------------------------------------------------ every model
@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_model_builds_forwards_and_backwards_with_documented_shapes(name):
    assert set(GENERATORS) == set(DISCRIMINATORS)
    torch.manual_seed(0)
    gen, disc = tiny_pair(name, img_size=8, img_channels=1)  # the smallest resolution every family supports
    fakes = gen(torch.randn(4, 8))
    assert fakes.shape == (4, 1, 8, 8)
    scores = disc(fakes)
    assert scores.shape == (4,)
    scores.sum().backward()
    for net in (gen, disc):
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        # Only a growing ProGAN leaves parameters unused when fully grown: the lower levels' toRGB/fromRGB.
        assert all(m.split(".")[0] in ("to_rgb", "from_rgb") for m in missing), missing
        assert not missing or name == "progressive_gan"
    with pytest.raises(ValueError, match="img_size"):
        build_generator(name, img_size=12, img_channels=1, z_dim=8, **TINY[name])


@pytest.mark.parametrize("name", ["dcgan", "sagan"])
def test_conditional_models_use_their_labels(name):
    torch.manual_seed(0)
    gen, disc = tiny_pair(name, n_classes=3)
    for p in list(gen.parameters()) + list(disc.parameters()):  # CBN gains start equal for every class
        p.data.add_(0.1 * torch.randn_like(p))
    gen.eval()
    fakes = gen(torch.randn(1, 8).repeat(3, 1), torch.arange(3))  # one latent, three labels
    assert fakes.shape == (3, 3, 16, 16)
    assert (fakes[0] - fakes[1]).abs().max() > 1e-3 and (fakes[1] - fakes[2]).abs().max() > 1e-3
    scores = disc(fakes[:1].repeat(3, 1, 1, 1), torch.arange(3))  # one image, three labels
    assert len(set(scores.tolist())) == 3
    for unconditional in ("progressive_gan", "stylegan", "stylegan2"):
        with pytest.raises(ValueError, match="unconditional"):
            build_generator(unconditional, img_size=16, n_classes=3, **TINY[unconditional])


# ------------------------------------------------------------------------------------------------ NVIDIA ops
def test_equalized_layers_keep_unit_variance_at_init():
    torch.manual_seed(0)
    x = torch.randn(4096, 512)
    y = EqualizedLinear(512, 512)(x)
    assert y.var().item() == pytest.approx(1.0, abs=0.05)
    # After LReLU(0.2) * sqrt(2) the second moment is (1 + 0.2^2) = 1.04 (StyleGAN2-ADA's convention)
    assert lrelu(y).square().mean().item() == pytest.approx(1.04, abs=0.05)
    maps = torch.randn(64, 64, 16, 16)
    assert EqualizedConv2d(64, 64, 3)(maps)[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, abs=0.05)
    # lr_mul: same forward statistics, gradients scaled by lr_mul (the mapping network's 100x slower learning)
    torch.manual_seed(1)
    slow = EqualizedLinear(512, 512, lr_mul=0.01)
    torch.manual_seed(1)
    fast = EqualizedLinear(512, 512)
    assert torch.allclose(slow(x), fast(x), atol=1e-4)
    slow(x).sum().backward(), fast(x).sum().backward()
    assert torch.allclose(slow.weight.grad, 0.01 * fast.weight.grad, rtol=1e-3)


def test_pixel_norm_and_minibatch_stddev():
    x = torch.randn(8, 16, 4, 4) * 5
    assert torch.allclose(PixelNorm()(x).square().mean(dim=1), torch.ones(8, 4, 4), atol=1e-5)
    out = MinibatchStdDev(4)(x)
    assert out.shape == (8, 17, 4, 4)
    # Group member k of group j is sample k * (N / G) + j: samples 0, 2, 4, 6 form group 0.
    expected = x[0::2].std(dim=0, unbiased=False).mean()
    assert out[0, 16, 0, 0].item() == pytest.approx(expected.item(), rel=1e-4)
    assert torch.equal(out[0, 16], out[6, 16])
    # Identical samples: std ~ sqrt(eps), and the second-order gradient (as in a gradient penalty) stays finite.
    same = torch.randn(1, 4, 4, 4).repeat(4, 1, 1, 1).requires_grad_(True)
    y = MinibatchStdDev(4)(same)
    (grad,) = torch.autograd.grad(y.square().sum(), same, create_graph=True)
    grad.square().sum().backward()
    assert torch.isfinite(same.grad).all() and y[:, 4].max().item() < 1e-3
    # A batch of 6 with group size 4: the largest divisor <= 4 is 3.
    assert MinibatchStdDev(4)(torch.randn(6, 2, 4, 4)).shape == (6, 3, 4, 4)


def test_pixel_norm_and_mbstd_compute_in_fp32_under_autocast():
    x = (torch.randn(4, 8, 4, 4) * 300).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = PixelNorm()(x)
    ref = (x.float() * x.float().square().mean(1, keepdim=True).add(1e-8).rsqrt()).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)


@pytest.mark.parametrize(
    "up,down,pad,taps",
    [(1, 1, (1, 2, 2, 1), [1, 3, 3, 1]), (2, 1, (2, 1, 2, 1), [1, 3, 3, 1]), (1, 2, (1, 1, 1, 1), [1, 3, 3, 1]),
     (1, 2, (2, -1, 0, 1), [1, 2, 1]), (1, 1, (-1, 0, 1, 1), [1, 2, 3])],
)  # fmt: skip
def test_upfirdn2d_custom_backward_equals_autograd_to_second_order(up, down, pad, taps):
    torch.manual_seed(0)
    f = make_filter(taps).double()
    x = torch.randn(1, 2, 5, 6, dtype=torch.double, requires_grad=True)
    assert torch.equal(upfirdn2d(x, f, up, down, pad), _upfirdn2d_plain(x, f, up, down, pad))
    # gradcheck/gradgradcheck compare our backward (the op itself, flipped) with numerical derivatives ...
    assert torch.autograd.gradcheck(lambda t: upfirdn2d(t, f, up, down, pad), (x,))
    assert torch.autograd.gradgradcheck(lambda t: upfirdn2d(t, f, up, down, pad), (x,))
    # ... and explicitly with autograd through the plain version, at first and second order.
    # As in R1: D(x) = <w, op(x)>, penalty ||grad_x D||^2, differentiated w.r.t. the weights w.
    w = torch.randn_like(_upfirdn2d_plain(x, f, up, down, pad)).requires_grad_(True)
    ours = torch.autograd.grad((upfirdn2d(x, f, up, down, pad) * w).sum(), x, create_graph=True)[0]
    plain = torch.autograd.grad((_upfirdn2d_plain(x, f, up, down, pad) * w).sum(), x, create_graph=True)[0]
    assert torch.allclose(ours, plain)
    second_ours = torch.autograd.grad(ours.square().sum(), w)[0]
    second_plain = torch.autograd.grad(plain.square().sum(), w)[0]
    assert torch.allclose(second_ours, second_plain)


def test_resampling_filters_keep_constants_and_sizes():
    f = make_filter([1, 3, 3, 1])
    assert f.sum().item() == pytest.approx(1.0)
    ones = torch.ones(1, 2, 8, 8)
    up = upsample2d(ones, f)
    assert up.shape == (1, 2, 16, 16) and torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    down = downsample2d(ones, f)
    assert down.shape == (1, 2, 4, 4) and torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    conv = EqualizedConv2d(2, 3, 3, down=2, blur_filter=[1, 3, 3, 1], down_mode="stride")
    assert conv(torch.randn(2, 2, 8, 8)).shape == (2, 3, 4, 4)


def _blur(x: torch.Tensor, taps: list[float], pad: tuple[int, int]) -> torch.Tensor:
    """Depthwise 2-D FIR filter (outer product of `taps`, sum 1) after zero padding (before, after) on both axes."""
    t = torch.tensor(taps, dtype=x.dtype)
    f = (t[:, None] * t[None, :] / t.sum() ** 2).expand(x.shape[1], 1, len(taps), len(taps))
    return F.conv2d(F.pad(x, pad * 2), f, groups=x.shape[1])


@pytest.mark.parametrize("name", ["progressive_gan", "stylegan", "stylegan2"])
def test_discriminators_downsample_as_their_papers(name):
    """16x16 -> 8x8 in each NVIDIA discriminator, written with plain torch ops. ProGAN: conv3 -> 2x2 average pool.
    StyleGAN: blur [1, 2, 1] -> conv3 -> 2x2 average pool, each stage zero-padded to "same" size (NVIDIA's blur2d,
    then conv2d_downscale2d). StyleGAN2 (StyleGAN2-ADA conv2d_resample): blur [1, 3, 3, 1] with pads 2 (conv3)
    or 1 (the 1x1 skip), then a stride-2 "valid" conv."""
    torch.manual_seed(0)
    disc = build_discriminator(name, img_size=16, img_channels=3, **NV).double()
    if name == "stylegan2":
        cases = [(disc.blocks[0]["main"][1], [1, 3, 3, 1], (2, 2)), (disc.blocks[0]["skip"], [1, 3, 3, 1], (1, 1))]
    else:
        cases = [
            (disc.blocks[2][1], [1, 2, 1] if name == "stylegan" else [1], (1, 1) if name == "stylegan" else (0, 0))
        ]
    for down, taps, pad in cases:
        c_in, k = down.weight.shape[1], down.weight.shape[-1]
        x = torch.randn(2, c_in, 16, 16, dtype=torch.double)
        weight, bias = down.weight / math.sqrt(c_in * k * k), down.bias
        if name == "stylegan2":
            expected = F.conv2d(_blur(x, taps, pad), weight, bias, stride=2)
        else:
            expected = F.avg_pool2d(F.conv2d(_blur(x, taps, pad), weight, bias, padding=k // 2), 2)
        assert down(x).shape == (2, down.weight.shape[0], 8, 8)
        assert torch.allclose(down(x), expected)
    if name == "stylegan":  # away from the borders: a [1, 3, 3, 1] blur, then a stride-2 conv (arXiv 1812.04948)
        strided = F.conv2d(_blur(x, [1, 3, 3, 1], (1, 2)), weight, bias, stride=2, padding=1)
        assert torch.allclose(strided[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])
        assert not torch.allclose(strided, expected)  # the borders differ: StyleGAN zero-pads after the blur


# ------------------------------------------------------------------------------------------------ Progressive GAN
def test_growth_schedule_and_fade_in():
    assert [growth_at(n, 10, 2) for n in (0, 9, 10, 15, 20, 29, 30, 35, 40, 99)] == [
        0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0
    ]  # fmt: skip
    assert growth_at(0, 0, 3) == 3.0  # no growing
    torch.manual_seed(0)
    gen, disc = tiny_pair("progressive_gan", img_size=16)
    zs = torch.randn(4, 8)
    gen.set_growth(1.0)
    stable = gen(zs)
    assert torch.equal(stable[..., ::2, ::2], stable[..., 1::2, 1::2])  # an 8x8 image shown at 16x16
    gen.set_growth(1.0 + 1e-6)  # level 2 just starts fading in: the output barely moves
    assert torch.allclose(gen(zs), stable, atol=1e-4) and gen.fading and gen.resolution == 16
    gen.set_growth(2.0)
    assert not torch.equal(gen(zs)[..., ::2, ::2], gen(zs)[..., 1::2, 1::2])  # full 16x16 detail
    # Growth is a buffer: a state dict restores the stage, including the Python flags torch.compile guards on.
    gen.set_growth(1.25)
    copy = build_generator("progressive_gan", img_size=16, z_dim=8, **NV)
    copy.load_state_dict(gen.state_dict())
    assert (copy.level, copy.fading) == (1, True) and torch.equal(copy(zs), gen(zs))
    reals = torch.randn(2, 3, 16, 16)
    disc.set_growth(2.0)
    assert torch.equal(disc.fade_reals(reals), reals)
    disc.set_growth(0.0)
    assert torch.allclose(
        disc.fade_reals(reals), F.avg_pool2d(reals, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    )
    with pytest.raises(ValueError, match="growth"):
        disc.set_growth(2.5)


def test_optimizer_resets_when_a_level_starts_and_ends_fading_in():
    """NVIDIA's reset_opt_for_new_lod: reset when floor or ceil of the stage changes between two steps, i.e. when a
    level starts fading in and when it becomes stable; not while alpha moves, nor within a stable phase."""
    stages = [growth_at(n, 10, 2) for n in range(0, 60, 5)]
    assert stages == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0]
    assert [i for i in range(1, len(stages)) if stage_changed(stages[i - 1], stages[i])] == [3, 4, 7, 8]
    assert not stage_changed(0.25, 0.75) and stage_changed(0.75, 1.25) and not stage_changed(2.0, 2.0)


def test_progan_first_dense_layer_has_gain_sqrt2_over_4():
    """ProGAN's G starts with a dense layer of gain sqrt(2)/4 (NVIDIA's networks.py), not the He gain sqrt(2). In
    our convention the sqrt(2) sits in `lrelu`, so for unit-norm-per-feature inputs (PixelNorm'd z) the layer's
    pre-activation has variance (1/4)^2 at init, with N(0, 1) weights and zero bias."""
    torch.manual_seed(0)
    gen = build_generator("progressive_gan", img_size=8, z_dim=512, channel_base=256, channel_max=32)
    zs = PixelNorm()(torch.randn(256, 512))
    with torch.no_grad():
        assert gen.dense(zs).var().item() == pytest.approx(1 / 16, rel=0.05)
        assert gen.conv4(torch.randn(256, 32, 4, 4))[..., 1:-1, 1:-1].var().item() == pytest.approx(1.0, rel=0.05)


def test_progan_without_growing_builds_and_uses_only_the_full_resolution_levels():
    """growing=False: no lower-level toRGB/fromRGB, so every parameter gets a gradient (DDP needs that); with the
    growing network's weights it computes the same function as that network fully grown."""
    torch.manual_seed(0)
    kw = dict(img_size=16, img_channels=3, **NV)
    grown_g, grown_d = build_generator("progressive_gan", z_dim=8, **kw), build_discriminator("progressive_gan", **kw)
    fixed_g = build_generator("progressive_gan", z_dim=8, growing=False, **kw)
    fixed_d = build_discriminator("progressive_gan", growing=False, **kw)
    for grown, fixed, rgb in ((grown_g, fixed_g, "to_rgb"), (grown_d, fixed_d, "from_rgb")):
        dropped = set(grown.state_dict()) - set(fixed.state_dict())
        assert dropped == {f"{rgb}.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
        fixed.load_state_dict({k: v for k, v in grown.state_dict().items() if k not in dropped})
    zs = torch.randn(4, 8)
    fakes = fixed_g(zs)
    assert torch.equal(fakes, grown_g(zs)) and torch.equal(fixed_d(fakes), grown_d(fakes))
    fixed_d(fixed_g(zs)).sum().backward()
    assert all(p.grad is not None for net in (fixed_g, fixed_d) for p in net.parameters())
    # StyleGAN's D is built without growing; a fixed network refuses a lower stage.
    assert not any(k.startswith("from_rgb.0") for k in build_discriminator("stylegan", **kw).state_dict())
    with pytest.raises(ValueError, match="growing=False"):
        fixed_g.set_growth(1.5)


# ------------------------------------------------------------------------------------------------ StyleGAN family
@pytest.mark.parametrize("name", ["stylegan", "stylegan2"])
def test_truncation_is_for_sampling_only_and_style_mixing_mixes(name):
    torch.manual_seed(0)
    gen = build_generator(name, img_size=16, z_dim=8, mixing_prob=0.0, **NV, **STYLE_G)
    assert gen.num_ws == 2 * 4 - 2
    zs = torch.randn(4, 8)
    ws = gen.make_ws(zs)  # training mode: mapping updates w_avg, no truncation
    assert torch.equal(ws, gen.mapping(zs)[:, None].expand_as(ws))
    assert gen.mapping.w_avg.abs().sum() > 0
    with pytest.raises(RuntimeError, match="sampling only"):
        gen(zs, truncation=0.5)
    gen.eval()
    w_avg = gen.mapping.w_avg.clone()
    collapsed = gen(zs, truncation=0.0)  # psi = 0: every latent maps to w_avg; eval noise is fixed
    assert torch.allclose(collapsed, collapsed[:1].expand_as(collapsed), atol=1e-5)
    assert torch.equal(gen.mapping.w_avg, w_avg)  # eval mode never updates w_avg
    ws_cut = gen.make_ws(zs, truncation=0.5, truncation_cutoff=2)
    ws_full = gen.make_ws(zs)
    assert torch.equal(gen(zs, truncation=0.5, truncation_cutoff=2), gen(None, ws=ws_cut))
    assert torch.allclose(ws_cut[:, :2], w_avg + 0.5 * (ws_full[:, :2] - w_avg)) and torch.equal(
        ws_cut[:, 2:], ws_full[:, 2:]
    )
    assert torch.allclose(gen(zs[:1]), gen(zs)[:1], rtol=1e-5, atol=1e-5)  # eval: image k depends on latent k only
    gen.train()
    gen.mixing_prob = 1.0
    mixed = gen.make_ws(zs)
    distinct = [i for i in range(1, gen.num_ws) if not torch.equal(mixed[:, i], mixed[:, 0])]
    assert distinct and distinct == list(range(distinct[0], gen.num_ws))  # layers from the crossover on


@pytest.mark.parametrize("name", ["stylegan", "stylegan2"])
def test_w_avg_tracks_the_main_latents_only(name):
    """w_avg <- w_avg + (1 - 0.995) (mean_n w_n - w_avg) over the main latents of a training-mode call; the
    style-mixing latents do not update it (StyleGAN2-ADA's skip_w_avg_update for the mixing mapping)."""
    torch.manual_seed(0)
    gen = build_generator(name, img_size=16, z_dim=8, mixing_prob=1.0, **NV, **STYLE_G)
    gen.mapping.w_avg.normal_()
    w_avg, zs = gen.mapping.w_avg.clone(), torch.randn(4, 8)
    with torch.no_grad():
        main = gen.mapping.eval()(zs)  # eval mode: no update
    gen.mapping.train()
    assert torch.equal(gen.mapping.w_avg, w_avg)
    ws = gen.make_ws(zs)
    assert not torch.equal(ws[:, -1], ws[:, 0])  # the mixing latents were used ...
    assert torch.allclose(gen.mapping.w_avg, w_avg + 0.005 * (main.mean(0) - w_avg))  # ... and left w_avg alone


def test_modulated_conv_equals_per_sample_demodulated_weights():
    torch.manual_seed(0)
    layer = ModulatedConv2d(4, 5, 3, w_dim=6, res=8).double()
    x, w = torch.randn(3, 4, 8, 8, dtype=torch.double), torch.randn(3, 6, dtype=torch.double)
    styles = layer.affine(w)
    outs = []
    for n in range(3):
        weight = layer.weight * layer.weight_gain * styles[n][None, :, None, None]
        weight = weight / weight.square().sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()  # unit-norm filters
        outs.append(F.conv2d(x[n : n + 1], weight, padding=1))
    layer.eval()  # fixed noise; strength is 0 at init anyway
    expected = lrelu(torch.cat(outs) + layer.bias[None, :, None, None])
    assert torch.allclose(layer(x, w), expected)
    # With unit-variance inputs the demodulated pre-activation has unit variance: after LReLU(0.2) * sqrt(2) the
    # second moment is 1.04 (borders excluded: zero padding).
    big = ModulatedConv2d(256, 256, 3, w_dim=8, res=8)
    out = big(torch.randn(16, 256, 8, 8), torch.randn(16, 8))[..., 1:-1, 1:-1]
    assert out.square().mean().item() == pytest.approx(1.04, abs=0.06)
    up = ModulatedConv2d(4, 5, 3, w_dim=6, res=16, up=True)
    assert up(torch.randn(2, 4, 8, 8), torch.randn(2, 6)).shape == (2, 5, 16, 16)


def test_to_rgb_scales_the_styles_once_by_one_over_sqrt_fan_in():
    """StyleGAN2's ToRGB (StyleGAN2-ADA ToRGBLayer): out_o = sum_i weight_oi * (A(w)_i / sqrt(C_in)) * x_i + bias_o,
    raw N(0, 1) weight, no demodulation, no noise, no activation. Written out with einsum, not the layer's code."""
    torch.manual_seed(0)
    layer = ModulatedConv2d(6, 3, 1, w_dim=5, res=8, rgb=True).double()
    layer.bias.data.normal_()
    x, w = torch.randn(2, 6, 8, 8, dtype=torch.double), torch.randn(2, 5, dtype=torch.double)
    styles = layer.affine(w) / math.sqrt(6)  # (N, C_in)
    expected = torch.einsum("oi,ni,nihw->nohw", layer.weight[:, :, 0, 0], styles, x) + layer.bias[None, :, None, None]
    assert torch.allclose(layer(x, w), expected)
    # Scale at C_in = 512: for unit-variance inputs E[out^2 | weight, styles] = mean_{n,o} sum_i weight_oi^2 s_ni^2
    # / C_in, about mean(s^2) = O(1); a second 1 / sqrt(C_in) makes it 512x smaller.
    wide = ModulatedConv2d(512, 3, 1, w_dim=8, res=4, rgb=True)
    x, w = torch.randn(64, 512, 4, 4), torch.randn(64, 8)
    with torch.no_grad():
        s2 = wide.affine(w).square()  # (N, C_in)
        expected_moment = (wide.weight[:, :, 0, 0].square() @ s2.T / 512).mean()
        assert wide(x, w).square().mean().item() == pytest.approx(expected_moment.item(), rel=0.1)
    assert expected_moment.item() > 0.5


# ------------------------------------------------------------------------------------------------ SA-GAN
def test_self_attention_is_identity_at_init_and_follows_the_paper():
    torch.manual_seed(0)
    attn = SelfAttention(16).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.double)
    assert torch.equal(attn(x), x)
    attn.gamma.data.fill_(0.7)
    f, g, h = attn.f(x).flatten(2), F.max_pool2d(attn.g(x), 2).flatten(2), F.max_pool2d(attn.h(x), 2).flatten(2)
    expected = torch.empty(2, 8, 16, dtype=torch.double)
    for n in range(2):
        for j in range(16):  # query position j attends over the 4 pooled key positions, no 1/sqrt(d) scaling
            beta = torch.softmax(f[n, :, j] @ g[n], dim=0)
            expected[n, :, j] = h[n] @ beta
    o = attn.o(expected.reshape(2, 8, 4, 4))
    assert torch.allclose(attn(x), x + 0.7 * o)


# ------------------------------------------------------------------------------------------------ regularisers
class TinyCritic(torch.nn.Module):
    """Conv -> tanh -> linear: nonlinear in x, so its gradient penalties depend on every parameter."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.out = torch.nn.Linear(2 * 4 * 4, 1)

    def forward(self, x, labels=None):
        return self.out(torch.tanh(self.conv(x)).flatten(1)).flatten()


def _check_param_gradient_by_finite_differences(critic, penalty_fn):
    params = list(critic.parameters())
    # R1 does not depend on the last bias (the gradient w.r.t. x ignores it): its derivative is 0.
    analytic = [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(params, torch.autograd.grad(penalty_fn(), params, allow_unused=True), strict=True)
    ]
    eps = 1e-6
    for p, grad in zip(params, analytic, strict=True):
        flat, g = p.data.view(-1), grad.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            old = flat[i].item()
            flat[i] = old + eps
            up = penalty_fn().item()
            flat[i] = old - eps
            down = penalty_fn().item()
            flat[i] = old
            assert (up - down) / (2 * eps) == pytest.approx(g[i].item(), rel=1e-5, abs=1e-8)


def test_r1_and_wgan_gp_gradients_match_finite_differences():
    torch.manual_seed(0)
    critic = TinyCritic().double()
    reals, fakes = torch.randn(3, 1, 4, 4, dtype=torch.double), torch.randn(3, 1, 4, 4, dtype=torch.double)
    _check_param_gradient_by_finite_differences(critic, lambda: r1_penalty(critic, reals).mean())

    def gp():
        torch.manual_seed(7)  # the same interpolation points at every evaluation
        return gradient_penalty(critic, reals, fakes).mean()

    _check_param_gradient_by_finite_differences(critic, gp)
    # R1 on a linear critic D(x) = <a, x> + b is ||a||^2 for every sample.
    linear = torch.nn.Linear(16, 1).double()
    value = r1_penalty(lambda x, labels=None: linear(x.flatten(1)).flatten(), reals)
    assert torch.allclose(value, linear.weight.square().sum().expand(3))


def test_path_length_follows_its_definition_on_a_toy_generator():
    torch.manual_seed(0)
    n, num_ws, w_dim, side = 3, 4, 5, 6
    mix = torch.randn(num_ws * w_dim, side * side, dtype=torch.double)
    ws = torch.randn(n, num_ws, w_dim, dtype=torch.double, requires_grad=True)
    images = (torch.tanh(ws).flatten(1) @ mix).reshape(n, 1, side, side)  # a nonlinear toy synthesis
    torch.manual_seed(1)
    lengths = path_lengths(images, ws)
    torch.manual_seed(1)
    y = torch.randn(n, 1, side, side, dtype=torch.double) / side  # y ~ N(0, I) / sqrt(H W)
    expected = []
    for i in range(n):  # J_w^T y by hand: d tanh = 1 - tanh^2
        jt_y = ((mix @ y[i].flatten()) * (1 - torch.tanh(ws[i].detach()).flatten() ** 2)).reshape(num_ws, w_dim)
        expected.append(jt_y.square().sum(dim=1).mean().sqrt())
    assert torch.allclose(lengths, torch.stack(expected))
    # The penalty (L - a)^2 is differentiable in the synthesis weights (create_graph=True).
    assert lengths.requires_grad


def test_lazy_regularisation_adjusts_adam():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = make_optimizer("Adam", params, 0.002, (0.0, 0.99), reg_interval=16)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0018824, abs=1e-7)
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.990585, abs=1e-6)
    assert make_optimizer("Adam", params, 0.002, (0.0, 0.99), reg_interval=4).param_groups[0]["lr"] == pytest.approx(
        0.0016
    )
    assert make_optimizer("RMSprop", params, 5e-5, (0.5, 0.999)).param_groups[0]["lr"] == 5e-5
