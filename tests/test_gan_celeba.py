"""Script-level tests: gan_celeba.py run the way users run it, on tiny synthetic image folders (real PNG/JPEG/WebP
files, a CelebA-layout folder of 178x218 JPEGs, corrupt files), then sample.py on its snapshots."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_one_line_error, read_stats, run_script
from tests.test_gan_mnist import _same_tree
from utils.ckpt import load_training_state

NV = '{"channel_base": 64, "channel_max": 8}'
STYLE = '{"channel_base": 64, "channel_max": 8, "w_dim": 8, "n_mlp": 2}'
TINY = {  # (gen_kwargs, disc_kwargs) per model: seconds per step on a CPU
    "dcgan": ('{"base_dim": 4}', '{"base_dim": 4}'),
    "progressive_gan": (NV, NV),
    "stylegan": (STYLE, NV),
    "stylegan2": (STYLE, NV),
    "sagan": ('{"base_dim": 8}', '{"base_dim": 8}'),
}


def _write_images(folder: Path, n: int, size: tuple[int, int], seed: int, fmt: str = "png") -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.{fmt}")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Two classes in subfolders, mixed formats and non-square sizes (centre-cropped), one grayscale file."""
    root = tmp_path_factory.mktemp("images")
    _write_images(root / "cats", 12, (20, 24), 0, "png")
    _write_images(root / "dogs" / "deeper", 10, (24, 20), 1, "jpg")  # recursive
    _write_images(root / "dogs", 4, (16, 16), 2, "webp")
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(root / "cats" / "gray.png")  # converted to RGB
    return root


def train(data_dir, log_dir, model, *args, **kw):
    gen_kwargs, disc_kwargs = TINY[model]
    return run_script(
        "gan_celeba.py",
        *("--dataset", "folder", "--data_dir", data_dir, "--img_size", "16", "--log_dir", log_dir),
        *("--model", model, "--gen_kwargs", gen_kwargs, "--disc_kwargs", disc_kwargs, "--z_dim", "8"),
        *("--batch_size", "4", "--num_workers", "0", "--loggers", "none"),
        *map(str, args),
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(TINY))
def test_every_model_trains_and_samples(tmp_path, image_dir, model):
    conditional = ["--conditional"] if model in ("dcgan", "sagan") else []
    growth = ["--fade_kimg", "0.004"] if model == "progressive_gan" else []  # 1 step per phase: it grows
    lazy = ["--r1_interval", "2", "--pl_interval", "2"] if model == "stylegan2" else []
    intervals = ["--log_interval", "2", "--sample_interval", "4", "--checkpoint_interval", "4"]
    train(image_dir, tmp_path, model, "--log_name", "run", "--n_steps", "4", "--ema", *intervals, *conditional, *growth,
          *lazy)  # fmt: skip
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "config.json").read_text())
    expected_method = {"progressive_gan": "wgan-gp", "sagan": "hinge"}.get(model, "gan")
    assert config["method"] == expected_method and config["lr"] > 0  # model defaults resolved and recorded
    rows = read_stats(run_dir)
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss/d"]) for r in rows)
    penalties = {"progressive_gan": "penalty/gp", "stylegan": "penalty/r1", "stylegan2": "penalty/pl"}
    if model in penalties:
        assert penalties[model] in rows[-1]
    if model == "progressive_gan":
        assert rows[-1]["growth"] == 1.0  # 1 step per phase: step 2 ends level 1's fade-in, step 3 is stable
    rows_in_grid = 2 if conditional else 10  # one row per class, or 10 x 10
    assert Image.open(run_dir / "grids" / "ema-00000004.png").size == (10 * 18 + 2, rows_in_grid * 18 + 2)

    style = model in ("stylegan", "stylegan2")
    truncation = ["--truncation", "0.7"] if style else []
    run_script("sample.py", "--checkpoint", run_dir, "--n_samples", "4", "--out_dir", tmp_path / "a", *truncation)
    images = [np.asarray(Image.open(tmp_path / "a" / f"{s:06d}.png")).astype(int) for s in range(4)]
    assert all(im.shape == (16, 16, 3) for im in images)
    info = json.loads((tmp_path / "a" / "sample_info.json").read_text())
    assert info["model"] == model and info["n_classes"] == (2 if conditional else 0)
    if style:  # fixed noise maps in eval mode: a seed's image does not depend on the batch it was drawn in
        assert info["sampler"] == {"truncation": 0.7, "truncation_cutoff": None}
        run_script("sample.py", "--checkpoint", run_dir, "--n_samples", "4", "--batch_size", "1",
                   "--out_dir", tmp_path / "b", *truncation)  # fmt: skip
        for s, image in enumerate(images):
            assert np.abs(np.asarray(Image.open(tmp_path / "b" / f"{s:06d}.png")).astype(int) - image).max() <= 1
    if model == "dcgan":
        bad = run_script("sample.py", "--checkpoint", run_dir, "--truncation", "0.5", ok=False)
        assert_one_line_error(bad, "--truncation/--truncation_cutoff need a style generator")


@pytest.mark.slow
def test_corrupt_images_are_skipped_with_a_count(tmp_path):
    folder = tmp_path / "imgs"
    _write_images(folder, 4, (16, 16), 0)
    (folder / "bad1.png").write_bytes(b"not a png at all")
    (folder / "bad2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    result = train(folder, tmp_path, "dcgan", "--n_steps", "3", "--batch_size", "6", "--log_interval", "3")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and "bad1.png" in result.stderr and "bad2.jpg" in result.stderr
    assert warnings[-1].endswith("(2 unreadable so far)") and "Traceback" not in result.stderr
    assert read_stats(tmp_path / "folder_dcgan_gan")[-1]["step"] == 3

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"junk")
    result = train(only_bad, tmp_path / "b", "dcgan", "--n_steps", "1", ok=False)
    assert_one_line_error(result, "none of the first 1 images")


RESUME_CASES = {  # (arguments, the step at which the first run stops and the second one resumes)
    # fade_kimg 0.012 = 3 steps of 4 images per phase: steps 0-3 at 4x4, 4-5 fade 8x8 in (alpha 1/3, 2/3), 6-7
    # stable at 8x8. The split at step 5 lands mid-fade-in, between the optimizer resets of steps 4 and 6.
    "progressive_gan": (["--fade_kimg", "0.012", "--n_steps", "8"], 5),
    # Lazy R1 every 2 D steps and path length every 2 G steps: the split at step 3 is between regularised steps.
    "stylegan2": (["--r1_interval", "2", "--pl_interval", "2", "--n_steps", "5"], 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(RESUME_CASES))
def test_resume_is_bit_exact_mid_growth_and_mid_regularisation(tmp_path, image_dir, model):
    case_args, split_step = RESUME_CASES[model]
    args = case_args + ["--ema", "--checkpoint_interval", split_step, "--log_interval", "1", "--sample_interval", 100]
    n_steps = int(args[args.index("--n_steps") + 1])
    train(image_dir, tmp_path, model, "--log_name", "straight", *args)
    # A second run stopped at the split (one state), then a new process resumes it.
    train(image_dir, tmp_path, model, "--log_name", "split", *args, "--n_steps", split_step)
    result = train(image_dir, tmp_path, model, "--log_name", "split", *args, "--resume", "latest")
    assert "resuming from" in result.stdout and f"(step {split_step})" in result.stdout
    straight = load_training_state(tmp_path / "straight" / "states" / f"state-{n_steps:08d}")
    split = load_training_state(tmp_path / "split" / "states" / f"state-{n_steps:08d}")
    for key in ("gen", "disc", "optim_g", "optim_d", "ema", "pl_mean", "skipped", "step"):
        assert _same_tree(straight[key], split[key], key) == []
    losses = [[r["loss/d"] for r in read_stats(tmp_path / name)] for name in ("straight", "split")]
    assert losses[0] == losses[1]
    if model == "progressive_gan":
        growth = [r["growth"] for r in read_stats(tmp_path / "split")]
        assert growth == pytest.approx([0.0, 0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0])
        assert float(split["gen"]["growth"]) == 1.0
        # Adam restarted when level 1 began fading in (step 4) and when it became stable (step 6): two steps since,
        # for every parameter in use (NVIDIA's reset_opt_for_new_lod).
        for optim in ("optim_g", "optim_d"):
            assert {float(s["step"]) for s in split[optim]["state"].values()} == {2.0}, optim
    else:
        assert float(split["pl_mean"]) > 0  # the path-length running mean was updated and carried over


@pytest.mark.slow
def test_regularisers_due_every_step_join_the_main_step(tmp_path, image_dir):
    """--r1_interval 1 / --pl_interval 1: R1 and path length are part of the D and G steps (StyleGAN2-ADA's "both"
    phases): one Adam step per network per iteration at the full lr, not a second step for the regulariser. With
    a negligible path-length weight the networks then follow a run without path length (every step reseeds the
    RNG, so the penalty's extra draws change nothing else)."""
    args = ["--r1_interval", "1", "--pl_interval", "1", "--n_steps", "3", "--log_interval", "3"]
    train(image_dir, tmp_path, "stylegan2", "--log_name", "pl", *args, "--pl_weight", "1e-30")
    train(image_dir, tmp_path, "stylegan2", "--log_name", "no_pl", *args, "--pl_weight", "0")
    pl, no_pl = (load_training_state(tmp_path / name / "states" / "state-00000003") for name in ("pl", "no_pl"))
    for optim in ("optim_g", "optim_d"):
        assert {float(s["step"]) for s in pl[optim]["state"].values()} == {3.0}, optim
        assert pl[optim]["param_groups"][0]["lr"] == 2e-3  # no lazy-regularisation scaling
    for net in ("gen", "disc"):
        for key, value in pl[net].items():
            if key != "mapping.w_avg":  # the penalty's own latents move the truncation centre
                assert torch.allclose(value, no_pl[net][key], rtol=1e-5, atol=1e-7), key
    row = read_stats(tmp_path / "pl")[-1]
    assert row["penalty/pl"] > 0 and row["penalty/r1"] > 0 and float(pl["pl_mean"]) > 0


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory) -> Path:
    """CelebA in torchvision's layout: <root>/celeba/img_align_celeba/*.jpg, 178 x 218 like the real files."""
    root = tmp_path_factory.mktemp("celeba_root")
    _write_images(root / "celeba" / "img_align_celeba", 8, (178, 218), 3, "jpg")
    return root


@pytest.mark.slow
def test_gau_nernst_gan_commands_run_as_written(tmp_path, celeba_root):
    """gau-nernst/gan's three gan_celeba.py lines verbatim, plus --data_dir and a short --n_steps (argparse: last
    wins)."""
    commands = [
        "--model dcgan --method gan --img_size 64 --log_name celeba_dcgan --batch_size 128 --n_steps 100000 --lr 2e-4 "
        "--beta1 0.5 --beta2 0.999 --ema",
        "--model dcgan --method wgan --img_size 64 --log_name celeba_dcgan_wgan --batch_size 64 --n_steps 100000 "
        "--optimizer RMSprop --lr 5e-5 --train_g_interval 5",
        "--model progressive_gan --loggers tensorboard --img_size 256 --z_dim 512 --batch_size 16 --method wgan-gp "
        "--log_name celeba_progressive_gan --n_steps 650000 --optimizer Adam --beta1 0 --beta2 0.99 --lr 1e-3 --ema "
        "--drift_penalty 0.001 --checkpoint_interval 50000",
    ]
    for command in commands:
        extra = ["--data_dir", celeba_root, "--log_dir", tmp_path, "--n_steps", "1", "--num_workers", "0"]
        run_script("gan_celeba.py", *command.split(), *extra)
        name = command.split("--log_name ")[1].split()[0]
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert (
            config["dataset"] == "celeba"
            and (tmp_path / name / "snapshots" / "snapshot-00000001.safetensors").is_file()
        )
    # ProGAN at 256 starts at 4x4: level 0 of 6, and the tensorboard file exists.
    assert read_stats(tmp_path / "celeba_progressive_gan")[-1]["growth"] == 0.0
    assert list((tmp_path / "celeba_progressive_gan" / "tb").rglob("events.out.tfevents.*"))


DDP_CASES = {  # every --model; tiny nets, 2 steps of 2 x 4 images
    "dcgan": ("dcgan", []),
    "sagan": ("sagan", []),
    # A growing network leaves its future levels unused: DDP runs with find_unused_parameters. 6 images per phase
    # at 8 images per step: step 1 fades level 1 in.
    "progressive_gan-growing": ("progressive_gan", ["--fade_kimg", "0.006"]),
    # Without growing only the full-resolution toRGB/fromRGB exist, so every parameter gets a gradient.
    "progressive_gan-fixed": ("progressive_gan", ["--no-progressive_growing"]),
    "stylegan": ("stylegan", []),  # R1 every step, in the D loss
    # Lazy R1 and path length run through the eager DDP module (gradients averaged), under bf16 autocast.
    "stylegan2": ("stylegan2", ["--r1_interval", "2", "--pl_interval", "2", "--mixed_precision", "bf16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DDP_CASES))
def test_two_processes_with_torchrun(tmp_path, image_dir, case):
    """DDP over gloo; the checkpoint checks that the replicas hold identical weights and stops the run if not."""
    model, extra = DDP_CASES[case]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--log_name", "ddp", "--n_steps", "2", "--checkpoint_interval", "2", "--log_interval", "2"]
    result = train(image_dir, tmp_path, model, *args, *extra, launcher=launcher)
    assert "parameters identical on 2 process(es)" in result.stdout
    rows = read_stats(tmp_path / "ddp")
    assert rows[-1]["kimg"] == pytest.approx(2 * 8 / 1000) and np.isfinite(rows[-1]["loss/g"])
    if case == "progressive_gan-growing":
        assert rows[-1]["growth"] == pytest.approx(1 / 6)  # mean over the logged steps 0 (0.0) and 1 (1/3)
    if case == "progressive_gan-fixed":  # the snapshot records growing=False, and sample.py rebuilds it that way
        run_script("sample.py", "--checkpoint", tmp_path / "ddp", "--n_samples", "2", "--out_dir", tmp_path / "s")
        assert json.loads((tmp_path / "s" / "sample_info.json").read_text())["n_images"] == 2


@pytest.mark.parametrize("script", ["gan_mnist", "gan_celeba"])
def test_sn_disc_drops_batchnorm_unless_a_norm_is_asked_for(script):
    """SN-GAN's critic is spectrally normalised with no BatchNorm (the recipe in the README of gau-nernst/gan);
    an explicit --disc_kwargs norm still wins. Both GAN scripts build the DCGAN critic this way."""
    import importlib

    module = importlib.import_module(script)

    def disc_layers(**kwargs):
        cfg = module.Config(model="dcgan", img_size=16, **kwargs)
        if script == "gan_celeba":
            _, _, disc = module.build_models(module.resolve_config(cfg), img_channels=3, n_classes=0)
        else:
            _, _, disc = module.build_models(cfg, n_classes=0)
        convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules())
        return n_bn, all(hasattr(c, "parametrizations") for c in convs)

    assert disc_layers() == (1, False)
    assert disc_layers(sn_disc=True) == (0, True)
    assert disc_layers(sn_disc=True, disc_kwargs={"norm": "batch"}) == (1, True)


def test_bad_flags_are_refused(tmp_path):
    """Flag combinations that cannot work are refused before anything is written (in-process: the same UserError
    the script prints as one line, which the subprocess case at the end checks)."""
    from gan_celeba import Config, build_models, resolve_config
    from utils.cli import UserError

    cases = [
        (dict(model="stylegan2", conditional=True), "--conditional is supported by dcgan, sagan, acgan, biggan"),
        (dict(model="dcgan", pl_weight=2.0), "--pl_weight needs a generator with a mapping network"),
        (dict(model="dcgan", method="wgan-gp", disc_kwargs={"norm": "batch"}), "without BatchNorm"),
        (dict(model="stylegan2", r1_interval=0), "--r1_interval must be >= 1"),
        (dict(model="sagan", beta2=1.0), "--beta2 must be in [0, 1)"),
        (dict(model="progressive_gan", disc_kwargs={"growing": False}), "is set by --progressive_growing"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(UserError, match=re.escape(fragment)):
            resolve_config(Config(**kwargs))
    with pytest.raises(UserError, match="power-of-two img_size"):
        build_models(resolve_config(Config(model="stylegan", img_size=12)), 3, 0)
    # Unset flags take the model's defaults; --lr alone sets both networks' rates (no TTUR then).
    sagan = resolve_config(Config(model="sagan"))
    assert (sagan.method, sagan.lr, sagan.lr_d, sagan.beta1, sagan.beta2) == ("hinge", 1e-4, 4e-4, 0.0, 0.9)
    assert resolve_config(Config(model="sagan", lr=2e-4)).lr_d == 2e-4
    sg2 = resolve_config(Config(model="stylegan2"))
    assert (sg2.r1_gamma, sg2.r1_interval, sg2.pl_weight, sg2.lr) == (10.0, 16, 2.0, 2e-3)

    missing = run_script("gan_celeba.py", "--data_dir", tmp_path / "nothing", "--log_dir", tmp_path, ok=False)
    assert_one_line_error(missing, "celeba not found", "img_align_celeba")
    assert not list(tmp_path.glob("*/states/state-*"))  # nothing was written by the refused run
