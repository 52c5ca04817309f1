"""diffusion_train.py and sample.py on diffusion snapshots, run the way users run them (subprocesses on tiny IDX
data), plus toy-data training whose samples are checked against the target's exact moments."""

import json
import math
import sys

import pytest
import torch
from safetensors import safe_open

import diffusion_train
import sample as sample_script
from losses import get_diffusion_loss
from modelling import build_denoiser
from sampling.diffusion import StackedNoise, sample
from tests.conftest import assert_one_line_error, assert_same_images, read_stats, run_script
from tests.gaussians import EDMMixture
from utils.ckpt import load_snapshot, load_training_state
from utils.cli import UserError, parse
from utils.data import build_dataset, toy_moments, toy_points

# A U-Net small enough for a step in well under a second on one CPU thread.
TINY = ["--batch_size", "8", "--img_size", "28", "--net_kwargs", '{"model_channels": 8, "channel_mult": [1, 2]}']


def train(mnist_dir, log_dir, *args, **kw):
    return run_script(
        "diffusion_train.py", "--dataset", "mnist", "--data_dir", mnist_dir, "--no-download", "--log_dir", log_dir,
        *TINY, *args, **kw,
    )  # fmt: skip


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory, mnist_dir):
    log_dir = tmp_path_factory.mktemp("diffusion")
    result = train(
        mnist_dir, log_dir, "--method", "edm", "--conditional", "--log_name", "edm", "--n_steps", "4",
        "--log_interval", "2", "--sample_interval", "4", "--checkpoint_interval", "2",
    )  # fmt: skip
    return log_dir / "edm", result


@pytest.mark.slow
def test_run_folder_holds_every_artefact(edm_run):
    run_dir, result = edm_run
    assert "parameters identical on 1 process(es)" in result.stdout
    rows = read_stats(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["loss/denoise"] > 0 and r["sec_per_kimg"] > 0 and "lr" in r for r in rows)
    assert rows[0]["lr"] < rows[1]["lr"] <= 1e-3  # the warm-up ramps with images seen
    assert sorted(p.name for p in (run_dir / "grids").iterdir()) == ["ema-00000004.png", "raw-00000004.png"]
    assert len(list((run_dir / "snapshots").iterdir())) == 2
    assert list((run_dir / "tb").rglob("events.out.tfevents*"))
    meta, _ = load_snapshot(run_dir)
    assert meta["kind"] == "diffusion" and meta["model"] == "edm" and meta["step"] == 4
    assert meta["model_kwargs"]["net_kwargs"]["n_classes"] == 10
    assert json.loads((run_dir / "config.json").read_text())["method"] == "edm"


def test_every_solver_from_one_cli(tmp_path, edm_run):
    """Each solver runs from the snapshot alone and records its NFE; images depend on the seed only (batch size
    and churn noise included)."""
    run_dir, _ = edm_run
    nfe = {}
    for solver in ("euler", "heun", "deis", "ancestral"):
        out = tmp_path / solver
        argv = ["--checkpoint", str(run_dir), "--n_samples", "6", "--num_steps", "4", "--ode_solver", solver]
        sample_script.main(parse(sample_script.Config, argv + ["--out_dir", str(out)]))
        info = json.loads((out / "sample_info.json").read_text())
        nfe[solver] = info["nfe"]
        assert info["sampler"]["solver"] == solver and info["sampler"]["rho"] == 7.0
        assert len(list(out.glob("0*.png"))) == 6 and (out / "grid.png").exists()
    assert nfe == {"euler": 4, "heun": 7, "deis": 4, "ancestral": 4}
    churn = ["--checkpoint", str(run_dir), "--n_samples", "6", "--num_steps", "5", "--churn", "--gamma", "0.3"]
    for batch in ("6", "4"):
        sample_script.main(
            parse(sample_script.Config, churn + ["--batch_size", batch, "--out_dir", str(tmp_path / batch)])
        )
    assert assert_same_images(tmp_path / "6", tmp_path / "4") == 6


def test_edm_stochastic_settings_typed_as_published(tmp_path, edm_run):
    """EDM's sampler flags as its README writes them (ImageNet-64: --S_churn 40 --S_min 0.05 --S_max 50
    --S_noise 1.003 with 256 steps). gamma = min(S_churn/N, sqrt(2) - 1) with N = --num_steps, EDM's num_steps
    (grid points, the final step to 0 included: EDM Algorithm 2 churns at every i < N). --S_min/--S_max/--S_noise
    are --s_min/--s_max/--s_noise (EDM's sigma is genzoo's t for EDM snapshots)."""
    den = EDMMixture([[0.0]], [0.5])

    def settings(*argv):
        return sample_script.solver_settings(den, parse(sample_script.Config, list(argv)))

    published = settings(
        "--num_steps", "256", "--S_churn", "40", "--S_min", "0.05", "--S_max", "50", "--S_noise", "1.003"
    )
    assert published["churn"] and published["gamma"] == 40 / 256
    assert (published["s_min"], published["s_max"], published["s_noise"]) == (0.05, 50.0, 1.003)
    assert settings("--num_steps", "18", "--S_churn", "30")["gamma"] == math.sqrt(2) - 1  # CIFAR-10 VP: capped
    assert settings("--num_steps", "100", "--S_churn", "30")["gamma"] == 0.3
    assert not settings("--S_churn", "0")["churn"] and not settings()["churn"]  # EDM's deterministic default
    assert settings("--churn")["gamma"] == 0.1  # CharacteristicGenerator's default gamma
    with pytest.raises(UserError, match="--gamma .* or --S_churn"):
        settings("--S_churn", "40", "--gamma", "0.2")
    # End to end: --S_churn 2 over 8 grid points is --churn --gamma 0.25, and churn changes the images.
    run_dir, _ = edm_run
    pngs = {}
    for name, flags in (("S_churn", ["--S_churn", "2"]), ("gamma", ["--churn", "--gamma", "0.25"]), ("none", [])):
        argv = ["--checkpoint", str(run_dir), "--n_samples", "3", "--num_steps", "8", "--out_dir", str(tmp_path / name)]
        sample_script.main(parse(sample_script.Config, argv + flags))
        pngs[name] = [p.read_bytes() for p in sorted((tmp_path / name).glob("0*.png"))]
    assert pngs["S_churn"] == pngs["gamma"] != pngs["none"]


@pytest.mark.slow
def test_sampler_flags_of_the_other_method_are_refused(tmp_path, edm_run):
    run_dir, _ = edm_run
    result = run_script("sample.py", "--checkpoint", run_dir, "--eval_eps0", "1e-3", "--out_dir", tmp_path, ok=False)
    assert_one_line_error(result, "--eval_eps0 does not apply to a EDM snapshot")
    with pytest.raises(UserError, match="--num_steps must be >= 1"):
        sample_script.main(parse(sample_script.Config, ["--checkpoint", str(run_dir), "--num_steps", "0"]))


@pytest.mark.slow
def test_follmer_resume_is_bit_exact_and_stores_the_class_means(tmp_path, mnist_dir):
    """6 steps straight == 3 steps, a new process resuming, 3 more (weights, optimizer, EMA, logged losses)."""
    args = ["--method", "follmer", "--conditional", "--checkpoint_interval", "3", "--log_interval", "3"]
    args += ["--sample_interval", "0"]
    train(mnist_dir, tmp_path, "--log_name", "straight", "--n_steps", "6", *args)
    train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "3", *args)
    result = train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "6", "--resume", "latest", *args)
    assert "changed: ['n_steps']" in result.stdout
    straight = load_training_state(tmp_path / "straight" / "states" / "state-00000006")
    split = load_training_state(tmp_path / "split" / "states" / "state-00000006")
    for key in ("denoiser", "optimizer", "ema", "skipped", "step"):
        assert _same_tree(straight[key], split[key]), key
    losses = [[r["loss/denoise"] for r in read_stats(tmp_path / name)] for name in ("straight", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    # Föllmer's first sampling step needs E[x0 | class]: the snapshot carries the per-class training means.
    dataset = build_dataset("mnist", str(mnist_dir), 28, download=False)
    with safe_open(str(next((tmp_path / "split" / "snapshots").iterdir())), framework="pt") as f:
        means = f.get_tensor("data_mean")
    reals, labels = dataset[list(range(len(dataset)))]
    for k in (0, 3):
        assert torch.allclose(means[k], reals[labels == k].mean(0), atol=1e-5)


def test_fixed_ema_decay_with_warm_up(tmp_path):
    """`--ema_decay 0.999` is CharacteristicGenerator's EMA, beta = min(0.999, (1 + k)/(10 + k)) at update k = 0, 1,
    ...: the second update (k = 1) averages with beta = 2/11 (the default half-life EMA, 500 kimg with ramp-up 0.05,
    would use 0.5^(256/25.6) ~ 0.001 at 512 images seen; k off by one, 3/12). lr 1e-2 moves every weight by ~1e-2
    per Adam step, far above the tolerance. Buffers are copied."""
    argv = [
        "--method", "follmer", "--dataset", "gaussians", "--model", "mlp", "--net_kwargs", '{"width": 16, "depth": 1}',
        "--batch_size", "256", "--n_steps", "2", "--lr", "1e-2", "--lr_rampup_kimg", "0", "--checkpoint_interval", "1",
        "--sample_interval", "0", "--log_dir", str(tmp_path), "--log_name", "ema", "--loggers", "none",
        "--ema_decay", "0.999",
    ]  # fmt: skip
    diffusion_train.main(parse(diffusion_train.Config, argv))
    first, second = (load_training_state(tmp_path / "ema" / "states" / f"state-0000000{k}") for k in (1, 2))
    assert second["config"]["ema_decay"] == 0.999
    beta = 2 / 11
    for name, ema in second["ema"].items():
        expected = (
            second["denoiser"][name]
            if name == "data_mean"
            else torch.lerp(first["ema"][name], second["denoiser"][name], 1 - beta)
        )
        torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(UserError, match="--ema_decay"):
        diffusion_train.main(parse(diffusion_train.Config, argv[:-1] + ["1.5", "--log_name", "bad"]))


def test_two_processes_with_torchrun(tmp_path, mnist_dir):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = train(
        mnist_dir, tmp_path, "--log_name", "ddp", "--n_steps", "2", "--checkpoint_interval", "2",
        "--log_interval", "1", "--sample_interval", "0", "--mixed_precision", "bf16", launcher=launcher,
    )  # fmt: skip
    assert "2 process(es) on cpu" in result.stdout
    assert result.stdout.count("parameters identical on 2 process(es)") == 1
    rows = read_stats(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["kimg"] == pytest.approx(2 * 2 * 8 / 1000)


def test_bad_input_gives_one_clear_line(tmp_path, mnist_dir):
    result = train(mnist_dir, tmp_path, "--n_steps", "1", "--model", "mlp", ok=False)
    assert_one_line_error(result, "--model mlp does not fit --dataset mnist")
    for args, message in [
        (["--sigma_data", "-1"], "--sigma_data must be > 0"),
        (["--net_kwargs", '{"channels": 3}'], "cannot build --model ddpmpp-small"),
        (["--dataset", "gaussians"], "--model ddpmpp-small does not fit --dataset gaussians"),
        (["--net_kwargs", '{"n_classes": 3}'], "--net_kwargs may not set \\['n_classes'\\]"),
        (["--method", "follmer", "--loss_kwargs", '{"P_mean": -1}'], "do not fit --method follmer"),
        (["--beta2", "1.5"], "--beta1 and --beta2 must be in"),
        (["--no-ema", "--ema_decay", "0.999"], "--ema_decay sets the EMA's decay: it needs --ema"),
    ]:
        argv = ["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path)]
        with pytest.raises(UserError, match=message):
            diffusion_train.main(parse(diffusion_train.Config, argv + TINY + args))
    assert not list(tmp_path.rglob("states"))  # refused before anything was written


@pytest.mark.parametrize("method,solver", [("edm", "heun"), ("follmer", "heun")])
def test_toy_training_approaches_the_target(tmp_path, method, solver):
    """A small MLP trained 600 steps x 256 points on GPM's 5-Gaussian mixture (std 0.5, radius 3; mean 0,
    covariance 4.75·I). Bounds, justified by measured runs (mean |err| <= 0.04, covariance entries within 0.35,
    modes 0.185-0.21): the mean within 0.25 (5 SE of 2000 samples), each covariance entry within 0.9 (~20 %),
    every mode 12-28 % (an untrained net puts almost everything in one blob). The trained denoiser's loss on fixed
    noise is below the freshly initialised one's."""
    argv = [
        "--method", method, "--dataset", "gaussians", "--model", "mlp", "--net_kwargs", '{"width": 128, "depth": 3}',
        "--sigma_data", "2.2", "--batch_size", "256", "--n_steps", "600", "--lr_rampup_kimg", "5",
        "--log_interval", "100", "--sample_interval", "600", "--checkpoint_interval", "600",
        "--log_dir", str(tmp_path), "--log_name", "toy", "--loggers", "none",
    ]  # fmt: skip
    diffusion_train.main(parse(diffusion_train.Config, argv))
    assert (tmp_path / "toy" / "grids" / "ema-00000600.png").exists()  # the scatter plot
    meta, state_dict = load_snapshot(tmp_path / "toy")
    trained = build_denoiser(meta["model"], **meta["model_kwargs"])
    trained.load_state_dict(state_dict)
    x, _ = sample(trained.eval(), StackedNoise(range(2000)), solver=solver, num_steps=40, device="cpu")
    mean, cov = toy_moments("gaussians")
    assert (x.mean(0) - mean).abs().max() < 0.25
    assert (torch.cov(x.T) - cov).abs().max() < 0.9
    centres = torch.tensor([[3.0, 0.0], [0.927, -2.853], [-2.427, -1.763], [-2.427, 1.763], [0.927, 2.853]])
    share = torch.bincount(torch.cdist(x.float(), centres).argmin(1), minlength=5) / len(x)
    assert share.min() > 0.12 and share.max() < 0.28, share

    torch.manual_seed(0)  # the script's initialisation (seed 0), for the before/after loss comparison
    untrained = build_denoiser(meta["model"], **meta["model_kwargs"]).eval()
    points, loss_fn = toy_points("gaussians", train=False)[0], get_diffusion_loss(method)

    @torch.no_grad()
    def fixed_noise_loss(denoiser) -> float:
        torch.manual_seed(1)  # the same noise levels and noise for both networks
        return float(loss_fn(denoiser, points).mean())

    before, after = fixed_noise_loss(untrained), fixed_noise_loss(trained)
    assert after < before, (before, after)
