"""ebm_train.py, sample.py and ebm_chain.py on GEBM snapshots, run the way users run them (subprocesses and in-process
CLIs on tiny IDX data): GEBM's schedule, the run folder, bit-exact resume, each --train_mode, 2-process DDP, every
latent sampler, --only_test with FD and KALE, the chain evaluation, the seed's config and bad input."""

import json
import sys

import pytest
import torch

import ebm_chain
import ebm_train
import sample as sample_script
from tests.conftest import assert_same_images, cli_error, read_stats, run_script
from tests.test_gan_mnist import _same_tree
from utils.ckpt import load_snapshot, load_training_state
from utils.cli import UserError, parse

# A tiny DCGAN pair and a short schedule: base steps at iterations 3, 6, 8, 10, 12, ...
TINY = ["--batch_size", "8", "--gen_kwargs", '{"base_dim": 8}', "--disc_kwargs", '{"base_dim": 8}', "--z_dim", "16",
        "--n_iter_d_init", "2", "--n_iter_d", "1", "--loggers", "none", "--lr", "1e-3",
        "--lr_generator", "1e-3"]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def train(mnist_dir, log_dir, *args, **kw):
    return run_script(
        "ebm_train.py", "--dataset", "mnist", "--data_dir", mnist_dir, "--no-download", "--log_dir", log_dir, *TINY,
        *map(str, args), **kw,
    )  # fmt: skip


def test_schedule_is_gebms():
    """GEBM's which_step: 100 energy steps, base steps at 101 and 202 (the first two follow long phases), then one
    every 6 iterations, and a long energy phase again after every 500th base step; 150,000 base steps are the
    909,162 iterations of the default --n_steps."""
    cfg = ebm_train.Config()
    base_steps, firsts, counter = 0, [], 0
    while base_steps < 502:
        counter += 1
        if ebm_train.is_base_step(counter, base_steps, cfg):
            base_steps += 1
            firsts.append(counter)
    assert firsts[:6] == [101, 202, 204, 210, 216, 222]
    assert firsts[500] - firsts[499] > 6 and firsts[499] - firsts[498] == 6  # the long phase after the 500th
    assert ebm_train.iterations_for(150_000, cfg) == cfg.n_steps == 909_162
    for mode, expected in (("energy", False), ("base", True)):
        cfg = ebm_train.Config(train_mode=mode)
        assert all(ebm_train.is_base_step(c, 0, cfg) == expected for c in range(1, 300))


def test_seed_config_is_gebms_training_yaml():
    """configs/gebm/cifar10.yaml holds GEBM's training.yaml, and the command line wins over it."""
    cfg = parse(ebm_train.Config, ["--config", "configs/gebm/cifar10.yaml", "--lr", "3e-4"])
    assert (cfg.g_model, cfg.d_model, cfg.z_dim, cfg.batch_size, cfg.lr_generator) == (
        "resnet-sn",
        "resnet-sn",
        100,
        128,
        1e-4,
    )
    assert (cfg.beta1, cfg.beta2, cfg.penalty_type, cfg.penalty_lambda) == (0.5, 0.999, "gradient", 1.0)
    assert cfg.initialize_log_partition and cfg.use_scheduler and cfg.scheduler_gamma == 0.8
    assert cfg.n_steps == ebm_train.iterations_for(150_000, cfg) and cfg.lr == 3e-4


@pytest.fixture(scope="module")
def gebm_run(tmp_path_factory, mnist_dir):
    log_dir = tmp_path_factory.mktemp("gebm")
    result = train(
        mnist_dir, log_dir, "--log_name", "run", "--n_steps", "12", "--log_interval", "4", "--sample_interval", "6",
        "--checkpoint_interval", "6", "--eval_interval", "6", "--eval_samples", "24", "--eval_kale",
        "--kale_interval", "6", "--initialize_log_partition", "--ema", "--penalty_type", "gradient_l2",
    )  # fmt: skip
    return log_dir / "run", result


@pytest.mark.slow
def test_run_folder_holds_every_artefact(gebm_run):
    run_dir, result = gebm_run
    assert "initial log-partition A = " in result.stdout and "parameters identical on 1 process(es)" in result.stdout
    rows = read_stats(run_dir)
    assert [r["step"] for r in rows] == [4, 6, 8, 12]  # every 4 steps, and at each --kale_interval
    assert [r["base_steps"] for r in rows] == [1, 2, 3, 5]
    assert all(
        k in rows[1] for k in ("loss/energy", "loss/base", "penalty", "d/real", "d/fake", "kale/train", "kale/test")
    )
    assert sorted(p.name for p in (run_dir / "grids").iterdir()) == [
        f"{t}-{s:08d}.png" for t in ("ema", "raw") for s in (6, 12)
    ]
    meta, weights = load_snapshot(run_dir)
    assert meta["kind"] == "gebm" and meta["model"] == "gebm" and meta["step"] == 12
    assert meta["model_kwargs"]["g_model"] == "dcgan" and meta["model_kwargs"]["energy_floor"] == -10.0
    assert {k.split(".")[0] for k in weights} == {"base", "energy"} and "energy.log_partition" in weights
    state = load_training_state(run_dir / "states" / "state-00000012")
    assert state["base_steps"] == 5 and state["ema"]["energy.log_partition"].shape == ()
    assert rows[-1]["log_partition"] == pytest.approx(state["energy"]["log_partition"].item(), rel=1e-6)
    evals = json.loads((run_dir / "eval" / "step-00000012.json").read_text())
    assert evals["metric"] == "fd_cls" and (run_dir / "best.json").is_file()


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, mnist_dir):
    """10 iterations straight == 5, a new process resuming, 5 more (resuming between an energy and a base step):
    every tensor, A, the optimizers, the EMA, base_steps and the logged losses."""
    args = ["--checkpoint_interval", "5", "--log_interval", "5", "--sample_interval", "0", "--ema",
            "--initialize_log_partition", "--penalty_type", "gradient_l2"]  # fmt: skip
    train(mnist_dir, tmp_path, "--log_name", "straight", "--n_steps", "10", *args)
    train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "5", *args)
    result = train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "10", "--resume", "latest", *args)
    assert "resuming from" in result.stdout and "initial log-partition" not in result.stdout
    straight = load_training_state(tmp_path / "straight" / "states" / "state-00000010")
    split = load_training_state(tmp_path / "split" / "states" / "state-00000010")
    for key in ("gen", "energy", "optim_g", "optim_e", "ema", "base_steps", "skipped", "step"):
        assert _same_tree(straight[key], split[key], key) == []
    rows_a, rows_b = read_stats(tmp_path / "straight"), read_stats(tmp_path / "split")
    assert [r["loss/energy"] for r in rows_a] == [r["loss/energy"] for r in rows_b]
    assert [r["loss/base"] for r in rows_a] == [r["loss/base"] for r in rows_b]


def test_energy_and_base_train_modes(tmp_path, mnist_dir, gebm_run):
    """--train_mode energy keeps the base it was given (--g_path) and never takes a base step; --train_mode base
    keeps the energy and A (--d_path) and takes only base steps."""
    run_dir, _ = gebm_run
    _, trained = load_snapshot(run_dir)
    for mode, path_flag, frozen in (("energy", "--g_path", "base."), ("base", "--d_path", "energy.")):
        ebm_train.cli(["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path),
                       *TINY, "--log_name", mode, "--n_steps", "4", "--train_mode", mode, path_flag, str(run_dir),
                       "--log_interval", "4", "--sample_interval", "0"])  # fmt: skip
        state = load_training_state(tmp_path / mode / "states" / "state-00000004")
        net = state["gen" if mode == "energy" else "energy"]
        for key, value in net.items():
            if value.is_floating_point() and "running" not in key:  # BatchNorm statistics follow the batches
                assert torch.equal(value, trained[frozen + key]), key
        assert state["base_steps"] == (0 if mode == "energy" else 4)
        moved = state["energy" if mode == "energy" else "gen"]
        assert any(
            not torch.equal(v, trained[("energy." if mode == "energy" else "base.") + k]) for k, v in moved.items()
        )


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path, mnist_dir):
    """DDP over gloo, in bf16: both ranks take the same energy/base schedule, A's gradient is averaged like any
    other, and the parameters (A included) are bit-identical on both ranks at every checkpoint (checked by the
    script); the losses stay finite."""
    result = train(mnist_dir, tmp_path, "--log_name", "ddp", "--n_steps", "6", "--checkpoint_interval", "3",
                   "--log_interval", "3", "--initialize_log_partition", "--ema", "--mixed_precision", "bf16",
                   launcher=TORCHRUN)  # fmt: skip
    assert "2 process(es) on cpu, mixed precision bf16" in result.stdout
    assert result.stdout.count("parameters identical on 2 process(es)") == 2
    rows = read_stats(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [3, 6] and rows[-1]["kimg"] == pytest.approx(6 * 2 * 8 / 1000)
    assert rows[-1]["skipped"] == 0 and all(abs(rows[-1][k]) < 1e3 for k in ("loss/energy", "loss/base", "penalty"))


def sample(run_dir, out, *args):
    argv = ["--checkpoint", str(run_dir), "--out_dir", str(out), "--lmc_gamma", "1e-3", *map(str, args)]
    sample_script.main(parse(sample_script.Config, argv))
    return json.loads((out / "sample_info.json").read_text())


@pytest.mark.parametrize("sampler", ["langevin", "mala", "lmc", "hmc", "zero_temperature_langevin", "mh"])
def test_every_latent_sampler_from_sample_py(tmp_path, gebm_run, sampler):
    """Every sampler runs from the snapshot alone; Metropolis samplers report acceptance per step-size phase;
    images depend on their seed, not on the batch; the chains move away from the base samples."""
    run_dir, _ = gebm_run
    flags = [
        "--n_samples",
        "6",
        "--latent_sampler",
        sampler,
        "--num_sampler_steps",
        "6",
        "--lmc_gamma_decay_every",
        "4",
    ]
    info = sample(run_dir, tmp_path / "a", *flags, "--batch_size", "6")
    assert info["sampler"]["latent_sampler"] == sampler and info["sampler"]["temperature"] == 100.0
    assert len(list((tmp_path / "a").glob("0*.png"))) == 6
    if sampler in ("mala", "hmc", "mh"):
        phases = info["acceptance"]["by_phase"]
        assert [p["steps"] for p in phases] == [[1, 4], [5, 6]] and phases[1]["gamma"] == pytest.approx(1e-4)
        assert 0 <= info["acceptance"]["overall"] <= 1
    else:
        assert "acceptance" not in info
    sample(run_dir, tmp_path / "b", *flags, "--batch_size", "4")
    assert assert_same_images(tmp_path / "a", tmp_path / "b") == 6
    sample(run_dir, tmp_path / "base", "--n_samples", "6", "--num_sampler_steps", "0")
    different = [(tmp_path / "a" / p.name).read_bytes() != p.read_bytes() for p in (tmp_path / "base").glob("0*.png")]
    assert sum(different) >= 1 if sampler == "mh" else all(different)


def test_chain_animation_and_refused_flags(tmp_path, gebm_run):
    run_dir, _ = gebm_run
    sample(run_dir, tmp_path / "gif", "--n_samples", "4", "--num_sampler_steps", "4", "--animation_every", "2")
    from PIL import Image

    with Image.open(tmp_path / "gif" / "chain.gif") as gif:
        assert gif.n_frames == 3  # steps 0, 2, 4
    with pytest.raises(UserError, match="--temperature applies to GEBM snapshots"):
        from sampling.latent_mcmc import latent_sampler_settings

        latent_sampler_settings(parse(sample_script.Config, ["--temperature", "1"]), applies=False)
    with pytest.raises(UserError, match="lmc_gamma > 0"):
        sample(run_dir, tmp_path / "bad", "--lmc_gamma", "0")


def test_only_test_equals_the_in_loop_evaluation_and_scores_kale(tmp_path, gebm_run, mnist_dir):
    """--only_test scores the newest snapshot's base samples exactly as the in-loop evaluation did; with
    --eval_metric kale it scores KALE (and keeps no best checkpoint)."""
    run_dir, _ = gebm_run
    common = ["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--workdir", str(run_dir),
              "--eval_samples", "24", "--only_test"]  # fmt: skip
    ebm_train.cli(common)
    test = json.loads((run_dir / "test" / "last-step-00000012-fd_cls.json").read_text())
    in_loop = json.loads((run_dir / "eval" / "step-00000012.json").read_text())
    assert test["value"] == pytest.approx(in_loop["value"], abs=1e-6)
    ebm_train.cli(common + ["--eval_metric", "kale"])
    kale = json.loads((run_dir / "test" / "last-step-00000012-kale.json").read_text())
    rows = read_stats(run_dir)
    assert kale["value"] == pytest.approx(rows[-1]["kale/train"], abs=1e-6)  # --eval_kale logged the same number
    assert kale["kale_test"] == pytest.approx(rows[-1]["kale/test"], abs=1e-6)


def test_kale_as_the_eval_metric_keeps_no_best(tmp_path, mnist_dir):
    ebm_train.cli(["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path),
                   *TINY, "--log_name", "k", "--n_steps", "4", "--eval_interval", "2", "--eval_metric", "kale",
                   "--eval_samples", "16", "--checkpoint_interval", "4", "--sample_interval", "0"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "k" / "eval").glob("step-*")) == [
        "step-00000002.json",
        "step-00000004.json",
    ]
    assert not (tmp_path / "k" / "best.json").exists()


def test_fd_and_kale_along_the_chain(tmp_path, gebm_run):
    """ebm_chain.py: rows at steps 0, K, 2K, ..., the end; step 0 is the base generator, so its FD equals the
    in-loop evaluation on the same seeds; chain.json, chain.png, chain.gif."""
    run_dir, _ = gebm_run
    out = tmp_path / "chain"
    ebm_chain.cli(["--checkpoint", str(run_dir), "--n_samples", "24", "--batch_size", "10", "--latent_sampler", "mala",
                   "--num_sampler_steps", "5", "--eval_every", "2", "--lmc_gamma", "1e-3",
                   "--out_dir", str(out)])  # fmt: skip
    info = json.loads((out / "chain.json").read_text())
    assert [r["step"] for r in info["rows"]] == [0, 2, 4, 5] and info["metric"] == "fd_cls"
    in_loop = json.loads((run_dir / "eval" / "step-00000012.json").read_text())
    assert info["rows"][0]["fd_cls"] == pytest.approx(in_loop["value"], abs=1e-6)
    assert all("kale" in r for r in info["rows"]) and all(0 <= r["acceptance"] <= 1 for r in info["rows"][1:])
    assert (out / "chain.png").is_file() and (out / "chain.gif").is_file()


def test_toy_data_trains_mlp_networks(tmp_path):
    """--dataset gaussians alone picks the 2-D networks (mlp base and energy, a 2-D latent)."""
    ebm_train.cli(["--dataset", "gaussians", "--batch_size", "64", "--n_steps", "6", "--n_iter_d_init", "2",
                   "--n_iter_d", "1", "--log_dir", str(tmp_path), "--log_name", "toy", "--loggers", "none",
                   "--sample_interval", "6", "--eval_interval", "6", "--eval_samples", "64"])  # fmt: skip
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert (config["g_model"], config["d_model"], config["z_dim"]) == ("mlp", "mlp", 2)
    assert json.loads((tmp_path / "toy" / "eval" / "step-00000006.json").read_text())["metric"] == "fd_points"
    info = sample(
        tmp_path / "toy", tmp_path / "pts", "--n_samples", "8", "--latent_sampler", "lmc", "--num_sampler_steps", "3"
    )
    assert info["n_images"] == 8 and (tmp_path / "pts" / "points.npy").is_file()


BAD_INPUTS = {
    "toy-data-with-dcgan": (["--dataset", "gaussians", "--g_model", "dcgan"], "do not fit --dataset gaussians"),
    "mlp-on-images": (["--g_model", "mlp", "--d_model", "mlp"], "do not fit --dataset mnist"),
    "kwargs-set-the-size": (["--gen_kwargs", '{"img_size": 64}'], "may not set ['img_size']"),
    "unknown-penalty": (["--penalty_type", "gradient2"], "invalid choice"),
    "zero-lr": (["--lr", "0"], "--lr and --lr_generator must be > 0"),
    "bad-scheduler": (["--scheduler_gamma", "1.5"], "--scheduler_gamma must be in (0, 1]"),
    "bad-size": (["--g_model", "sngan", "--d_model", "sngan", "--img_size", "30"], "img_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(tmp_path, mnist_dir, case, capsys):
    args, fragment = BAD_INPUTS[case]
    argv = ["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path),
            "--loggers", "none", "--n_steps", "1", *args]  # fmt: skip
    assert fragment in cli_error(ebm_train.cli, argv, capsys)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_pretrained_snapshots_load_strictly(tmp_path, gebm_run, mnist_dir, capsys):
    """--g_path takes a GEBM's base or a GAN generator of the same architecture; an energy of another width, a GAN
    snapshot as --d_path and a GAN snapshot in ebm_chain.py are refused with one line."""
    from modelling import build_generator
    from utils.ckpt import save_snapshot

    run_dir, _ = gebm_run
    kwargs = dict(img_size=32, img_channels=1, z_dim=16, base_dim=8)
    gan = tmp_path / "gan.safetensors"
    save_snapshot(gan, "gan", "dcgan", kwargs, build_generator("dcgan", **kwargs).state_dict(), {}, 0)
    argv = ["--dataset", "mnist", "--data_dir", str(mnist_dir), "--no-download", "--log_dir", str(tmp_path),
            "--loggers", "none", "--n_steps", "1", *TINY]  # fmt: skip
    cfg = parse(ebm_train.Config, argv + ["--g_path", str(gan)], resolve=ebm_train.resolve_config)
    model, _ = ebm_train.build_model(cfg, (1, 32, 32))
    ebm_train.load_pretrained(cfg, model)
    assert torch.equal(model.base.net[0].weight, load_snapshot(gan)[1]["net.0.weight"])
    wide = argv + ["--d_path", str(run_dir), "--disc_kwargs", '{"base_dim": 16}']
    assert "its energy does not fit this --d_model" in cli_error(ebm_train.cli, wide, capsys)
    assert "has no energy to load" in cli_error(ebm_train.cli, argv + ["--d_path", str(gan)], capsys)
    assert "needs a GEBM" in cli_error(ebm_chain.cli, ["--checkpoint", str(gan)], capsys)
