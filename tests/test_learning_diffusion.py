"""Each optimizer step of diffusion_train.py (EDM, Föllmer) and distill_characteristic.py, as the scripts assemble
it, against the formulas written out by hand on a fixed tiny batch (reference §1.3, §2.3-2.6); what the loops do
around it (learning rate, EMA, clipping, gradient accumulation, which batch and seed), read back from the training
states of 1- and 2-step runs; and short runs on GPM's 2-D Gaussian mixture that learn: the denoiser's loss falls
and its samples spread to the data's covariance, the distilled one-step generator approaches its teacher's ODE
map."""

import math

import pytest
import torch

import diffusion_train
import distill_characteristic
from losses import get_diffusion_loss
from losses.characteristic import sample_jumps
from modelling import build_denoiser
from sampling.diffusion import StackedNoise, sample, time_grid
from utils.ckpt import load_snapshot, load_training_state
from utils.cli import parse
from utils.data import build_dataset, make_loader, step_seed, toy_moments, toy_points
from utils.ema import EMA

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
    none. The clip threshold: EDM unclipped, Föllmer 1 (seed 004), --grad_clip wins, 0 = none."""
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
    torch.manual_seed(0)
    net_kwargs = DIFFUSION_NET | {"n_classes": 3}
    teacher = build_denoiser(method, net="mlp", net_kwargs=net_kwargs).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(std=0.3)
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
    jump at the data end u = 0, two go to s = 0), 2 accumulation rounds, against the formulas of reference §2.5-2.6
    written out row by row:
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
    """Seed 004's warm-up counts optimizer steps from 1: lr·min((step + 1)/lr_rampup_steps, 1); 0 = none."""
    cfg = distill_characteristic.Config(lr=1e-3, lr_rampup_steps=4)
    rates = [distill_characteristic.learning_rate(cfg, step) for step in (0, 1, 3, 10)]
    assert rates == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3], abs=1e-12)
    assert distill_characteristic.learning_rate(distill_characteristic.Config(lr=1e-3, lr_rampup_steps=0), 0) == 1e-3


def test_distillation_loop_sets_the_lr_clips_and_averages(diffusion_follmer_run, tmp_path):
    """What the loop does around the step loss, read back from the training states after steps 1 and 2 (8 points a
    step, the Föllmer toy teacher): the optimizer's lr is learning_rate's (1e-2·1/4, then 1e-2·2/4); the target
    network is the EMA with seed 004's warm-up beta_k = min(decay, (1 + k)/(10 + k)) at update k (with --ema_decay
    0.15: the warm-up's 0.1, then the decay 0.15 < 2/11), target_k = beta_k·target_(k-1) + (1 - beta_k)·student_k,
    from the student that the teacher initialised; the update moves the weights. A second run with --grad_clip 1e-12
    barely moves them (an Adam-family first step is ~lr·g/(|g| + 1e-8))."""
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
