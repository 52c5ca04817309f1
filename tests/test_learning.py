"""The training steps of every family, pinned: for each optimizer step of each training script, the loss as the
script assembles it (which terms, their signs, weights and interval factors, which network receives which
gradient) against a value computed by hand on a fixed tiny batch; and short runs on 2-D or tiny data that learn.
One section per family, each opening with what it pins.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import diffusion_train
import discriminator_flow
import distill_characteristic
import ebm_train
import gan_celeba
import gan_mnist
import score_gan
import translate
from losses import AuxClassifierLoss, get_diffusion_loss, get_gan_loss
from losses.characteristic import sample_jumps
from losses.particle import particle_loss
from modelling import build_denoiser, build_score_gan_generator, build_translator
from modelling.common import apply_spectral_norm
from modelling.discr_flow import DiscriminatorFlow
from modelling.gebm import Energy, ToyEnergy, ToyGenerator
from modelling.recipes import GAN_RECIPES
from modelling.translation import PatchDiscriminator
from sampling import gan_images
from sampling.diffusion import StackedNoise, sample, time_grid
from sampling.latent_mcmc import LatentChains, latent_potential
from sampling.particles import discr_flow_images
from tests.conftest import REPO, TINY, cli_error, random_denoiser, read_stats
from utils.ckpt import build_from_snapshot, load_snapshot, load_training_state
from utils.cli import UserError, parse
from utils.data import build_dataset, make_loader, step_seed, toy_moments, toy_points
from utils.ema import EMA
from utils.grid import to_uint8
from utils.pairs import fashion_mnist_edges, jitter_size, random_jitter

# ====================================================================================================================
# The GAN scripts' training steps, pinned: each optimizer step's loss as assembled by `gan_mnist.py`'s and
# `gan_celeba.py`'s own step functions equals the formula computed here by hand on a fixed tiny batch (terms, signs,
# weights, interval factors, which network receives the gradient); the per-model recipes are the same in both scripts;
# a short run of the scripts' step functions on 2-D data learns.
# ====================================================================================================================
GAN_SCRIPTS = {"gan_mnist": gan_mnist, "gan_celeba": gan_celeba}
GAN_METHODS = ["gan", "wgan", "wgan-gp", "hinge"]
GAN_N, GAN_Z, GAN_HIDDEN, GAN_CLASSES = 6, 2, 5, 3


class _GanDisc(nn.Module):
    """D(x) = v . tanh(W x + b) + c on 2-D points, with a class head (AC-GAN) on the same hidden layer. Its input
    gradient is known in closed form (`_gan_input_grad`), so the penalties are computed here without autograd."""

    def __init__(self, width: int = GAN_HIDDEN):
        super().__init__()
        self.hidden, self.source = nn.Linear(2, width), nn.Linear(width, 1)
        self.classes = nn.Linear(width, GAN_CLASSES)

    def forward(self, x, labels=None, aux=False):
        h = torch.tanh(self.hidden(x))
        logits = self.source(h).flatten()
        return (logits, self.classes(h)) if aux else logits


class _GanGen(nn.Module):
    """G(z, y) = MLP([z, onehot(y)]) -> 2-D points; affine with `width` 0 (it can match a Gaussian exactly)."""

    def __init__(self, width: int = 16):
        super().__init__()
        n_in = GAN_Z + GAN_CLASSES
        if width:
            self.net = nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, 2))
        else:
            self.net = nn.Linear(n_in, 2)

    def forward(self, z, labels=None):
        onehot = F.one_hot(labels, GAN_CLASSES).to(z) if labels is not None else torch.zeros(len(z), GAN_CLASSES)
        return self.net(torch.cat([z, onehot], 1))


class _GanStyleGen(nn.Module):
    """A toy generator with StyleGAN's interface: ws = broadcast(tanh(A z)); images = (tanh(ws) flat) @ M."""

    num_ws, w_dim, side = 3, 4, 4

    def __init__(self):
        super().__init__()
        self.mapping = nn.Linear(GAN_Z, self.w_dim)
        self.mix = nn.Parameter(torch.randn(self.num_ws * self.w_dim, self.side**2))

    def make_ws(self, z):
        return torch.tanh(self.mapping(z)).unsqueeze(1).repeat(1, self.num_ws, 1)

    def forward(self, z, labels=None, ws=None):
        ws = self.make_ws(z) if ws is None else ws
        return (torch.tanh(ws).flatten(1) @ self.mix).reshape(-1, 1, self.side, self.side)


def _gan_input_grad(disc: _GanDisc, x: torch.Tensor) -> torch.Tensor:
    """d D(x) / d x = W^T (v * (1 - tanh^2(W x + b))), per sample."""
    t = torch.tanh(disc.hidden(x))
    return (disc.source.weight.flatten() * (1 - t**2)) @ disc.hidden.weight


def _gan_ce(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label], averaged over the batch."""
    log_p = class_logits - class_logits.exp().sum(1, keepdim=True).log()
    return -log_p[torch.arange(len(labels)), labels].mean()


def _gan_ortho(module: nn.Module) -> torch.Tensor:
    """sum over weight matrices W (out, in) of sum_{i != j} (w_i . w_j)^2."""
    total = 0.0
    for p in module.parameters():
        if p.ndim >= 2:
            w = p.flatten(1)
            for i in range(len(w)):
                for j in range(len(w)):
                    if i != j:
                        total = total + (w[i] @ w[j]) ** 2
    return total


def _gan_cfg(script, **kwargs):
    """The script's own Config, resolved as its command line is (the model's recipe fills unset flags)."""
    resolve = script.check_config if script is gan_mnist else script.resolve_config
    return resolve(script.Config(**kwargs))


def _gan_setup(seed: int = 0, conditional: bool = False):
    torch.manual_seed(seed)
    gen, disc = _GanGen(), _GanDisc()
    reals = torch.randn(GAN_N, 2) + torch.tensor([2.0, -1.0])
    zs = torch.randn(GAN_N, GAN_Z)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]) if conditional else None
    return gen, disc, reals, zs, labels


def _gan_adversarial_d(method: str, d_reals: torch.Tensor, d_fakes: torch.Tensor) -> torch.Tensor:
    if method == "gan":  # -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
        return -(torch.sigmoid(d_reals).log().mean() + (1 - torch.sigmoid(d_fakes)).log().mean())
    if method == "hinge":
        return torch.clamp(1 - d_reals, min=0).mean() + torch.clamp(1 + d_fakes, min=0).mean()
    return d_fakes.mean() - d_reals.mean()  # wgan, wgan-gp


def _gan_adversarial_g(method: str, d_fakes: torch.Tensor) -> torch.Tensor:
    return -torch.sigmoid(d_fakes).log().mean() if method == "gan" else -d_fakes.mean()


# ------------------------------------------------------------------------------------------------ D and G steps
@pytest.mark.parametrize("script_name", sorted(GAN_SCRIPTS))
@pytest.mark.parametrize("method", GAN_METHODS)
@pytest.mark.parametrize("model", ["dcgan", "acgan"])
def test_gan_d_and_g_step_losses_by_hand(script_name, method, model):
    """D: the method's adversarial loss (+ AC-GAN's class CE on reals and fakes, weight 1 each; + lambda * WGAN-GP
    two-sided penalty at eps-interpolates). G: the non-saturating / -D(G(z)) loss (+ AC-GAN's CE on fakes). The D
    step's gradient never reaches G; the G step's gradient on G is the hand loss's."""
    script = GAN_SCRIPTS[script_name]
    acgan = model == "acgan"
    cfg = _gan_cfg(script, model=model, method=method, conditional=acgan, gp_lambda=7.0)
    gen, disc, reals, zs, labels = _gan_setup(conditional=acgan)
    aux = AuxClassifierLoss() if acgan else None
    loss_fn = get_gan_loss(method)

    fakes = gen(zs, labels)  # with G's graph: the D step must cut it
    torch.manual_seed(11)
    loss_d, stats_d = script.d_step_loss(cfg, disc, loss_fn, aux, reals, fakes, labels)
    with torch.no_grad():
        (d_r, c_r), (d_f, c_f) = disc(reals, labels, aux=True), disc(fakes, labels, aux=True)
        expected = _gan_adversarial_d(method, d_r, d_f)
        if acgan:
            expected = expected + _gan_ce(c_r, labels) + _gan_ce(c_f, labels)
        if method == "wgan-gp":
            torch.manual_seed(11)
            eps = torch.rand(GAN_N, 1)
            x_hat = eps * reals + (1 - eps) * fakes
            expected = expected + 7.0 * ((_gan_input_grad(disc, x_hat).norm(dim=1) - 1) ** 2).mean()
    assert loss_d.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert stats_d["loss/d"].item() == pytest.approx(_gan_adversarial_d(method, d_r, d_f).item(), rel=1e-5)
    loss_d.backward()
    assert all(p.grad is None for p in gen.parameters())  # D's step never reaches G
    assert all(p.grad is not None for p in disc.source.parameters())
    assert (disc.classes.weight.grad is not None and disc.classes.weight.grad.abs().sum() > 0) == acgan

    gen.zero_grad(set_to_none=True)
    loss_g, stats_g = script.g_step_loss(cfg, gen, disc, loss_fn, aux, zs, labels)
    d_f, c_f = disc(gen(zs, labels), labels, aux=True)
    expected = _gan_adversarial_g(method, d_f) + (_gan_ce(c_f, labels) if acgan else 0)
    assert loss_g.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert stats_g["loss/g"] is loss_g and ("loss/g_class" in stats_g) == acgan
    got = torch.autograd.grad(loss_g, list(gen.parameters()))
    want = torch.autograd.grad(expected, list(gen.parameters()))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("script_name", sorted(GAN_SCRIPTS))
def test_gan_label_tricks_by_hand(script_name):
    """Ganzo's soft labels (targets U[0.9, 1] / U[0, 0.1] in D, U[0.9, 1] in G) and noisy labels (p = 1: both terms'
    targets swapped) enter the NS-GAN cross-entropies with the same meaning in both scripts."""
    script = GAN_SCRIPTS[script_name]
    gen, disc, reals, zs, _ = _gan_setup()
    fakes = gen(zs).detach()
    loss_fn = get_gan_loss("gan")
    with torch.no_grad():
        d_r, d_f = disc(reals), disc(fakes)

    def bce(logits, t):  # -t log sigmoid(x) - (1 - t) log(1 - sigmoid(x))
        return -(t * torch.sigmoid(logits).log() + (1 - t) * (1 - torch.sigmoid(logits)).log()).mean()

    cfg = _gan_cfg(script, method="gan", soft_labels=True)
    torch.manual_seed(3)
    loss, _ = script.d_step_loss(cfg, disc, loss_fn, None, reals, fakes, None)
    torch.manual_seed(3)
    t_real, t_fake = torch.empty(GAN_N).uniform_(0.9, 1.0), torch.empty(GAN_N).uniform_(0.0, 0.1)
    assert loss.item() == pytest.approx((bce(d_r, t_real) + bce(d_f, t_fake)).item(), rel=1e-5)
    torch.manual_seed(4)
    loss, _ = script.g_step_loss(cfg, gen, disc, loss_fn, None, zs, None)
    torch.manual_seed(4)
    t_g = torch.empty(GAN_N).uniform_(0.9, 1.0)
    assert loss.item() == pytest.approx(bce(disc(gen(zs)), t_g).item(), rel=1e-5)

    cfg = _gan_cfg(script, method="gan", noisy_labels=1.0)
    loss, _ = script.d_step_loss(cfg, disc, loss_fn, None, reals, fakes, None)
    assert loss.item() == pytest.approx((bce(d_r, torch.zeros(GAN_N)) + bce(d_f, torch.ones(GAN_N))).item(), rel=1e-5)


@pytest.mark.parametrize("script_name", sorted(GAN_SCRIPTS))
def test_gan_orthogonal_penalty_joins_g_with_its_weight(script_name):
    """BigGAN's recipe: G's loss + beta * sum_{i != j} (w_i . w_j)^2 over G's weight matrices, beta = 1e-4 by
    default; the gradient of that term reaches G."""
    script = GAN_SCRIPTS[script_name]
    cfg = _gan_cfg(script, model="biggan")
    assert cfg.ortho_reg == 1e-4
    cfg.ortho_reg = 0.3  # large enough to dominate, so a wrong weight shows
    gen, disc, _, zs, _ = _gan_setup()
    loss, stats = script.g_step_loss(cfg, gen, disc, get_gan_loss(cfg.method), None, zs, None)
    expected = -disc(gen(zs)).mean() + 0.3 * _gan_ortho(gen)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["penalty/ortho"].item() == pytest.approx(_gan_ortho(gen).item(), rel=1e-5)
    got = torch.autograd.grad(loss, list(gen.parameters()))
    want = torch.autograd.grad(expected, list(gen.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("script_name", sorted(GAN_SCRIPTS))
def test_gan_wgan_clip_after_the_d_step_only_under_wgan(script_name):
    script = GAN_SCRIPTS[script_name]
    for method in GAN_METHODS:
        torch.manual_seed(0)
        disc = _GanDisc()
        with torch.no_grad():
            disc.hidden.weight.mul_(10)
        before = [p.detach().clone() for p in disc.parameters()]
        script.clip_critic(_gan_cfg(script, method=method, clip_value=0.05), disc)
        for old, new in zip(before, disc.parameters(), strict=True):
            assert torch.equal(new, old.clamp(-0.05, 0.05) if method == "wgan" else old), method


@pytest.mark.parametrize("script_name", sorted(GAN_SCRIPTS))
def test_gan_g_step_interval(script_name):
    """One G step every train_g_interval D steps, the first at step 0: WGAN's n_critic 5, BigGAN's 2."""
    script = GAN_SCRIPTS[script_name]
    assert [s for s in range(12) if script.g_step_due(s, 5)] == [0, 5, 10]
    assert [s for s in range(6) if script.g_step_due(s, _gan_cfg(script, model="biggan").train_g_interval)] == [0, 2, 4]
    assert all(script.g_step_due(s, 1) for s in range(4))


# ------------------------------------------------------------------------------------------------ regularisers
def test_gan_drift_and_r1_every_step_join_the_d_step():
    """ProGAN's drift eps * mean D(real)^2 and StyleGAN's R1 gamma / 2 * mean ||grad D(real)||^2 (R1 every step:
    r1_interval 1) are added to D's loss with their weights; lazy R1 is left out of it."""
    gen, disc, reals, zs, _ = _gan_setup()
    fakes = gen(zs).detach()
    with torch.no_grad():
        d_r, d_f = disc(reals), disc(fakes)
        grad_sq = _gan_input_grad(disc, reals).square().sum(1).mean()
    adversarial = _gan_adversarial_d("gan", d_r, d_f)
    cfg = _gan_cfg(gan_celeba, model="dcgan", drift_penalty=0.25, r1_gamma=3.0, r1_interval=1)
    loss, stats = gan_celeba.d_step_loss(cfg, disc, get_gan_loss("gan"), None, reals, fakes, None)
    assert loss.item() == pytest.approx((adversarial + 0.25 * d_r.square().mean() + 3.0 / 2 * grad_sq).item(), rel=1e-5)
    assert stats["penalty/r1"].item() == pytest.approx(grad_sq.item(), rel=1e-5)
    assert stats["penalty/drift"].item() == pytest.approx(d_r.square().mean().item(), rel=1e-5)
    lazy = _gan_cfg(gan_celeba, model="dcgan", r1_gamma=3.0, r1_interval=4)
    loss, stats = gan_celeba.d_step_loss(lazy, disc, get_gan_loss("gan"), None, reals, fakes, None)
    assert loss.item() == pytest.approx(adversarial.item(), rel=1e-5) and "penalty/r1" not in stats
    # ProGAN's recipe: drift 0.001 with WGAN-GP by default.
    progan = _gan_cfg(gan_celeba, model="progressive_gan")
    assert (progan.method, progan.drift_penalty) == ("wgan-gp", 0.001)


def test_gan_lazy_r1_step_weight_times_interval():
    """StyleGAN2 App. B: the lazy R1 step's loss is gamma / 2 * k * mean ||grad D(real)||^2, every k-th D step from
    step 0 (recipe: gamma 10, k 16); the gradient reaches D only."""
    _, disc, reals, _, _ = _gan_setup()
    cfg = _gan_cfg(gan_celeba, model="stylegan2")
    assert (cfg.r1_gamma, cfg.r1_interval) == (10.0, 16)
    cfg.r1_gamma, cfg.r1_interval = 3.0, 4
    loss, stats = gan_celeba.lazy_r1_loss(cfg, disc, reals, None)
    grad_sq = _gan_input_grad(disc, reals).square().sum(1).mean()
    assert loss.item() == pytest.approx((3.0 / 2 * 4 * grad_sq).item(), rel=1e-5)
    assert stats["penalty/r1"].item() == pytest.approx(grad_sq.item(), rel=1e-5)
    got = torch.autograd.grad(loss, list(disc.parameters()), allow_unused=True)
    want = torch.autograd.grad(3.0 / 2 * 4 * grad_sq, list(disc.parameters()), allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, torch.zeros_like(a) if b is None else b, rtol=1e-5, atol=1e-7)
    assert [s for s in range(10) if gan_celeba.lazy_r1_due(s, cfg)] == [0, 4, 8]
    cfg.r1_interval = 1  # R1 every step rides in the D step, no separate step
    assert not any(gan_celeba.lazy_r1_due(s, cfg) for s in range(4))


def test_gan_path_length_step_by_hand():
    """StyleGAN2 Eq. 4, lazy: a <- a + decay (mean L - a); loss = w * k * mean (L - a)^2 with L = ||J_w^T y||,
    y ~ N(0, I) / sqrt(H W) (lengths averaged over the num_ws copies); due every k-th G step (recipe: w 2, k 4)."""
    cfg = _gan_cfg(gan_celeba, model="stylegan2")
    assert (cfg.pl_weight, cfg.pl_interval) == (2.0, 4)
    cfg.pl_weight, cfg.pl_interval, cfg.pl_decay = 0.7, 3, 0.2
    torch.manual_seed(0)
    gen = _GanStyleGen()
    zs, a0 = torch.randn(4, GAN_Z), torch.tensor(0.5)
    torch.manual_seed(9)
    loss, a1, stats = gan_celeba.pl_step_loss(cfg, gen, zs, a0)
    torch.manual_seed(9)
    s = gen.side
    y = torch.randn(4, 1, s, s) / s
    lengths = []
    for i in range(4):  # J_w^T y by hand: images = tanh(ws) flat @ M
        ws = gen.make_ws(zs[i : i + 1])[0]
        jt_y = ((gen.mix @ y[i].flatten()) * (1 - torch.tanh(ws).flatten() ** 2)).reshape(gen.num_ws, gen.w_dim)
        lengths.append(jt_y.square().sum(1).mean().sqrt())
    lengths = torch.stack(lengths)
    a_new = a0 + 0.2 * (lengths.mean() - a0)
    assert a1.item() == pytest.approx(a_new.item(), rel=1e-5)
    penalty = (lengths - a_new).square().mean()
    assert loss.item() == pytest.approx((0.7 * 3 * penalty).item(), rel=1e-5)
    assert stats["penalty/pl"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert all(p.grad is None for p in gen.parameters())
    loss.backward()
    assert gen.mix.grad.abs().sum() > 0 and gen.mapping.weight.grad.abs().sum() > 0  # G receives it
    # Every 4th G step, G steps every 2nd D step: D steps 0, 8, 16 (counted in G steps, not D steps).
    cfg.train_g_interval, cfg.pl_interval = 2, 4
    assert [step for step in range(18) if gan_celeba.pl_step_due(step, cfg)] == [0, 8, 16]


# ------------------------------------------------------------------------------------------------ recipes
def test_gan_recipes_are_the_same_in_both_scripts():
    """Every model gan_mnist.py trains resolves to the same recipe in both scripts; BigGAN's is the paper's."""
    keys = ("method", "lr", "lr_d", "beta1", "beta2", "train_g_interval", "ortho_reg")
    for model in gan_mnist.TRAINS:
        cond = model == "acgan"
        a, b = (_gan_cfg(s, model=model, conditional=cond) for s in (gan_mnist, gan_celeba))
        assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys], model
    big = _gan_cfg(gan_mnist, model="biggan")
    assert [getattr(big, k) for k in keys] == ["hinge", 5e-5, 2e-4, 0.0, 0.999, 2, 1e-4]
    assert GAN_RECIPES["biggan"]["train_g_interval"] == 2
    # Explicit flags win; --lr alone sets both networks' rates.
    mine = _gan_cfg(gan_mnist, model="biggan", method="gan", lr=1e-3, train_g_interval=1, ortho_reg=0.0)
    assert (mine.method, mine.lr, mine.lr_d, mine.train_g_interval, mine.ortho_reg) == ("gan", 1e-3, 1e-3, 1, 0.0)


def test_gan_mnist_refuses_models_it_cannot_train_as_their_papers(capsys, tmp_path):
    for model, needs in [("progressive_gan", "growing"), ("stylegan", "R1"), ("stylegan2", "path length")]:
        message = cli_error(gan_mnist.cli, ["--model", model, "--log_dir", str(tmp_path), "--dry_run"], capsys)
        assert needs in message and "use gan_celeba.py" in message and "\n" not in message.strip()
    message = cli_error(gan_mnist.cli, ["--r1_gamma", "10", "--log_dir", str(tmp_path), "--dry_run"], capsys)
    assert "--r1_gamma" in message and "gan_celeba.py" in message
    assert not list(tmp_path.iterdir())


def test_gan_mnist_biggan_dry_run_shows_its_recipe(capsys):
    with pytest.raises(SystemExit) as done:
        gan_mnist.cli(["--model", "biggan", "--dry_run"])
    assert done.value.code == 0
    shown = json.loads(capsys.readouterr().out)
    recipe = (shown["method"], shown["lr"], shown["lr_d"], shown["beta1"], shown["beta2"], shown["train_g_interval"])
    assert recipe + (shown["ortho_reg"],) == ("hinge", 5e-5, 2e-4, 0.0, 0.999, 2, 1e-4)


def test_gan_mnist_biggan_loop_runs_its_recipe(tmp_path, mnist_dir):
    """The loop takes a G step (with the orthogonal penalty) at D steps 0 and 2 only, and D's optimizer runs at
    BigGAN's D rate."""
    args = ["--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path), *TINY, "--model", "biggan"]
    args += ["--gen_kwargs", '{"base_dim": 8, "shared_dim": 8}', "--disc_kwargs", '{"base_dim": 8}', "--n_steps", "4"]
    args += ["--log_interval", "1", "--sample_interval", "0", "--loggers", "none", "--log_name", "b"]
    gan_mnist.cli(args)
    rows = read_stats(tmp_path / "b")
    assert [("loss/g" in r, "penalty/ortho" in r) for r in rows] == [(True, True), (False, False)] * 2
    state = load_training_state(tmp_path / "b" / "states" / "state-00000004")
    assert state["optim_d"]["param_groups"][0]["lr"] == 2e-4 and state["optim_g"]["param_groups"][0]["lr"] == 5e-5
    assert state["optim_d"]["param_groups"][0]["betas"] == (0.0, 0.999)


def test_gan_mnist_wgan_loop_clips_every_critic_parameter(tmp_path, mnist_dir):
    """The loop clips after each D step under --method wgan: every parameter of the saved critic is in [-c, c]."""
    args = ["--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path), *TINY, "--method", "wgan"]
    args += ["--clip_value", "0.125", "--n_steps", "2", "--sample_interval", "0", "--loggers", "none"]
    args += ["--log_name", "w"]
    gan_mnist.cli(args)
    disc = load_training_state(tmp_path / "w" / "states" / "state-00000002")["disc"]
    params = {k: v for k, v in disc.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert params and max(v.abs().max().item() for v in params.values()) <= 0.125
    assert max(v.abs().max().item() for v in params.values()) == 0.125  # clipped, not merely small


# ------------------------------------------------------------------------------------------------ learning
def _gan_learn(script, cfg, n_steps: int, data, lr: float, betas: tuple[float, float], seed: int = 0):
    """The scripts' own steps, in the loop's order, on 2-D points: D step (+ clip), G step every train_g_interval
    D steps; an affine G, a one-hidden-layer D of width 32. Returns G."""
    torch.manual_seed(seed)
    gen, disc = _GanGen(width=0), _GanDisc(width=32)
    aux = AuxClassifierLoss() if cfg.model == "acgan" else None
    loss_fn = get_gan_loss(cfg.method)
    optim_g = torch.optim.Adam(gen.parameters(), lr, betas=betas)
    optim_d = torch.optim.Adam(disc.parameters(), lr, betas=betas)
    for step in range(n_steps):
        reals, labels = data(64)
        labels = labels if cfg.conditional else None
        with torch.no_grad():
            fakes = gen(torch.randn(64, GAN_Z), labels)
        loss_d, _ = script.d_step_loss(cfg, disc, loss_fn, aux, reals, fakes, labels)
        optim_d.zero_grad(set_to_none=True)
        loss_d.backward()
        optim_d.step()
        script.clip_critic(cfg, disc)
        if script.g_step_due(step, cfg.train_g_interval):
            disc.requires_grad_(False)
            loss_g, _ = script.g_step_loss(cfg, gen, disc, loss_fn, aux, torch.randn(64, GAN_Z), labels)
            optim_g.zero_grad(set_to_none=True)
            loss_g.backward()
            disc.requires_grad_(True)
            optim_g.step()
    return gen


GAN_MODES = 1.5 * torch.tensor([[1.0, 0.0], [-0.5, 0.75**0.5], [-0.5, -(0.75**0.5)]])  # three modes, radius 1.5


def _gan_mixture(n: int):
    labels = torch.randint(0, GAN_CLASSES, (n,))
    return GAN_MODES[labels] + 0.15 * torch.randn(n, 2), labels


def _gan_shifted(n: int):
    """N(mu, C) with mu = (2, -1), C = A A^T."""
    a = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    return torch.tensor([2.0, -1.0]) + torch.randn(n, 2) @ a.T, torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize(
    "script_name, model, method",
    [("gan_mnist", "dcgan", "gan"), ("gan_celeba", "biggan", "hinge"), ("gan_mnist", "dcgan", "wgan-gp")],
)
def test_gan_steps_learn_a_gaussian(script_name, model, method):
    """500 D steps (BigGAN's recipe: 250 G steps) move G's mean and covariance most of the way to the data's."""
    script = GAN_SCRIPTS[script_name]
    cfg = _gan_cfg(script, model=model, method=method)
    torch.manual_seed(1)
    data = _gan_shifted(4000)[0]
    mu, cov = data.mean(0), data.T.cov()
    torch.manual_seed(0)  # `_gan_learn`'s initial G
    with torch.no_grad():
        before = _GanGen(width=0)(torch.randn(4000, GAN_Z))
    gen = _gan_learn(script, cfg, 500, _gan_shifted, lr=1e-2, betas=(0.5, 0.9))
    with torch.no_grad():
        after = gen(torch.randn(4000, GAN_Z))
    assert (after.mean(0) - mu).norm() < 0.25 * (before.mean(0) - mu).norm()
    assert (after.T.cov() - cov).norm() < 0.5 * (before.T.cov() - cov).norm()


def test_gan_acgan_steps_reach_every_mode_with_its_label():
    """AC-GAN's steps on a 3-mode mixture labelled by mode: G(z, c) lands on mode c for every c."""
    cfg = _gan_cfg(gan_mnist, model="acgan", conditional=True)
    gen = _gan_learn(gan_mnist, cfg, 500, _gan_mixture, lr=5e-3, betas=(0.5, 0.999))
    with torch.no_grad():
        for c in range(GAN_CLASSES):
            points = gen(torch.randn(500, GAN_Z), torch.full((500,), c))
            assert (torch.cdist(points, GAN_MODES).argmin(1) == c).float().mean() > 0.9, (c, points.mean(0))
            assert (points.mean(0) - GAN_MODES[c]).norm() < 0.6, (c, points.mean(0))


# ====================================================================================================================
# translate.py's training steps pinned: the loss of each optimizer step (pix2pix's D and G steps, CycleGAN's G step
# and its D step for both discriminators), as the script's own step functions assemble it, equals the papers' formula
# written out here on a fixed tiny batch through tiny real networks, and only the network being trained receives a
# gradient; the training images' random jitter and mirroring (one draw per pair, off with --no-augment); and a short
# pix2pix run that learns, with its evaluation on the held-out pairs as they are.
# ====================================================================================================================
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


# ====================================================================================================================
# Each optimizer step of diffusion_train.py (EDM, Föllmer) and distill_characteristic.py, as the scripts assemble it,
# against the formulas written out by hand on a fixed tiny batch (EDM's loss, the Characteristic Learning paper's
# losses); what the loops do around it (learning rate, EMA, clipping, gradient accumulation, which batch and seed), read
# back from the training states of 1- and 2-step runs; and short runs on GPM's 2-D Gaussian mixture that learn: the
# denoiser's loss falls and its samples spread to the data's covariance, the distilled one-step generator approaches its
# teacher's ODE map.
# ====================================================================================================================
DIFFUSION_NET = dict(dim=2, width=16, depth=2)
# The short toy runs: small enough for a few seconds on one CPU thread, long enough to learn (measured below).
DIFFUSION_TOY_ARGV = [
    "--dataset", "gaussians", "--model", "mlp", "--net_kwargs", '{"width": 64, "depth": 2}', "--batch_size", "128",
    "--n_steps", "300", "--lr", "2e-3", "--lr_rampup_kimg", "2", "--log_interval", "100", "--sample_interval", "0",
    "--checkpoint_interval", "300", "--loggers", "none",
]  # fmt: skip


def _diffusion_reals() -> tuple[torch.Tensor, torch.Tensor]:
    reals = torch.tensor([[1.5, -0.5], [-2.0, 0.25], [0.3, 2.5], [-0.7, -1.1]])
    return reals, torch.tensor([0, 2, 1, 2])


def _diffusion_schedule(method: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, beta_t) of x_t = alpha_t·x0 + beta_t·z: EDM x = y + sigma·n; Föllmer (1 - t)·x0 + sqrt(t(2 - t))·z."""
    if method == "edm":
        return torch.ones_like(t), t
    return 1 - t, (t * (2 - t)).sqrt()


def _diffusion_denoise(method, denoiser, x, t, labels, s=None):
    """D(x; t) = c_skip·x + c_out·F(c_in·x, c_noise(t)[, c_noise(s)]) from the raw network F, with
    c_skip = a·sd²/(a²sd² + b²), c_out = b·sd/sqrt(a²sd² + b²), c_in = 1/sqrt(a²sd² + b²) (EDM Table 1 for x/a)."""
    a, b = (v[:, None] for v in _diffusion_schedule(method, t))
    sd = denoiser.sigma_data
    norm = a**2 * sd**2 + b**2
    c_noise = (lambda v: v.clamp(min=1e-4).log() / 4) if method == "edm" else (lambda v: 999 * v)
    extra = () if s is None else (c_noise(s),)
    out = denoiser.net(x / norm.sqrt(), c_noise(t), labels, *extra)
    return a * sd**2 / norm * x + b * sd / norm.sqrt() * out


def _diffusion_grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize(
    "method,sigma_data,loss_kwargs", [("edm", 0.7, {"P_mean": -0.4, "P_std": 0.9}), ("follmer", 1.3, {"eps0": 0.05})]
)
def test_diffusion_step_loss_is_the_papers_weighted_error(method, sigma_data, loss_kwargs):
    """diffusion_train.denoiser_loss with the script's loss on 4 fixed points against the formula: EDM
    ln sigma ~ N(P_mean, P_std²), x = y + sigma·n, lambda = (sigma² + sd²)/(sigma·sd)², the weighted squared error
    summed over elements and averaged over the batch; Föllmer t = eps0 + (1 - eps0)·U, x_t = (1 - t)·x0 +
    sqrt(t(2 - t))·z, lambda = (a²sd² + b²)/(b·sd)², averaged over elements and the batch. Non-default sigma_data,
    P_mean/P_std and eps0, so a constant that ignores them fails. The denoiser's parameter gradients are the hand
    loss's too."""
    torch.manual_seed(0)
    denoiser = build_denoiser(method, net="mlp", net_kwargs=DIFFUSION_NET | {"n_classes": 3}, sigma_data=sigma_data)
    reals, labels = _diffusion_reals()
    torch.manual_seed(7)
    loss = diffusion_train.denoiser_loss(denoiser, get_diffusion_loss(method, **loss_kwargs), reals, labels)
    loss.backward()
    script_grads = _diffusion_grads(denoiser)
    denoiser.zero_grad()

    torch.manual_seed(7)  # the same draws in the same order: noise levels, then noise
    if method == "edm":
        t = (torch.randn(4) * loss_kwargs["P_std"] + loss_kwargs["P_mean"]).exp()
    else:
        t = loss_kwargs["eps0"] + (1 - loss_kwargs["eps0"]) * torch.rand(4)
    z = torch.randn(4, 2)
    a, b = _diffusion_schedule(method, t)
    denoised = _diffusion_denoise(method, denoiser, a[:, None] * reals + b[:, None] * z, t, labels)
    weight = (a**2 * sigma_data**2 + b**2) / (b * sigma_data) ** 2
    per_element = weight[:, None] * (denoised - reals) ** 2
    by_hand = (per_element.sum(1) if method == "edm" else per_element.mean(1)).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=0)
    by_hand.backward()
    for got, want in zip(script_grads, _diffusion_grads(denoiser), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_diffusion_lr_warm_up_and_clip_threshold():
    """EDM's warm-up is linear in images seen *before* the step (lr 0 at step 0), then flat; --lr_rampup_kimg 0 is
    none. The clip threshold: EDM unclipped, Föllmer 1 (CharacteristicGenerator), --grad_clip wins, 0 = none."""
    cfg = diffusion_train.Config(lr=2e-3, lr_rampup_kimg=1.0)
    images = 100  # per step: 1,000 images after 10 steps
    assert [diffusion_train.learning_rate(cfg, step, images) for step in (0, 1, 5, 10, 20)] == pytest.approx(
        [0.0, 2e-4, 1e-3, 2e-3, 2e-3], abs=1e-12
    )
    assert diffusion_train.learning_rate(diffusion_train.Config(lr=2e-3, lr_rampup_kimg=0), 0, images) == 2e-3
    Config = diffusion_train.Config
    assert diffusion_train.max_grad_norm(Config(method="edm")) == math.inf
    assert diffusion_train.max_grad_norm(Config(method="follmer")) == 1.0
    assert diffusion_train.max_grad_norm(Config(method="edm", grad_clip=0.5)) == 0.5
    assert diffusion_train.max_grad_norm(Config(method="follmer", grad_clip=0.0)) == math.inf


def _diffusion_states(run_dir) -> list[dict]:
    return [load_training_state(path) for path in sorted((run_dir / "states").glob("state-*"))]


def _diffusion_max_change(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_diffusion_loop_sets_the_lr_clips_and_averages(tmp_path):
    """What the loop does around the step loss, read back from the training states after steps 1 and 2 of the
    script (16 points a step): the optimizer's lr is learning_rate's (0, then 1e-2·16/20); the EMA follows
    beta = 0.5^(16 / min(half-life, ramp-up·images seen)) with images seen *including* the step (ramp-up 1: beta
    0.5 at step 1, 0.5^(1/2) at step 2), ema_2 = beta·ema_1 + (1 - beta)·denoiser_2; the update moves the weights
    (lr 0 leaves them unchanged). A second run with --grad_clip 1e-12 barely moves them: Adam's first step is
    lr·g/(|g| + 1e-8), at most 1e-6 for clipped gradients, against ~lr unclipped."""
    argv = [
        "--method", "edm", "--dataset", "gaussians", "--model", "mlp", "--net_kwargs", '{"width": 16, "depth": 1}',
        "--batch_size", "16", "--lr", "1e-2", "--ema_rampup", "1.0", "--checkpoint_interval", "1",
        "--sample_interval", "0", "--loggers", "none", "--log_dir", str(tmp_path),
    ]  # fmt: skip
    diffusion_train.main(parse(diffusion_train.Config, argv + ["--n_steps", "2", "--lr_rampup_kimg", "0.02"]))
    first, second = _diffusion_states(tmp_path / "gaussians_edm_mlp")
    assert [s["optimizer"]["param_groups"][0]["lr"] for s in (first, second)] == pytest.approx([0.0, 8e-3])
    assert _diffusion_max_change(first["denoiser"], first["ema"]) == 0  # lr 0: nothing moved, ema = weights
    assert _diffusion_max_change(first["denoiser"], second["denoiser"]) > 1e-3
    beta = 0.5**0.5
    for name, ema in second["ema"].items():
        want = beta * first["ema"][name] + (1 - beta) * second["denoiser"][name]
        torch.testing.assert_close(ema, want, rtol=1e-5, atol=1e-7)

    clip = ["--n_steps", "1", "--lr_rampup_kimg", "0", "--grad_clip", "1e-12", "--log_name", "clipped"]
    diffusion_train.main(parse(diffusion_train.Config, argv + clip))
    (clipped,) = _diffusion_states(tmp_path / "clipped")
    assert clipped["optimizer"]["param_groups"][0]["lr"] == 1e-2
    assert _diffusion_max_change(first["denoiser"], clipped["denoiser"]) < 2e-6  # the same initialisation (seed 0)


@pytest.mark.parametrize("method,conditional", [("edm", True), ("follmer", False)])
def test_diffusion_loop_update_is_the_step_loss_gradient(method, conditional, tmp_path):
    """With --optimizer RAdam the first update is plain momentum, p_1 = p_0 - lr·g, so the script's first step
    reveals its gradient g. Replayed with the script's data order, step seed and denoiser_loss (labels passed when
    --conditional), g must be that loss's gradient: not its negative, not another batch's, not without labels."""
    argv = [
        "--method", method, "--dataset", "gaussians", "--model", "mlp", "--net_kwargs", '{"width": 16, "depth": 1}',
        "--batch_size", "16", "--optimizer", "RAdam", "--lr", "1e-2", "--lr_rampup_kimg", "0", "--grad_clip", "0",
        "--n_steps", "1", "--checkpoint_interval", "1", "--sample_interval", "0", "--loggers", "none",
        "--log_dir", str(tmp_path), "--log_name", "run", *(["--conditional"] if conditional else []),
    ]  # fmt: skip
    cfg = parse(diffusion_train.Config, argv)
    diffusion_train.main(cfg)
    (state,) = _diffusion_states(tmp_path / "run")

    loader = iter(make_loader(build_dataset("gaussians", None, 32), 16, 0, 1, 0, 0))  # before the step's seed
    torch.manual_seed(0)
    denoiser = diffusion_train.build_model(cfg, (2,), 5 if conditional else 0)[0]
    init = {k: v.clone() for k, v in denoiser.state_dict().items()}
    torch.manual_seed(step_seed(0, 0, 0))
    reals, labels = next(loader)
    loss = diffusion_train.denoiser_loss(denoiser, get_diffusion_loss(method), reals, labels if conditional else None)
    loss.backward()
    for name, p in denoiser.named_parameters():
        torch.testing.assert_close(state["denoiser"][name], init[name] - 1e-2 * p.grad, rtol=0, atol=1e-6)
    assert _diffusion_max_change(init, state["denoiser"]) > 1e-4


def _diffusion_toy_run(log_dir, method: str):
    argv = DIFFUSION_TOY_ARGV + ["--method", method, "--log_dir", str(log_dir), "--log_name", method]
    diffusion_train.main(parse(diffusion_train.Config, argv))
    return log_dir / method


@pytest.fixture(scope="module")
def diffusion_follmer_run(tmp_path_factory):
    """The Föllmer toy run; its snapshot is also the distillation teacher below."""
    return _diffusion_toy_run(tmp_path_factory.mktemp("follmer"), "follmer")


@pytest.mark.parametrize("method", ["edm", "follmer"])
def test_diffusion_toy_run_learns(method, tmp_path, request):
    """300 steps x 128 points of the script on GPM's 5-Gaussian mixture (mean 0, covariance 4.75·I) with the default
    sigma_data (EDM 0.5, Föllmer 1), so the untrained denoiser samples a narrow blob. Measured: the loss on fixed
    test points and noise falls from 15.3 to 4.9 (EDM) and from 3.58 to 2.70 (Föllmer); the sampled variances go
    from 0.25-0.30 to 4.9-5.0 (EDM) and from 0.80-0.95 to 3.7-3.9 (Föllmer). Bounds: the loss below 0.5x (EDM) /
    0.85x (Föllmer) of its start; every variance within ±30 % of 4.75 after training and outside it before; the
    mean within 0.3 (~6 standard errors of 1,000 samples)."""
    if method == "follmer":
        run_dir = request.getfixturevalue("diffusion_follmer_run")
    else:
        run_dir = _diffusion_toy_run(tmp_path, method)
    meta, state_dict = load_snapshot(run_dir)
    trained = build_denoiser(meta["model"], **meta["model_kwargs"])
    trained.load_state_dict(state_dict)
    torch.manual_seed(0)  # the script's initialisation (--seed 0)
    untrained = build_denoiser(meta["model"], **meta["model_kwargs"])
    points, loss_fn = toy_points("gaussians", train=False)[0][:2000], get_diffusion_loss(method)

    @torch.no_grad()
    def fixed_noise_loss(denoiser) -> float:
        torch.manual_seed(1)
        return float(diffusion_train.denoiser_loss(denoiser.eval(), loss_fn, points, None))

    before, after = fixed_noise_loss(untrained), fixed_noise_loss(trained)
    mean, cov = toy_moments("gaussians")
    moments = {}
    for name, denoiser in (("untrained", untrained), ("trained", trained)):
        x, _ = sample(denoiser.eval(), StackedNoise(range(1000)), num_steps=18, device="cpu")
        moments[name] = x.mean(0), torch.cov(x.T).diagonal()
    assert after < (0.5 if method == "edm" else 0.85) * before, (before, after)
    x_mean, x_var = moments["trained"]
    assert (x_mean - mean).abs().max() < 0.3, x_mean
    assert ((x_var / cov.diagonal()) - 1).abs().max() < 0.3, x_var
    assert ((moments["untrained"][1] / cov.diagonal()) - 1).abs().min() > 0.3, moments["untrained"]


def _diffusion_distill_nets(method: str):
    """A teacher MLP with O(1) random weights, its student (two-time, the s-branch made non-zero, else D(x, t, s)
    ignores s) and a target network that differs from the student."""
    net_kwargs = DIFFUSION_NET | {"n_classes": 3}
    teacher = random_denoiser(method, "mlp", net_kwargs)
    meta = {"model": method, "model_kwargs": {"net": "mlp", "net_kwargs": net_kwargs}}
    student = distill_characteristic.build_student(meta, teacher)[0].eval()
    with torch.no_grad():
        for p in student.net.map_s.parameters():
            p.normal_(std=0.3)
    target = EMA(student, decay=0.999).module
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student, target


@pytest.mark.parametrize("method,distance", [("follmer", "pseudo_huber"), ("edm", "l2")])
def test_distillation_step_loss_is_characteristic_plus_weighted_dsm(method, distance):
    """distill_characteristic.distillation_loss on 4 fixed points with jumps of n = 2 grid steps (one row ends its
    jump at the data end u = 0, two go to s = 0), 2 accumulation rounds, against the Characteristic Learning
    paper's formulas written out row by row:
        x_t = a_t·x0 + b_t·z;  x_u = two DEIS steps of the teacher, x <- G(x, t_k, t_k+1) with D_teacher;
        G(x, t, s) = (b_s/b_t)·x + (a_s - a_t·b_s/b_t)·D(x, t, s);
        L_char = mean dist(G_target(G_student(x_t, t, s), s, 0), sg[G_target(sg[G_student(x_u, u, s)], s, 0)]);
        L_dsm = the teacher's denoising loss on the student with s = t (Föllmer eps0 1e-3);
        w = ||dL_char/dW|| / (||dL_dsm/dW|| + 1e-4) at the student's output weight W, clamped to max_weight;
        loss = (L_char + w·L_dsm) / rounds,
    with pseudo-Huber sqrt(|a - b|² + c²) - c (c = 0.00054·sqrt(d)) or l2 = mean (a - b)². The student's gradients
    are those of the hand loss; the teacher, trainable here, gets none. With max_weight below w, w is clamped."""
    teacher, student, target = _diffusion_distill_nets(method)
    teacher.requires_grad_(True)
    cfg = distill_characteristic.Config(loss=distance)
    times = (0.999, 1e-3, 1.0) if method == "follmer" else (80.0, 0.002, 7.0)
    grid = torch.tensor(time_grid(*times[:2], 5, times[2]) + [0.0], dtype=torch.float64)  # indices 0..5, 5 = data
    n, i_t, i_s = 2, torch.tensor([0, 1, 3, 0]), torch.tensor([2, 5, 5, 4])
    reals, labels = _diffusion_reals()

    def script_step(cfg):
        torch.manual_seed(11)
        dsm_loss_fn, dist = distill_characteristic.get_dsm_loss(cfg, method), distill_characteristic.get_distance(cfg)
        return distill_characteristic.distillation_loss(
            cfg, student, target, teacher, dsm_loss_fn, dist, grid, reals, labels, (n, i_t, i_s), 2
        )

    loss, parts = script_step(cfg)
    loss.backward()
    script_grads = _diffusion_grads(student)
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()

    # By hand, row by row.
    def sched(t):
        return _diffusion_schedule(method, torch.as_tensor(t, dtype=torch.float64))

    def G(x, t, s, denoised):
        (a_t, b_t), (a_s, b_s) = sched(t), sched(s)
        ratio = b_s / b_t
        return (ratio * x + (a_s - ratio * a_t) * denoised).float()

    def D(net, x, t, s=None):
        as32 = lambda v: torch.tensor([float(v)])  # noqa: E731
        return _diffusion_denoise(method, net, x, as32(t), labels_row, None if s is None else as32(s))

    torch.manual_seed(11)  # draws in the script's order: x_t's noise, then the DSM term's times and noise
    z = torch.randn(4, 2)
    char = []
    for row in range(4):
        t, u, s = (float(grid[i]) for i in (i_t[row], i_t[row] + n, i_s[row]))
        labels_row = labels[row : row + 1]
        a_t, b_t = sched(t)
        x_t = (a_t * reals[row : row + 1] + b_t * z[row : row + 1]).float()
        with torch.no_grad():
            x_u = x_t
            for k in range(n):
                t_k, t_next = float(grid[i_t[row] + k]), float(grid[i_t[row] + k + 1])
                x_u = G(x_u, t_k, t_next, D(teacher, x_u, t_k))
            y_star = x_u if u == 0 else G(x_u, u, s, D(student, x_u, u, s))
            end_star = y_star if s == 0 else D(target, y_star, s, 0.0)  # G(y, s, 0) = D(y, s, 0)
        y = G(x_t, t, s, D(student, x_t, t, s))
        end = y if s == 0 else D(target, y, s, 0.0)
        if distance == "l2":
            char.append((end - end_star).pow(2).mean())
        else:
            c = 0.00054 * math.sqrt(2)
            char.append(((end - end_star).pow(2).sum() + c**2).sqrt() - c)
    loss_char = torch.stack(char).mean()
    if method == "edm":
        t = (torch.randn(4) * 1.2 - 1.2).exp()
    else:
        t = 1e-3 + (1 - 1e-3) * torch.rand(4)
    a, b = (v[:, None] for v in _diffusion_schedule(method, t))
    labels_row = labels
    denoised = _diffusion_denoise(method, student, a * reals + b * torch.randn(4, 2), t, labels, t)
    sd = student.sigma_data
    per_element = (a**2 * sd**2 + b**2) / (b * sd) ** 2 * (denoised - reals) ** 2
    loss_dsm = (per_element.sum(1) if method == "edm" else per_element.mean(1)).mean()
    W = student.net.out.weight
    g_char = torch.autograd.grad(loss_char, W, retain_graph=True)[0]
    g_dsm = torch.autograd.grad(loss_dsm, W, retain_graph=True)[0]
    weight = float(g_char.norm() / (g_dsm.norm() + 1e-4))
    by_hand = (loss_char + weight * loss_dsm) / 2

    assert min(float(loss_char.detach()), float(loss_dsm.detach()), weight) > 0.01  # every term matters here
    torch.testing.assert_close(parts["loss/char"], loss_char, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["loss/dsm"], loss_dsm, rtol=1e-5, atol=1e-7)
    assert float(parts["dsm_weight"]) == pytest.approx(weight, rel=1e-4)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-7)
    by_hand.backward()
    for got, want in zip(script_grads, _diffusion_grads(student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    clamped, parts = script_step(distill_characteristic.Config(loss=distance, max_weight=weight / 2))
    assert float(parts["dsm_weight"]) == pytest.approx(weight / 2, rel=1e-6)
    torch.testing.assert_close(clamped, (loss_char + weight / 2 * loss_dsm) / 2, rtol=1e-5, atol=1e-7)


def test_distillation_lr_warm_up():
    """CharacteristicGenerator's warm-up counts optimizer steps from 1: lr·min((step + 1)/lr_rampup_steps, 1);
    0 = none."""
    cfg = distill_characteristic.Config(lr=1e-3, lr_rampup_steps=4)
    rates = [distill_characteristic.learning_rate(cfg, step) for step in (0, 1, 3, 10)]
    assert rates == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3], abs=1e-12)
    assert distill_characteristic.learning_rate(distill_characteristic.Config(lr=1e-3, lr_rampup_steps=0), 0) == 1e-3


def test_distillation_loop_sets_the_lr_clips_and_averages(diffusion_follmer_run, tmp_path):
    """What the loop does around the step loss, read back from the training states after steps 1 and 2 (8 points a
    step, the Föllmer toy teacher): the optimizer's lr is learning_rate's (1e-2·1/4, then 1e-2·2/4); the target
    network is the EMA with CharacteristicGenerator's warm-up beta_k = min(decay, (1 + k)/(10 + k)) at update k (with
    --ema_decay 0.15: the warm-up's 0.1, then the decay 0.15 < 2/11), target_k = beta_k·target_(k-1)
    + (1 - beta_k)·student_k, from the student that the teacher initialised; the update moves the weights. A second
    run with --grad_clip 1e-12 barely moves them (an Adam-family first step is ~lr·g/(|g| + 1e-8))."""
    argv = [
        "--teacher", str(diffusion_follmer_run), "--bsz", "8", "--num_steps", "4", "--lr", "1e-2",
        "--lr_rampup_steps", "4", "--ema_decay", "0.15", "--checkpoint_interval", "1", "--sample_interval", "0",
        "--log_interval", "1", "--loggers", "none",
    ]  # fmt: skip
    distill_characteristic.main(
        parse(distill_characteristic.Config, argv + ["--n_steps", "2", "--workdir", str(tmp_path / "a")])
    )
    first, second = _diffusion_states(tmp_path / "a")
    assert [s["optimizer"]["param_groups"][0]["lr"] for s in (first, second)] == pytest.approx([2.5e-3, 5e-3])
    teacher_meta, teacher_state = load_snapshot(diffusion_follmer_run)
    teacher = build_denoiser(teacher_meta["model"], **teacher_meta["model_kwargs"])
    teacher.load_state_dict(teacher_state)
    init = distill_characteristic.build_student(teacher_meta, teacher)[0].state_dict()
    assert _diffusion_max_change(init, first["student"]) > 1e-4
    assert _diffusion_max_change(first["student"], second["student"]) > 1e-4
    for previous, state, beta in ((init, first, 0.1), (first["ema"], second, 0.15)):
        for name, ema in state["ema"].items():
            want = beta * previous[name] + (1 - beta) * state["student"][name]
            torch.testing.assert_close(ema, want.to(ema.dtype), rtol=1e-5, atol=1e-7)

    clip = ["--n_steps", "1", "--grad_clip", "1e-12", "--workdir", str(tmp_path / "clipped")]
    distill_characteristic.main(parse(distill_characteristic.Config, argv + clip))
    (clipped,) = _diffusion_states(tmp_path / "clipped")
    assert _diffusion_max_change(init, clipped["student"]) < 1e-6


def test_distillation_loop_accumulates_rounds_into_one_update(diffusion_follmer_run, tmp_path):
    """--global_bsz 16 with --bsz 8: one optimizer step of two accumulation rounds. RAdam's first update is plain
    momentum, p_1 = p_0 - lr·g (no adaptive term before its variance estimate is trusted), so the script's first
    update reveals its gradient g. Replayed here with the script's own data order, seeds and step function, g must
    be the sum over both rounds of the gradients of (L_char + w·L_dsm)/2, each round with its own batch and jumps:
    a loop that zeroed the gradients between rounds, or stepped after each, fails."""
    workdir = tmp_path / "accumulated"
    argv = [
        "--teacher", str(diffusion_follmer_run), "--workdir", str(workdir), "--bsz", "8", "--global_bsz", "16",
        "--num_steps", "4", "--lr", "1e-2", "--lr_rampup_steps", "0", "--grad_clip", "0", "--n_steps", "1",
        "--checkpoint_interval", "1", "--sample_interval", "0", "--log_interval", "1", "--loggers", "none",
    ]  # fmt: skip
    cfg = parse(distill_characteristic.Config, argv)
    distill_characteristic.main(cfg)
    (state,) = _diffusion_states(workdir)

    teacher, teacher_meta, _ = distill_characteristic.load_teacher(str(diffusion_follmer_run))
    torch.manual_seed(0)
    student = distill_characteristic.build_student(teacher_meta, teacher)[0].eval()
    init = {k: v.clone() for k, v in student.state_dict().items()}
    target = EMA(student, decay=cfg.ema_decay).module
    grid = torch.tensor(time_grid(teacher.t_max, teacher.t_min, 4, teacher.rho) + [0.0], dtype=torch.float64)
    loader = iter(make_loader(build_dataset("gaussians", None, 32), 8, 0, 1, 0, 0))  # before the step's seed
    dsm_loss_fn, distance = (
        distill_characteristic.get_dsm_loss(cfg, "follmer"),
        distill_characteristic.get_distance(cfg),
    )
    torch.manual_seed(step_seed(0, 0, 0))
    for r in range(2):
        reals, _ = next(loader)
        jumps = sample_jumps(
            len(grid), 8, cfg.jump_weighting, torch.Generator().manual_seed(step_seed(0, -1, r)), "cpu"
        )
        loss, _ = distill_characteristic.distillation_loss(
            cfg, student, target, teacher, dsm_loss_fn, distance, grid, reals, None, jumps, 2
        )
        loss.backward()
    for name, p in student.named_parameters():
        want = init[name] - 1e-2 * p.grad
        torch.testing.assert_close(state["student"][name], want, rtol=0, atol=1e-6)
    assert _diffusion_max_change(init, state["student"]) > 1e-4


def test_distillation_toy_run_learns(diffusion_follmer_run, tmp_path):
    """150 steps x 128 points distilling the Föllmer toy denoiser above (8-point grid and the data end). At step 0
    the one-step map G(z, t_max, 0) is the teacher's single DDIM step, D(z, t_max) ~ the data mean, a point; after
    training it follows the teacher's 40-step DEIS map of the same latents. Measured: mean distance 2.23 before,
    0.63 after (variances 0.07-0.1 -> 2.3-2.5, teacher 4.0-4.2). Bound: below half the start."""
    argv = [
        "--teacher", str(diffusion_follmer_run), "--workdir", str(tmp_path / "student"), "--bsz", "128",
        "--n_steps", "150", "--num_steps", "8", "--lr", "2e-3", "--lr_rampup_steps", "10", "--log_interval", "50",
        "--sample_interval", "0", "--checkpoint_interval", "150", "--loggers", "none",
    ]  # fmt: skip
    distill_characteristic.main(parse(distill_characteristic.Config, argv))
    teacher_meta, teacher_state = load_snapshot(diffusion_follmer_run)
    teacher = build_denoiser(teacher_meta["model"], **teacher_meta["model_kwargs"])
    teacher.load_state_dict(teacher_state)
    meta, state_dict = load_snapshot(tmp_path / "student")
    trained = build_denoiser(meta["model"], **meta["model_kwargs"])
    trained.load_state_dict(state_dict)
    untrained = distill_characteristic.build_student(teacher_meta, teacher)[0]
    teacher_map, _ = sample(teacher.eval(), StackedNoise(range(1000)), num_steps=40, device="cpu")
    errors = {}
    for name, student in (("untrained", untrained), ("trained", trained)):
        one_step, nfe = sample(student.eval(), StackedNoise(range(1000)), num_steps=1, device="cpu")
        assert nfe == 1
        errors[name] = float((one_step - teacher_map).norm(dim=1).mean())
    assert errors["trained"] < 0.5 * errors["untrained"], errors


# ====================================================================================================================
# GPM's particle models, each training step pinned: the losses that discriminator_flow.py and score_gan.py assemble
# (their own step functions, the ones their loops call) equal values computed here by hand from GPM's formulas
# (Franceschi et al. 2023, arXiv 2305.16150; White-Link/gpm) on fixed tiny batches, with the gradients each network
# receives; the flow's step follows K; and short seeded runs of both scripts on GPM's 2-D 5-Gaussian set learn.
# ====================================================================================================================
GPM_QUIET = ["--loggers", "none", "--sample_interval", "0"]
# GPM's 5-Gaussian set: modes on a circle of radius 3 at angles -2 pi k / 5, std 0.5; its covariance is (9/2 + 1/4) I.
GPM_MODE_CENTRES = [(3 * math.cos(-2 * math.pi * k / 5), 3 * math.sin(-2 * math.pi * k / 5)) for k in range(5)]
GPM_DATA_VAR = 4.5 + 0.25


class _GpmQuadCritic(nn.Module):
    """c(x, t) = (1 + t)·w·x + a·t·||x||²/2, a fixed tiny time-conditioned critic whose input gradient is known in
    closed form: (1 + t)·w + a·t·x."""

    def __init__(self, w=(0.7, -1.3), a=0.4):
        super().__init__()
        self.sample_shape = (2,)
        self.w, self.a = nn.Parameter(torch.tensor(w)), nn.Parameter(torch.tensor(a))

    def forward(self, x, t):
        return (1 + t) * (x @ self.w) + 0.5 * self.a * t * x.square().sum(1)

    def input_grad(self, x, t):
        return (1 + t)[:, None] * self.w + self.a * t[:, None] * x


def _gpm_mode_report(samples: torch.Tensor) -> tuple[list[float], float]:
    """The share of samples within 3 std (1.5) of each mode, and the share near none."""
    d = torch.cdist(samples.double(), torch.tensor(GPM_MODE_CENTRES, dtype=torch.float64))
    near = d.min(1).values < 1.5
    return [((d.argmin(1) == k) & near).double().mean().item() for k in range(5)], 1 - near.double().mean().item()


# ------------------------------------------------------------------------------------------ Discriminator Flow
@pytest.mark.parametrize("loss", ["ipm", "vanilla", "hinge"])
def test_discriminator_flow_training_particles_by_hand(loss):
    """GPM Sec. 4.1: z_0 ~ N(p_mean, p_std²); z_{j+1} = z_j + (eta/K)·u(z_j, j/K) with u = ∇c (ipm, hinge) or
    sigmoid(-c)·∇c (vanilla, the non-saturating generator loss's descent); each sample keeps z_k for one k ~ U{0..K-1}
    at time k/K. Recomputed by hand with the closed-form gradient of a fixed critic."""
    critic, K, eta, p_mean, p_std = _GpmQuadCritic(), 5, 1.3, 0.4, 1.7
    flow = DiscriminatorFlow(critic, loss=loss, n_steps=K, eta=eta, p_mean=p_mean, p_std=p_std).requires_grad_(False)
    reals = torch.zeros(7, 2)
    torch.manual_seed(3)
    fakes, t = discriminator_flow.training_particles(flow, reals)

    torch.manual_seed(3)
    z = p_mean + p_std * torch.randn(7, 2)
    states = [z]
    with torch.no_grad():
        for j in range(K - 1):
            tj = torch.full((7,), j / K)
            grad = critic.input_grad(z, tj)
            u = torch.sigmoid(-critic(z, tj))[:, None] * grad if loss == "vanilla" else grad
            z = z + eta / K * u
            states.append(z)
    k = torch.randint(K, (7,))
    expected = torch.stack([states[int(kb)][b] for b, kb in enumerate(k)])
    assert len(set(k.tolist())) > 2  # the draw visits several times
    torch.testing.assert_close(t, k.float() / K)
    torch.testing.assert_close(fakes, expected, rtol=1e-5, atol=1e-6)
    assert not fakes.requires_grad


@pytest.mark.parametrize("loss", ["ipm", "vanilla", "hinge"])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_discriminator_flow_critic_loss_by_hand(loss, lam):
    """The critic's loss: GPM's GAN loss between reals and particles, both at the particles' times t, plus lambda x the
    mean (||∇_x c(x_hat, t)|| - center)² at x_hat = eps·x + (1 - eps)·z; the logged total loss and gap/(2·lambda·GP);
    and the critic's parameters get the gradient of exactly that sum (the penalty's through its second-order graph)."""
    critic = _GpmQuadCritic()
    model = DiscriminatorFlow(critic, loss=loss)
    reals = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [2.2, -1.1], [0.1, 0.9]])
    fakes = torch.tensor([[0.3, -0.2], [1.5, 1.5], [-2.0, 0.4], [0.8, -0.6]])
    t, center = torch.tensor([0.0, 0.25, 0.5, 0.75]), 0.5
    torch.manual_seed(11)
    total, stats = discriminator_flow.critic_loss(model, particle_loss(loss), reals, fakes, t, lam, center=center)
    got_grads = torch.autograd.grad(total, [critic.w, critic.a])

    torch.manual_seed(11)
    eps = torch.rand(4, 1)
    c_real, c_fake = critic(reals, t), critic(fakes, t)
    gan = {
        "ipm": c_fake.mean() - c_real.mean(),
        "vanilla": F.softplus(-c_real).mean() + F.softplus(c_fake).mean(),
        "hinge": F.relu(1 - c_real).mean() + F.relu(1 + c_fake).mean(),
    }[loss]
    x_hat = eps * reals + (1 - eps) * fakes
    gp = (critic.input_grad(x_hat, t).norm(dim=1) - center).square().mean()
    hand = gan + lam * gp
    torch.testing.assert_close(total, hand)
    torch.testing.assert_close(stats["loss/d"], gan.detach())
    torch.testing.assert_close(stats["loss/critic"], hand.detach())
    torch.testing.assert_close(stats["d/real"], c_real.mean().detach())
    torch.testing.assert_close(stats["d/fake"], c_fake.mean().detach())
    if lam > 0:
        torch.testing.assert_close(stats["penalty/gp"], gp.detach())
        gap = c_real.mean() - c_fake.mean()
        torch.testing.assert_close(stats["critic/gap_over_2gp"], (gap / (2 * lam * gp)).detach())
    else:
        assert "penalty/gp" not in stats and "critic/gap_over_2gp" not in stats
    for got, want in zip(got_grads, torch.autograd.grad(hand, [critic.w, critic.a]), strict=True):
        torch.testing.assert_close(got, want)


def test_discriminator_flow_eta_follows_k():
    """An unset --eta keeps GPM's step eta/K for the data (gaussians 20/56, MNIST 2/64, CelebA 2/25) whatever K is;
    a given --eta, on the command line or in a config file, is kept; eta <= 0 is refused."""
    resolve = discriminator_flow.resolve_config
    for dataset, k, eta in [("gaussians", 14, 5.0), ("rings", 56, 20.0), ("mnist", 16, 0.5), ("mnist", 64, 2.0),
                            ("fashion_mnist", 128, 4.0), ("celeba", 50, 4.0)]:  # fmt: skip
        cfg = resolve(discriminator_flow.Config(dataset=dataset, flow_steps=k))
        assert cfg.eta == pytest.approx(eta, rel=1e-12), (dataset, k)
    assert resolve(discriminator_flow.Config(dataset="mnist", flow_steps=16, eta=2.0)).eta == 2.0
    parsed = parse(discriminator_flow.Config, ["--dataset", "mnist", "--flow_steps", "16", "--eta", "3"],
                   resolve=resolve)  # fmt: skip
    assert parsed.eta == 3.0
    from_file = parse(discriminator_flow.Config, ["--config", str(REPO / "configs/gpm/discr_flow_mnist.yaml"),
                      "--flow_steps", "16"], resolve=resolve)  # fmt: skip
    assert (from_file.flow_steps, from_file.eta) == (16, 2.0)
    with pytest.raises(UserError, match="--eta"):
        resolve(discriminator_flow.Config(dataset="mnist", eta=-1.0))


def test_discriminator_flow_learns_the_five_gaussians(tmp_path):
    """A short run of the script with GPM's 2-D recipe (vanilla loss, eta/K = 20/56, batch 128) and a small critic:
    its flow carries N(0, I) noise to every mode of GPM's 5-Gaussian set with about the data's spread (seed 0:
    mode shares 0.13-0.20 at 400 steps)."""
    discriminator_flow.cli(["--dataset", "gaussians", "--log_dir", str(tmp_path), "--log_name", "g", *GPM_QUIET,
                            "--critic_kwargs", '{"width": 64, "depth": 3}', "--flow_steps", "10", "--lr", "1e-3",
                            "--n_steps", "300", "--log_interval", "100", "--checkpoint_interval", "300"])  # fmt: skip
    meta, state_dict = load_snapshot(tmp_path / "g")
    assert meta["model_kwargs"]["eta"] == pytest.approx(20 / 56 * 10)
    flow = build_from_snapshot(meta, state_dict, discriminator_flow.build_discr_flow)
    samples, _ = discr_flow_images(flow, list(range(2000)), None, "cpu")
    shares, off = _gpm_mode_report(samples)
    assert min(shares) > 0.08 and off < 0.35, (shares, off)
    var_noise, var_flow = flow.p_std**2, samples.var(0).mean().item()  # the flow starts from N(0, I)
    assert abs(var_flow - GPM_DATA_VAR) < 0.5 * abs(var_noise - GPM_DATA_VAR), (var_noise, var_flow)
    rows = read_stats(tmp_path / "g")
    assert all(r["loss/critic"] == r["loss/d"] for r in rows)  # no penalty in GPM's 2-D recipe


# ---------------------------------------------------------------------------------------------------- ScoreGAN
def _sg_tiny_denoiser(seed: int):
    torch.manual_seed(seed)
    return build_denoiser("edm", net="mlp", net_kwargs=dict(dim=2, width=8, depth=1, emb_channels=4))


def _sg_tiny_generator():
    torch.manual_seed(0)
    return build_score_gan_generator("mlp", dim=2, z_dim=3, width=8, depth=1)


def test_score_gan_score_step_by_hand():
    """D_gen's step (GPM `forward_score_noise`): mean over the batch of sum (D_gen(x + sigma·n; sigma) - x)² on
    x = G(z), no lambda(sigma) weight; D_gen gets that loss's gradient, the generator none."""
    gen, d_gen = _sg_tiny_generator(), _sg_tiny_denoiser(1)
    z, sigma = torch.randn(5, 3), torch.tensor([0.1, 0.5, 1.0, 3.0, 9.0])
    torch.manual_seed(7)
    loss = score_gan.score_step_loss(d_gen, gen, z, sigma)
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    got = [p.grad.clone() for p in d_gen.parameters()]

    torch.manual_seed(7)
    x = gen(z).detach()
    noisy = x + sigma[:, None] * torch.randn(5, 2)
    hand = (d_gen(noisy, sigma) - x).square().sum(1).mean()
    torch.testing.assert_close(loss, hand)
    for g, want in zip(got, torch.autograd.grad(hand, list(d_gen.parameters())), strict=True):
        torch.testing.assert_close(g, want)


def test_score_gan_generator_step_by_hand():
    """The generator's step (GPM `forward_generator`): gen_loss_scale x mean over the batch of sum x~·sg[Delta] at
    x~ = G(z) + sigma·n, Delta = w_gen·(D_gen(x~) - x~)/sigma - w_data·(D_data(x~) - x~)/sigma; only the generator
    gets gradients (neither score network, even with its parameters trainable): its samples receive the gradient
    scale/B·Delta, so a descent step moves them along sigma·(w_data ∇log p_data - w_gen ∇log p_gen)."""
    gen, d_data, d_gen = _sg_tiny_generator(), _sg_tiny_denoiser(1), _sg_tiny_denoiser(2)
    z, sigma = torch.randn(5, 3), torch.tensor([0.1, 0.5, 1.0, 3.0, 9.0])
    w_data, w_gen, scale = 1.5, 0.7, 2.0
    torch.manual_seed(7)
    loss = score_gan.generator_step_loss(gen, d_data, d_gen, z, sigma, w_data, w_gen, scale)
    loss.backward()
    assert all(p.grad is None for p in [*d_data.parameters(), *d_gen.parameters()])
    got = [p.grad.clone() for p in gen.parameters()]

    torch.manual_seed(7)
    x = gen(z)
    noisy = x + sigma[:, None] * torch.randn(5, 2)
    with torch.no_grad():
        s_data = (d_data(noisy, sigma) - noisy) / sigma[:, None]
        s_gen = (d_gen(noisy, sigma) - noisy) / sigma[:, None]
    delta = w_gen * s_gen - w_data * s_data
    hand = scale * (noisy * delta).sum(1).mean()
    torch.testing.assert_close(loss, hand)
    want = torch.autograd.grad(x, list(gen.parameters()), grad_outputs=scale / 5 * delta)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_score_gan_generator_steps_every_score_steps():
    """GPM's schedule: a generator step after every K_s score steps, the first after K_s of them."""
    assert [s for s in range(12) if score_gan.is_generator_step(s, 4)] == [3, 7, 11]
    assert [s for s in range(3) if score_gan.is_generator_step(s, 1)] == [0, 1, 2]


def test_score_gan_learns_the_five_gaussians(tmp_path):
    """A short run of the script on GPM's 5-Gaussian set against a small EDM data score trained first: the generator
    starts as a point-like cloud and ends spread over every mode with about the data's variance (seed 0: mode
    shares 0.05-0.18, variance 3.9 of 4.75). The data score is frozen in eval mode."""
    diffusion_train.cli(["--method", "edm", "--dataset", "gaussians", "--model", "mlp", "--net_kwargs",
                         '{"width": 64, "depth": 3}', "--lr", "1e-3", "--lr_rampup_kimg", "0", "--no-ema",
                         "--batch_size", "256", "--n_steps", "600", "--log_dir", str(tmp_path), "--log_name", "edm",
                         *GPM_QUIET, "--log_interval", "600", "--checkpoint_interval", "600"])  # fmt: skip
    data_score, _, _ = score_gan.load_data_score(str(tmp_path / "edm"))
    assert not data_score.training and not any(p.requires_grad for p in data_score.parameters())
    args = ["--data_score", str(tmp_path / "edm"), "--log_dir", str(tmp_path), "--log_name", "sg", *GPM_QUIET,
            "--gen_kwargs", '{"width": 64, "depth": 3}', "--z_dim", "16", "--batch_size", "128", "--score_steps", "2",
            "--lr", "5e-4", "--lr_score", "2e-3", "--log_interval", "500", "--checkpoint_interval", "1000"]  # fmt: skip
    score_gan.cli([*args, "--n_steps", "1000"])
    meta, state_dict = load_snapshot(tmp_path / "sg")
    torch.manual_seed(0)  # the run's initial generator: the script builds it right after seeding with --seed 0
    start = build_score_gan_generator("mlp", **meta["model_kwargs"])
    trained = build_from_snapshot(meta, state_dict, build_score_gan_generator)
    seeds = list(range(2000))
    var_start = gan_images(start, seeds, None, "cpu")[0].var(0).mean().item()
    samples, _ = gan_images(trained, seeds, None, "cpu")
    shares, off = _gpm_mode_report(samples)
    assert min(shares) > 0.02 and off < 0.5, (shares, off)
    var_end = samples.var(0).mean().item()
    assert var_start < 0.2 * GPM_DATA_VAR and abs(var_end - GPM_DATA_VAR) < 0.4 * GPM_DATA_VAR, (var_start, var_end)
    assert [("loss/g" in r) for r in read_stats(tmp_path / "sg")] == [True, True]


# ====================================================================================================================
# Each optimizer step of ebm_train.py (GEBM, Arbel, Zhou & Gretton 2021) pinned by a value computed by hand on a fixed
# tiny batch: the energy step's L_E + lambda * penalty for every penalty, the base step's KALE in Donsker-Varadhan
# form and its weights' effective sample size, which network receives gradient, GEBM's schedule of energy and base
# steps and its learning-rate decay. The latent chains' step sizes follow the decay inside a chain, and a chain
# settles on the closed-form posterior of a quadratic energy. A short 2-D run learns: KALE and the base's FD to the
# data fall.
# ====================================================================================================================
EBM_A = 0.3  # the log-partition A of the hand-computed steps
EBM_LAMBDA = 0.7
EBM_REALS = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.8]], dtype=torch.float64)
EBM_ZS = torch.tensor([[0.1, 0.4], [-1.2, 0.3], [0.7, -0.9], [2.0, 1.1]], dtype=torch.float64)  # noise_factor > 1


def _ebm_nets(seed: int = 0):
    """A tiny MLP base and energy (one hidden layer of 3, float64) with A = EBM_A, their output layers scaled up so
    that the fakes' energies differ (the base step's weights are then far from uniform)."""
    torch.manual_seed(seed)
    gen = ToyGenerator(z_dim=2, dim=2, width=3, depth=1).double()
    energy = Energy(ToyEnergy(dim=2, width=3, depth=1), floor=-10.0).double()
    with torch.no_grad():
        gen.net[-1].weight.mul_(8)
        energy.net.net[-1].weight.mul_(4)
        energy.log_partition.fill_(EBM_A)
    return gen, energy


def _ebm_layers(energy):
    first, _, last = energy.net.net  # Linear, SiLU, Linear
    return first.weight, first.bias, last.weight[0], last.bias[0]


def _ebm_energy_by_hand(energy, x):
    """D(x) = max(w2 . silu(W1 x + b1) + b2, -10), from the weights."""
    w1, b1, w2, b2 = _ebm_layers(energy)
    u = x @ w1.T + b1
    return torch.clamp((u * torch.sigmoid(u)) @ w2 + b2, min=-10.0)


def _ebm_input_gradient_by_hand(energy, x):
    """grad_x D(x) = W1^T (w2 * silu'(W1 x + b1)), silu'(u) = s (1 + u (1 - s)), s = sigmoid(u) (above the floor)."""
    w1, b1, w2, _ = _ebm_layers(energy)
    u = x @ w1.T + b1
    s = torch.sigmoid(u)
    return (s * (1 + u * (1 - s)) * w2) @ w1


@pytest.mark.parametrize("penalty_type", ["none", "l2", "gradient_l2", "gradient"])
def test_energy_step_loss_by_hand(penalty_type):
    gen, energy = _ebm_nets()
    cfg = ebm_train.Config(penalty_type=penalty_type, penalty_lambda=EBM_LAMBDA)
    torch.manual_seed(5)  # the gradient penalty's interpolation weights
    loss, stats = ebm_train.energy_step_loss(gen, energy, EBM_REALS, EBM_ZS, cfg)

    with torch.no_grad():
        fakes = gen(EBM_ZS)
        d_reals, d_fakes = _ebm_energy_by_hand(energy, EBM_REALS), _ebm_energy_by_hand(energy, fakes)
        kale_loss = (d_reals + EBM_A).mean() + torch.exp(-(d_fakes + EBM_A)).mean() - 1
        params = list(energy.net.parameters())  # A is not penalised
        l2 = sum(p.square().sum() for p in params)
        dims = sum(sum(p.shape) for p in params)  # GEBM's normaliser: 3x2 weight counts 5
        torch.manual_seed(5)
        alpha = torch.rand(3, 1, dtype=torch.float64)  # the first min(3, 4) reals and fakes
        x_hat = alpha * EBM_REALS + (1 - alpha) * fakes[:3]
        grad_penalty = _ebm_input_gradient_by_hand(energy, x_hat).square().sum(1).mean()
        penalty = {"none": 0.0, "l2": l2, "gradient_l2": l2 / dims + grad_penalty, "gradient": grad_penalty}
    assert d_fakes.min() > -10 and grad_penalty > 1e-3 and l2 > 1e-2  # every term is live
    assert loss.item() == pytest.approx((kale_loss + EBM_LAMBDA * penalty[penalty_type]).item(), rel=1e-10)
    assert stats["loss/energy"].item() == pytest.approx(kale_loss.item(), rel=1e-10)
    assert stats["penalty"].item() == pytest.approx(float(penalty[penalty_type]), rel=1e-10, abs=1e-12)
    assert (stats["d/real"].item(), stats["d/fake"].item()) == pytest.approx(
        (d_reals.mean().item(), d_fakes.mean().item())
    )

    # D and A receive the gradient, the base none; dL_E/dA = 1 - mean exp(-(D(G(z)) + A)).
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in energy.net.parameters())
    expected_a_grad = 1 - torch.exp(-(d_fakes + EBM_A)).mean()
    assert energy.log_partition.grad.item() == pytest.approx(expected_a_grad.item(), rel=1e-10)


def test_base_step_loss_ess_and_gradients_by_hand():
    gen, energy = _ebm_nets()
    loss, stats = ebm_train.base_step_loss(gen, energy, EBM_REALS, EBM_ZS)
    loss.backward()

    # L_G = -mean D(x) - log mean exp(-D(G(z))): the Donsker-Varadhan KALE, descended by the base.
    with torch.no_grad():
        d_reals, d_fakes = _ebm_energy_by_hand(energy, EBM_REALS), _ebm_energy_by_hand(energy, gen(EBM_ZS))
        kale = -d_reals.mean() - torch.log(torch.exp(-d_fakes).mean())
        weights = torch.exp(-d_fakes) / torch.exp(-d_fakes).sum()
    assert loss.item() == pytest.approx(kale.item(), rel=1e-10)
    assert stats["base/ess"].item() == pytest.approx((1 / weights.square().sum()).item(), rel=1e-6)
    assert 1.5 < stats["base/ess"].item() < len(EBM_ZS) - 0.5  # unequal weights: the check has teeth

    # The base's gradient is sum_i w_i grad D(G(z_i)); the energy and A get none and are left trainable.
    fakes = gen(EBM_ZS)
    expected = torch.autograd.grad((weights * _ebm_energy_by_hand(energy, fakes)).sum(), list(gen.parameters()))
    for p, g in zip(gen.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in energy.parameters())
    assert energy.training and all(p.requires_grad for p in energy.parameters())

    # The energy runs in eval mode: a spectrally normalised energy's power iteration does not advance.
    torch.manual_seed(2)
    sn_energy = Energy(apply_spectral_norm(ToyEnergy(dim=2, width=3, depth=1))).double()
    before = {k: v.clone() for k, v in sn_energy.state_dict().items()}
    ebm_train.base_step_loss(gen, sn_energy, EBM_REALS, EBM_ZS)
    assert all(torch.equal(before[k], v) for k, v in sn_energy.state_dict().items())
    assert sn_energy.training


def test_schedule_of_energy_and_base_steps_by_hand():
    """GEBM's rule with n_iter_d_init 3, n_iter_d 2: a base step when counter % (n + 1) == 0 and counter > 3, with
    n = 3 before the 2nd base step and right after every 500th, else n = 2."""
    cfg = ebm_train.Config(n_iter_d_init=3, n_iter_d=2)
    firsts, base_steps = [], 0
    for counter in range(1, 3010):
        if ebm_train.is_base_step(counter, base_steps, cfg):
            base_steps += 1
            firsts.append(counter)
    assert firsts[:6] == [4, 8, 9, 12, 15, 18]
    assert firsts[499:503] == [1500, 1504, 1506, 1509]  # 500th at 9 + 3 * 497; then a long phase to 1504
    assert firsts[999:1002] == [3000, 3004, 3006]  # the 1,000th
    assert [ebm_train.iterations_for(n, cfg) for n in (1, 3, 501)] == [4, 9, 1504]
    # No base step up to iteration n_iter_d_init, whatever the count (a run resumed with a larger --n_iter_d_init).
    late = ebm_train.Config(n_iter_d_init=6, n_iter_d=2)
    assert [c for c in range(1, 13) if ebm_train.is_base_step(c, 5, late)] == [9, 12]
    for mode, expected in (("energy", False), ("base", True)):
        mode_cfg = ebm_train.Config(n_iter_d_init=3, n_iter_d=2, train_mode=mode)
        assert all(ebm_train.is_base_step(c, 0, mode_cfg) == expected for c in range(1, 50))


def test_learning_rate_decay_by_hand(tmp_path):
    cfg = ebm_train.Config(use_scheduler=True, scheduler_gamma=0.5, scheduler_interval=3)
    assert [ebm_train.lr_factor(b, 1000, cfg) for b in (0, 2, 3, 5, 6, 7)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    energy_cfg = ebm_train.Config(use_scheduler=True, scheduler_gamma=0.5, scheduler_interval=3, train_mode="energy")
    assert [ebm_train.lr_factor(0, s, energy_cfg) for s in (2, 3, 6)] == [1, 0.5, 0.25]  # iterations done
    assert ebm_train.lr_factor(7, 7, ebm_train.Config(scheduler_gamma=0.5, scheduler_interval=3)) == 1  # off

    # The loop sets both optimizers' rates: base steps at iterations 4, 8, 9, so the 9th runs after 2 of them.
    ebm_train.cli(["--dataset", "gaussians", "--batch_size", "16", "--n_steps", "9", "--n_iter_d_init", "3",
                   "--n_iter_d", "2", "--use_scheduler", "--scheduler_gamma", "0.5", "--scheduler_interval", "1",
                   "--lr", "0.01", "--lr_generator", "0.02", "--log_interval", "9", "--sample_interval", "0",
                   "--log_dir", str(tmp_path), "--log_name", "lr", "--loggers", "none"])  # fmt: skip
    state = load_training_state(tmp_path / "lr" / "states" / "state-00000009")
    rates = [state[name]["param_groups"][0]["lr"] for name in ("optim_e", "optim_g")]
    assert rates == pytest.approx([0.01 * 0.25, 0.02 * 0.25])
    row = read_stats(tmp_path / "lr")[-1]
    assert row["lr_factor"] == 0.25 and row["base_steps"] == 3


class _EbmBatchNoise:
    """Gaussian noise for a batch of chains from one generator (ChainNoise's per-chain generators are slower)."""

    def __init__(self, n: int, seed: int):
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def randn(self, dim, device=None, dtype=torch.float32):
        return torch.randn(self.n, dim, generator=self.generator).to(device, dtype)


class _EbmFixedNoise:
    """The same xi at every step, so a chain can be followed by hand."""

    def __init__(self, xi: torch.Tensor):
        self.xi = xi

    def randn(self, dim, device=None, dtype=torch.float32):
        return self.xi.to(device, dtype)


@pytest.mark.parametrize("sampler", ["langevin", "zero_temperature_langevin"])
def test_latent_step_sizes_follow_the_decay_inside_a_chain(sampler):
    """U(z) = c |z|^2 / 2: step k is z <- (1 - gamma_k c / 2) z + sqrt(gamma_k) xi (no xi at zero temperature), with
    gamma_k = gamma * decay^floor((k - 1) / every), advanced in chunks that do not line up with the decay."""
    c, gamma, decay, every = 2.0, 0.3, 0.5, 3
    z0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    xi = torch.tensor([[0.2, -0.1], [-0.4, 0.3]], dtype=torch.float64)
    chains = LatentChains(lambda z: 0.5 * c * z.square().sum(1), z0, _EbmFixedNoise(xi), sampler, gamma,
                          gamma_decay=decay, decay_every=every)  # fmt: skip
    z = z0.clone()
    for chunk in (2, 4, 2):
        chains.advance(chunk)
        for k in range(chains.steps - chunk + 1, chains.steps + 1):
            gamma_k = gamma * decay ** ((k - 1) // every)
            z = (1 - gamma_k * c / 2) * z + (math.sqrt(gamma_k) * xi if sampler == "langevin" else 0)
        torch.testing.assert_close(chains.z, z, rtol=1e-12, atol=1e-12)
    assert chains.steps == 8


def test_latent_chains_settle_on_the_posterior_of_a_quadratic_energy():
    """Base G(z) = z, energy D(x) = a |x - m|^2 / 2, temperature T: U(z) = |z|^2 / 2 + T D(z) is Gaussian with
    precision P = 1 + T a and mean T a m / P; ULA's stationary law has that mean and variance gamma / (1 - (1 -
    gamma P / 2)^2) per coordinate."""
    a, temperature, gamma, m = 1.5, 2.0, 0.05, torch.tensor([1.0, -2.0])

    class Quadratic(nn.Module):
        def forward(self, x):
            return 0.5 * a * (x - m).square().sum(1)

    model = nn.Module()
    model.base, model.energy = nn.Identity(), Quadratic()
    noise = _EbmBatchNoise(4000, seed=0)
    chains = LatentChains(latent_potential(model, temperature), noise.randn(2), noise, "langevin", gamma)
    z = chains.advance(150)
    precision = 1 + temperature * a
    variance = gamma / (1 - (1 - gamma * precision / 2) ** 2)
    torch.testing.assert_close(z.mean(0), temperature * a * m / precision, rtol=0, atol=0.04)
    torch.testing.assert_close(z.var(0), torch.full((2,), variance), rtol=0.1, atol=0)


def test_a_short_2d_run_learns(tmp_path):
    """configs/gebm/gaussians.yaml for 500 iterations (52 base steps): the base's FD to the data falls below a tenth
    of the untrained base's (the eval at iteration 100 precedes every base step), KALE in its Donsker-Varadhan form
    (the base's loss) falls below a quarter of its value at the first base step, and base/ess is logged."""
    ebm_train.cli(["--config", "configs/gebm/gaussians.yaml", "--n_steps", "500", "--eval_interval", "100",
                   "--eval_samples", "1000", "--log_interval", "100", "--sample_interval", "0",
                   "--checkpoint_interval", "500", "--log_dir", str(tmp_path), "--log_name", "toy",
                   "--loggers", "none"])  # fmt: skip
    run_dir = tmp_path / "toy"
    fd = [json.loads((run_dir / "eval" / f"step-{s:08d}.json").read_text())["value"] for s in (100, 500)]
    rows = [r for r in read_stats(run_dir) if "loss/base" in r]
    assert fd[1] < 0.1 * fd[0], fd
    assert rows[-1]["loss/base"] < 0.25 * rows[0]["loss/base"], [r["loss/base"] for r in rows]
    assert all(1 <= r["base/ess"] <= 256 for r in rows) and rows[-1]["base_steps"] == 52


@pytest.mark.parametrize("config", ["fashion_mnist", "cifar10"])
def test_image_configs_have_a_spectrally_normalised_energy(config):
    """Every GEBM image energy is spectrally normalised; without it the base's weights collapse (README)."""
    path = f"configs/gebm/{config}.yaml"
    cfg = parse(ebm_train.Config, ["--config", path], resolve=ebm_train.resolve_config)
    model, _ = ebm_train.build_model(cfg, (1 if config == "fashion_mnist" else 3, 32, 32))
    convs = [m for m in model.energy.net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
