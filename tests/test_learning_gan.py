"""The GAN scripts' training steps, pinned: each optimizer step's loss as assembled by `gan_mnist.py`'s and
`gan_celeba.py`'s own step functions equals the formula computed here by hand on a fixed tiny batch (terms, signs,
weights, interval factors, which network receives the gradient); the per-model recipes are the same in both scripts;
a short run of the scripts' step functions on 2-D data learns."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gan_celeba
import gan_mnist
from losses import AuxClassifierLoss, get_gan_loss
from modelling.recipes import GAN_RECIPES
from tests.conftest import TINY, cli_error, read_stats
from utils.ckpt import load_training_state

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
