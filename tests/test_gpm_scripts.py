"""discriminator_flow.py and score_gan.py run the way users run them: in-process for speed, torchrun as a subprocess.
Training artefacts, GPM's settings, the 5-Gaussian end-to-end check of Discriminator Flow (T7: every mode found, about
a fifth each), bit-identical resume, 2-process DDP, per-seed sampling (trajectory animations included), fid.py on the
samples, and --only_test scoring a saved run exactly as its in-loop evaluation did."""

import json
import sys

import pytest
import torch
from PIL import Image

import diffusion_train
import discriminator_flow
import fid
import sample as sample_script
import score_gan
from losses import gradient_penalty
from losses.particle import score_gan_loss
from tests.conftest import REPO, assert_same_images, cli_error, read_stats, run_script
from tests.test_configs import load
from utils.ckpt import list_states, load_snapshot, load_training_state

QUIET = ["--loggers", "none", "--log_interval", "1", "--sample_interval", "0"]
TOY_CRITIC = '{"width": 16, "depth": 2, "emb_channels": 8}'
IMG_CRITIC = '{"base_dim": 4, "emb_channels": 8}'
TINY_UNET = '{"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "dropout": 0.0}'


@pytest.fixture(scope="module")
def data_scores(tmp_path_factory, mnist_dir) -> dict:
    """Tiny EDM data scores from diffusion_train.py: on the 2-D gaussians and on MNIST-format images at 32 px."""
    root = tmp_path_factory.mktemp("data_scores")
    common = ["--method", "edm", "--log_dir", str(root), *QUIET, "--n_steps", "2", "--batch_size", "4"]
    diffusion_train.cli([*common, "--dataset", "gaussians", "--model", "mlp", "--log_name", "toy",
                         "--net_kwargs", '{"width": 16, "depth": 2, "emb_channels": 8}'])  # fmt: skip
    diffusion_train.cli([*common, "--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--img_size",
                         "32", "--log_name", "img", "--net_kwargs", TINY_UNET])  # fmt: skip
    return {"toy": root / "toy", "img": root / "img"}


def states_equal(a: dict, b: dict) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def final_state(run_dir) -> dict:
    """The newest training state without its config (n_steps differs) and best (a run stopped at step 2 was
    evaluated there, its last step)."""
    state = load_training_state(list_states(run_dir / "states")[-1][1])
    return {k: v for k, v in state.items() if k not in ("config", "run")}


def sample(*argv) -> dict:
    sample_script.cli([str(a) for a in argv])
    out = argv[list(argv).index("--out_dir") + 1]
    return json.loads((out / "sample_info.json").read_text())


# ------------------------------------------------------------------------------------------ Discriminator Flow
def test_discriminator_flow_finds_the_five_gaussians(tmp_path):
    """T7 end to end: GPM's 2-D setting (vanilla loss, GPM's step eta/K = 20/56, MLP critic, batch 128) with a small
    critic, K = 10, 400 steps and lr 1e-3 to fit a CPU test; the flowed samples find all five modes, each near a fifth
    (seed 0: 0.13-0.20, with 14 % of points between modes). Also: GPM's settings fill unset flags, the run folder
    holds every artefact, and sample.py animates the flow."""
    discriminator_flow.cli(["--dataset", "gaussians", "--log_dir", str(tmp_path), "--log_name", "g", "--loggers",
                            "none", "--critic_kwargs", '{"width": 64, "depth": 3}', "--flow_steps", "10", "--lr",
                            "1e-3", "--n_steps", "400", "--log_interval", "200", "--sample_interval", "400",
                            "--checkpoint_interval", "400"])  # fmt: skip
    run_dir = tmp_path / "g"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["loss"], config["batch_size"], config["grad_penalty"]) == ("vanilla", 128, 0)
    assert config["eta"] == pytest.approx(20 / 56 * 10)  # GPM's step eta/K = 20/56 at K = 10
    rows = read_stats(run_dir)
    assert [r["step"] for r in rows] == [200, 400] and all("loss/d" in r and "d/real" in r for r in rows)
    assert sorted(p.name for p in (run_dir / "grids").iterdir()) == ["raw-00000400.png"]
    meta, _ = load_snapshot(run_dir)
    assert (meta["kind"], meta["model"], meta["model_kwargs"]["n_steps"]) == ("discr_flow", "mlp", 10)
    assert meta["model_kwargs"]["eta"] == config["eta"]
    out = tmp_path / "samples"
    info = sample("--checkpoint", run_dir, "--n_samples", 2000, "--batch_size", 500, "--trajectory", "webp",
                  "--out_dir", out)  # fmt: skip
    freqs = info["mode_frequencies"]
    assert info["nfe"] == 10 and all(0.1 < f < 0.3 for f in freqs) and info["off_mode"] < 0.25, info
    with Image.open(out / "trajectory.webp") as animation:
        assert animation.n_frames == 11  # the starting noise and the 10 steps


def test_discriminator_flow_images_resume_sampling_and_only_test(tmp_path, mnist_dir, monkeypatch):
    """A GP-penalised IPM flow on 32 px images: 2 + 2 resumed steps equal 4 straight ones bit for bit (critic, Adam,
    EMA, stats); the penalty is GPM's zero-centred one at the particles' times; samples depend on the seed only;
    --only_test scores the saved run as its in-loop evaluation did."""
    calls = []

    def spy(critic, reals, fakes, t, **kwargs):
        calls.append((kwargs["center"], t.clone(), reals.shape))
        return gradient_penalty(critic, reals, fakes, t, **kwargs)

    monkeypatch.setattr(discriminator_flow, "gradient_penalty", spy)
    args = ["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path),
            "--critic_kwargs", IMG_CRITIC, "--flow_steps", "3", "--batch_size", "4", "--ema", "--eval_interval",
            "4", "--eval_samples", "12", "--checkpoint_interval", "2", *QUIET]  # fmt: skip
    discriminator_flow.cli([*args, "--log_name", "straight", "--n_steps", "4"])
    assert len(calls) == 4 and all(center == 0.0 for center, _, _ in calls)
    times = torch.cat([t for _, t, _ in calls])
    assert set((times * 3).tolist()) == {0.0, 1.0, 2.0}  # t = k/K, k drawn per sample from 0..K-1
    discriminator_flow.cli([*args, "--log_name", "resumed", "--n_steps", "2"])
    discriminator_flow.cli([*args, "--log_name", "resumed", "--n_steps", "4", "--resume", "latest"])
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert states_equal(final_state(a), final_state(b))
    assert [r["loss/d"] for r in read_stats(a)] == [r["loss/d"] for r in read_stats(b)]
    assert all(r["penalty/gp"] > 0 for r in read_stats(a))
    config = json.loads((a / "config.json").read_text())
    assert (config["loss"], config["critic"], config["grad_penalty"]) == ("ipm", "dcgan", 0.04)
    assert config["eta"] == pytest.approx(2 / 64 * 3)  # GPM's MNIST step eta/K = 2/64 at K = 3

    info = sample("--checkpoint", a, "--n_samples", 6, "--batch_size", 4, "--trajectory", "gif", "--grid_size", 4,
                  "--out_dir", tmp_path / "s4")  # fmt: skip
    sample("--checkpoint", a, "--n_samples", 6, "--batch_size", 5, "--out_dir", tmp_path / "s5")
    assert info["nfe"] == 3 and assert_same_images(tmp_path / "s4", tmp_path / "s5") == 6
    assert (tmp_path / "s4" / "trajectory.gif").is_file()

    discriminator_flow.cli([*args, "--load", str(a), "--only_test", "--log_name", "test"])
    tested = json.loads(next((a / "test").glob("last-step-00000004-*.json")).read_text())
    in_loop = json.loads((a / "eval" / "step-00000004.json").read_text())
    assert tested["metric"] == "fd_cls" and tested["value"] == pytest.approx(in_loop["value"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------- ScoreGAN
def test_score_gan_resume_sampling_fid_and_only_test(tmp_path, data_scores, monkeypatch):
    """ScoreGAN on images from a data score: data and size come from the score; the generator loss gets the frozen
    data score and the trained D_gen; 2 + 2 resumed steps equal 4 straight ones bit for bit (generator, D_gen, both
    Adams, EMA); samples depend on the seed only; fid.py scores them; --only_test equals the in-loop evaluation."""
    calls = []

    def spy(fakes, data_denoiser, gen_denoiser, sigma, w_data, w_gen):
        calls.append((data_denoiser, gen_denoiser, sigma, w_data, w_gen))
        return score_gan_loss(fakes, data_denoiser, gen_denoiser, sigma, w_data, w_gen)

    monkeypatch.setattr(score_gan, "score_gan_loss", spy)
    args = ["--data_score", str(data_scores["img"]), "--no-download", "--log_dir", str(tmp_path), "--gen_kwargs",
            '{"base_dim": 4}', "--z_dim", "8", "--score_kwargs", TINY_UNET, "--batch_size", "4", "--score_steps",
            "2", "--ema", "--eval_interval", "4", "--eval_samples", "12", "--checkpoint_interval", "2",
            *QUIET]  # fmt: skip
    score_gan.cli([*args, "--log_name", "straight", "--n_steps", "4", "--w_data", "1.5"])
    assert len(calls) == 2 and all((w_d, w_g) == (1.5, 1.0) for *_, w_d, w_g in calls)
    for data_denoiser, gen_denoiser, sigma, _, _ in calls:
        assert not any(p.requires_grad for p in data_denoiser.parameters())  # the frozen data score
        assert all(p.requires_grad for p in gen_denoiser.parameters()) and gen_denoiser is not data_denoiser
        assert ((0.32 <= sigma) & (sigma <= 40)).all()
    score_gan.cli([*args, "--log_name", "resumed", "--n_steps", "2", "--w_data", "1.5"])
    score_gan.cli([*args, "--log_name", "resumed", "--n_steps", "4", "--resume", "latest", "--w_data", "1.5"])
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert states_equal(final_state(a), final_state(b))
    rows = read_stats(a)
    assert [("loss/g" in r) for r in rows] == [False, True, False, True]  # one G step every 2 score steps
    config = json.loads((a / "config.json").read_text())
    assert (config["dataset"], config["img_size"], config["model"], config["sigma_max"]) == ("mnist", 32, "dcgan", 40)
    meta, _ = load_snapshot(a)
    assert meta["kind"] == "score_gan" and meta["model_kwargs"]["base_dim"] == 4

    info = sample("--checkpoint", a, "--n_samples", 6, "--batch_size", 4, "--out_dir", tmp_path / "s4")
    sample("--checkpoint", a, "--n_samples", 6, "--batch_size", 5, "--out_dir", tmp_path / "s5")
    assert info["nfe"] == 1 and assert_same_images(tmp_path / "s4", tmp_path / "s5") == 6
    fid.cli(["--mode", "gen", "--img_folder", str(tmp_path / "s4"), "--detector", "pixels", "--dest",
             str(tmp_path / "gen")])  # fmt: skip
    assert (tmp_path / "gen.npz").is_file()

    score_gan.cli([*args, "--load", str(a), "--only_test", "--log_name", "test"])
    tested = json.loads(next((a / "test").glob("last-step-00000004-*.json")).read_text())
    in_loop = json.loads((a / "eval" / "step-00000004.json").read_text())
    assert tested["value"] == pytest.approx(in_loop["value"], rel=1e-9)


@pytest.mark.parametrize("script", ["discriminator_flow", "score_gan"])
def test_two_processes_keep_identical_weights(tmp_path, data_scores, script):
    """torchrun --nproc_per_node 2 on CPU (gloo): both scripts train on the 2-D data with every rank's weights equal
    at each checkpoint (the replica check of utils/run.py) and the particles' flow run outside DDP."""
    args = {
        "discriminator_flow": [
            "--dataset",
            "gaussians",
            "--critic_kwargs",
            TOY_CRITIC,
            "--flow_steps",
            "3",
            "--grad_penalty",
            "0.1",
        ],  # fmt: skip
        "score_gan": [
            "--data_score",
            str(data_scores["toy"]),
            "--gen_kwargs",
            '{"width": 16, "depth": 2}',
            "--score_steps",
            "2",
        ],  # fmt: skip
    }[script]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script(f"{script}.py", *args, "--batch_size", "8", "--n_steps", "4", "--checkpoint_interval", "2",
                        "--workdir", tmp_path / "ddp", *QUIET, launcher=launcher)  # fmt: skip
    assert result.stdout.count("parameters identical on 2 process(es)") == 2, result.stdout[-2000:]
    assert [r["kimg"] for r in read_stats(tmp_path / "ddp")][-1] == pytest.approx(4 * 16 / 1000)


def test_gpm_configs_hold_the_papers_values():
    """configs/gpm/: GPM's published settings, and the same values as the scripts' defaults for the data."""
    flow = {name: load(REPO / f"configs/gpm/discr_flow_{name}.yaml") for name in ("gaussians", "mnist", "celeba")}
    assert (flow["gaussians"].loss, flow["gaussians"].flow_steps, flow["gaussians"].eta) == ("vanilla", 56, 20.0)
    assert (flow["mnist"].loss, flow["mnist"].flow_steps, flow["mnist"].grad_penalty) == ("ipm", 64, 0.04)
    assert (flow["celeba"].critic, flow["celeba"].flow_steps, flow["celeba"].grad_penalty) == ("resnet", 25, 0.05)
    assert load(REPO / "configs/gpm/discr_flow_mnist2.yaml").flow_steps == 128
    for name, cfg in flow.items():
        assert cfg.grad_penalty_center == 0 and (cfg.lr, cfg.beta1) == (2e-4, 0.5)
        defaults = discriminator_flow.resolve_config(discriminator_flow.Config(dataset=cfg.dataset))
        assert all(getattr(defaults, k) == getattr(cfg, k) for k in discriminator_flow.GPM_SETTINGS[name]), name
    sg = {name: load(REPO / f"configs/gpm/score_gan_{name}.yaml") for name in ("gaussians", "mnist", "celeba")}
    assert (sg["gaussians"].score_steps, sg["mnist"].score_steps, sg["celeba"].score_steps) == (10, 1, 4)
    assert (sg["mnist"].sigma_min, sg["mnist"].sigma_max, sg["mnist"].rho, sg["mnist"].lr_score) == (0.32, 40, 3, 1e-3)
    assert load(REPO / "configs/gpm/score_gan_mnist2.yaml").w_data == 2
    assert all(cfg.gen_loss_scale == 1 for cfg in sg.values())
    edm = load(REPO / "configs/gpm/edm_mnist.yaml")
    assert (edm.method, edm.model, edm.net_kwargs, edm.lr, edm.ema, edm.lr_rampup_kimg) == (
        "edm", "ddpmpp-small", {"dropout": 0.13}, 2e-4, False, 0,
    )  # fmt: skip


def test_bad_flags_are_refused_before_anything_is_written(tmp_path, data_scores, capsys):
    line = cli_error(discriminator_flow.cli, ["--dataset", "gaussians", "--critic", "dcgan"], capsys)
    assert "does not fit --dataset gaussians" in line
    line = cli_error(score_gan.cli, ["--data_score", str(data_scores["toy"]), "--model", "dcgan"], capsys)
    assert "does not fit --dataset gaussians" in line
    line = cli_error(score_gan.cli, ["--data_score", str(data_scores["img"]), "--sigma_min", "50"], capsys)
    assert "--sigma_min < --sigma_max" in line
    assert not list(tmp_path.iterdir())
