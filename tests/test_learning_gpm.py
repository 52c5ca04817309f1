"""GPM's particle models, each training step pinned: the losses that discriminator_flow.py and score_gan.py assemble
(their own step functions, the ones their loops call) equal values computed here by hand from GPM's formulas
(Franceschi et al. 2023, arXiv 2305.16150; White-Link/gpm) on fixed tiny batches, with the gradients each network
receives; the flow's step follows K; and short seeded runs of both scripts on GPM's 2-D 5-Gaussian set learn."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffusion_train
import discriminator_flow
import score_gan
from losses.particle import particle_loss
from modelling import build_denoiser, build_score_gan_generator
from modelling.discr_flow import DiscriminatorFlow
from sampling import gan_images
from sampling.particles import discr_flow_images
from tests.conftest import REPO, read_stats
from utils.ckpt import build_from_snapshot, load_snapshot
from utils.cli import UserError, parse

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
