"""distill_characteristic.py run the way users run it (subprocesses on tiny IDX data, tiny teachers trained by
diffusion_train.py), then sample.py and compare.py on the student's snapshot."""

import json
import sys

import pytest

import compare
import distill_characteristic
import sample as sample_script
from tests.conftest import assert_one_line_error, read_stats, run_script
from tests.test_diffusion_train import _same_tree, train
from utils.ckpt import load_snapshot, load_training_state, save_snapshot, sha256_of
from utils.cli import UserError, parse

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def distill(teacher, workdir, *args, **kw):
    return run_script(
        "distill_characteristic.py", "--teacher", teacher, "--workdir", workdir, "--bsz", "4", "--no-download",
        "--num_steps", "6", "--log_interval", "2", "--sample_interval", "0", *args, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, mnist_dir):
    """A conditional Föllmer teacher after 2 steps (its quality does not matter here, its format does)."""
    log_dir = tmp_path_factory.mktemp("teacher")
    train(
        mnist_dir, log_dir, "--method", "follmer", "--conditional", "--log_name", "follmer", "--n_steps", "2",
        "--log_interval", "2", "--sample_interval", "0", "--checkpoint_interval", "2", "--loggers", "none",
    )  # fmt: skip
    return load_snapshot(log_dir / "follmer")[0]["path"]


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher):
    """4 straight steps, and the same run stopped at 2 and resumed to 4."""
    root = tmp_path_factory.mktemp("distill")
    teacher_sha = sha256_of(teacher)
    straight = distill(
        teacher, root / "straight", "--n_steps", "4", "--checkpoint_interval", "2", "--sample_interval", "4"
    )
    distill(teacher, root / "resumed", "--n_steps", "2", "--checkpoint_interval", "2", "--loggers", "none")
    resumed = distill(
        teacher,
        root / "resumed",
        "--n_steps",
        "4",
        "--checkpoint_interval",
        "2",
        "--resume",
        "latest",
        "--loggers",
        "none",
    )
    assert sha256_of(teacher) == teacher_sha  # the teacher's file is untouched
    return root, straight, resumed


@pytest.mark.slow
def test_resume_is_bit_exact_and_the_run_folder_is_complete(student):
    root, straight, resumed = student
    assert "resuming from" in resumed.stdout and "parameters identical on 1 process(es)" in straight.stdout
    a = load_training_state(root / "straight" / "states" / "state-00000004")
    b = load_training_state(root / "resumed" / "states" / "state-00000004")
    for key in ("student", "ema", "optimizer", "teacher_sha256", "skipped"):
        assert _same_tree(a[key], b[key]), key
    rows = read_stats(root / "straight")
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["loss/char"] > 0 and r["loss/dsm"] > 0 for r in rows), rows
    assert all(0 < r["dsm_weight"] < 1e4 for r in rows), rows  # strictly inside its clamp [0, max_weight]
    assert sorted(p.name for p in (root / "straight" / "grids").iterdir()) == ["ema-00000004.png", "raw-00000004.png"]
    assert list((root / "straight" / "tb").rglob("events.out.tfevents*"))
    meta, weights = load_snapshot(root / "straight")
    assert meta["kind"] == "characteristic" and meta["model"] == "follmer" and meta["step"] == 4
    assert meta["model_kwargs"]["net_kwargs"]["two_time"] is True
    assert any(".affine_s." in k for k in weights) and "data_mean" in weights


def test_student_samples_in_one_two_and_four_steps(tmp_path, student):
    root, _, _ = student
    nfe = {}
    for steps in (1, 2, 4):
        out = tmp_path / f"s{steps}"
        argv = ["--checkpoint", str(root / "straight"), "--n_samples", "12", "--num_steps", str(steps)]
        sample_script.main(parse(sample_script.Config, argv + ["--out_dir", str(out)]))
        info = json.loads((out / "sample_info.json").read_text())
        nfe[steps] = info["nfe"]
        assert info["sampler"]["solver"] == "characteristic" and info["seconds_per_1k_images"] > 0
        assert len(list(out.glob("0*.png"))) == 12
    assert nfe == {1: 1, 2: 2, 4: 4}
    with pytest.raises(UserError, match="does not apply to a distilled"):
        sample_script.main(
            parse(sample_script.Config, ["--checkpoint", str(root / "straight"), "--ode_solver", "heun"])
        )
    # compare.py: teacher row + one row per step count, same seeds, timed.
    teacher = load_snapshot(root / "straight")[0]["extra"]["teacher"]
    argv = ["--teacher", teacher, "--student", str(root / "straight"), "--out", str(tmp_path / "cmp" / "fm")]
    compare.main(parse(compare.Config, argv + ["--n_seeds", "4", "--teacher_steps", "3", "--timing_images", "4"]))
    info = json.loads((tmp_path / "cmp" / "fm.json").read_text())
    assert [r["sampler"] for r in info["rows"]] == ["teacher", "student-1", "student-2", "student-4"]
    assert [r["nfe"] for r in info["rows"]] == [5, 1, 2, 4]
    assert all(r["seconds_per_1k_images"] > 0 for r in info["rows"]) and (tmp_path / "cmp" / "fm.png").exists()


def test_students_sample_on_the_grid_they_were_distilled_on(tmp_path, teacher):
    """A student distilled with --t_min 0.01 --t_max 0.99 --rho 2 records the resolved grid in its
    snapshot, and sample.py and compare.py sample it there by default (the class defaults are 1e-3, 0.999, 1);
    explicit flags still win. Snapshots from before the grid was recorded fall back to their config's flags."""
    argv = ["--teacher", teacher, "--workdir", str(tmp_path / "run"), "--bsz", "4", "--no-download", "--n_steps", "1"]
    argv += ["--num_steps", "4", "--sample_interval", "0", "--loggers", "none"]
    distill_characteristic.main(
        parse(distill_characteristic.Config, argv + ["--t_min", "0.01", "--t_max", "0.99", "--rho", "2"])
    )
    meta, weights = load_snapshot(tmp_path / "run")
    assert meta["extra"]["grid"] == {"t_min": 0.01, "t_max": 0.99, "rho": 2.0}

    def sampler_settings(checkpoint, *flags):
        out = tmp_path / f"samples{len(list(tmp_path.glob('samples*')))}"
        argv = ["--checkpoint", str(checkpoint), "--n_samples", "2", "--num_steps", "2", "--out_dir", str(out)]
        sample_script.main(parse(sample_script.Config, argv + list(flags)))
        settings = json.loads((out / "sample_info.json").read_text())["sampler"]
        return settings["t_min"], settings["t_max"], settings["rho"]

    assert sampler_settings(tmp_path / "run") == (0.01, 0.99, 2.0)
    flags = ("--eval_eps0", "0.02", "--eval_eps1", "0.002", "--rho", "1")
    assert sampler_settings(tmp_path / "run", *flags) == pytest.approx((0.02, 0.998, 1.0))
    legacy = tmp_path / "legacy.safetensors"  # no recorded grid: the config's flags (None = the class default)
    config = meta["config"] | {"t_min": None, "t_max": 0.99, "rho": None}
    save_snapshot(legacy, meta["kind"], meta["model"], meta["model_kwargs"], weights, config, meta["step"])
    assert sampler_settings(legacy) == (1e-3, 0.99, 1.0)
    # The recorded grid wins over the config: it holds the values resolved from the teacher when no flag was given.
    recorded = tmp_path / "recorded.safetensors"
    extra = meta["extra"] | {"grid": {"t_min": 0.02, "t_max": 0.98, "rho": 3.0}}
    save_snapshot(recorded, meta["kind"], meta["model"], meta["model_kwargs"], weights, config, meta["step"], extra)
    assert sampler_settings(recorded) == (0.02, 0.98, 3.0)
    # compare.py: the student rows use (and record) the distillation grid.
    argv = ["--teacher", teacher, "--student", str(tmp_path / "run"), "--out", str(tmp_path / "cmp")]
    compare.main(parse(compare.Config, argv + ["--n_seeds", "2", "--teacher_steps", "2", "--timing_images", "0"]))
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert [(r["t_min"], r["t_max"], r["rho"]) for r in rows[1:]] == [(0.01, 0.99, 2.0)] * 3


@pytest.mark.slow
def test_characteristic_generator_sampling_line_runs_as_written(tmp_path, teacher, student):
    """CharacteristicGenerator's eval.py line, `--mode ${mode} --checkpoint ${checkpoint} --workdir ${workdir}
    --start_seed 0 --end_seed 49999 --ode_solver ${solver} --num_steps $num_step --rho 1 --eval_eps0 1e-3
    --churn ${churn} --s_min ${s_min} --s_max ${s_max} --gamma ${gamma}`, with sample.py in place of eval.py:
    boolean flags take a value there (its str2bool), --workdir is the image folder, and the characteristic mode
    ignores --ode_solver, as eval.py does."""
    root, _, _ = student
    for mode, checkpoint, churn in (("denoiser", teacher, "True"), ("characteristic", root / "straight", "False")):
        out = tmp_path / mode
        result = run_script(
            "sample.py", "--mode", mode, "--checkpoint", checkpoint, "--workdir", out, "--start_seed", "0",
            "--end_seed", "3", "--ode_solver", "deis", "--num_steps", "4", "--rho", "1", "--eval_eps0", "1e-3",
            "--churn", churn, "--s_min", "0.05", "--s_max", "0.6", "--gamma", "0.2",
        )  # fmt: skip
        settings = json.loads((out / "sample_info.json").read_text())["sampler"]
        assert settings["churn"] is (churn == "True") and settings["gamma"] == 0.2 and settings["rho"] == 1
        assert (settings["s_min"], settings["s_max"], settings["t_min"]) == (0.05, 0.6, 1e-3)
        assert settings["solver"] == ("deis" if mode == "denoiser" else "characteristic")
        assert sorted(p.name for p in out.glob("0*.png")) == [f"{s:06d}.png" for s in range(4)]
    assert "--ode_solver deis is ignored" in result.stdout
    result = run_script("sample.py", "--mode", "characteristic", "--checkpoint", teacher, ok=False)
    assert_one_line_error(result, "--expect_snapshot characteristic", "'diffusion' snapshot")


@pytest.mark.parametrize(
    "argv,churn",
    [
        (["--churn"], True),
        (["--no-churn"], False),
        (["--churn", "True"], True),
        (["--churn", "false"], False),
        (["--churn=1"], True),
        (["--churn=no"], False),
        (["--churn", "--gamma", "0.2"], True),
        ([], False),
    ],
)
def test_boolean_flags_take_a_value_too(argv, churn):
    """`--churn True|False` (CharacteristicGenerator's form) and the switch form `--churn/--no-churn` both parse."""
    cfg = parse(sample_script.Config, argv + ["--grid", "False"])
    assert cfg.churn is churn and cfg.grid is False


@pytest.mark.slow
def test_bad_teachers_and_flags_are_refused(tmp_path, teacher, student):
    root, _, _ = student
    gan = tmp_path / "gan.safetensors"
    save_snapshot(gan, kind="gan", model_name="dcgan", model_kwargs={}, state_dict={}, config={}, step=1)

    def refused(*argv):
        cfg = parse(distill_characteristic.Config, ["--workdir", str(tmp_path / "w"), *map(str, argv)])
        with pytest.raises(UserError) as info:
            distill_characteristic.main(cfg)
        return str(info.value)

    assert "must be a diffusion_train.py snapshot" in refused("--teacher", gan)
    assert "'characteristic' snapshot" in refused("--teacher", root / "straight")
    assert "not a multiple" in refused("--teacher", teacher, "--bsz", "3", "--global_bsz", "8")
    other = tmp_path / "other.safetensors"  # same architecture, different weights
    meta, weights = load_snapshot(teacher)
    weights = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    save_snapshot(other, "diffusion", meta["model"], meta["model_kwargs"], weights, meta["config"], meta["step"])
    argv = ("--teacher", other, "--workdir", root / "resumed", "--resume", "latest", "--n_steps", "6", "--bsz", "4")
    argv += ("--num_steps", "6")  # the run's own settings: only the teacher differs
    cfg = parse(distill_characteristic.Config, [str(a) for a in argv])
    with pytest.raises(UserError, match="not the teacher this run started from"):
        distill_characteristic.main(cfg)
    # LPIPS without its VGG16 weights: one line naming the file and where it goes, no silent switch.
    result = distill(
        teacher, tmp_path / "lp", "--loss", "lpips", "--n_steps", "1", ok=False, env={"TORCH_HOME": str(tmp_path)}
    )
    assert_one_line_error(result, "vgg16-397923af.pth", str(tmp_path / "hub" / "checkpoints"))
    assert not list((tmp_path / "lp").glob("states/state-*"))


@pytest.mark.slow
def test_two_processes_edm_teacher_and_gradient_accumulation(tmp_path, mnist_dir):
    """An EDM teacher, 2 processes x 2 accumulation rounds, bf16: replicas agree and the student samples."""
    train(
        mnist_dir, tmp_path, "--method", "edm", "--log_name", "edm", "--n_steps", "1", "--log_interval", "1",
        "--sample_interval", "0", "--checkpoint_interval", "1", "--loggers", "none",
    )  # fmt: skip
    result = distill(
        tmp_path / "edm", tmp_path / "ddp", "--bsz", "2", "--global_bsz", "8", "--n_steps", "2",
        "--checkpoint_interval", "2", "--mixed_precision", "bf16", "--loggers", "none", launcher=TORCHRUN,
    )  # fmt: skip
    assert "2 accumulation round(s) of 2 per process" in result.stdout
    assert result.stdout.count("parameters identical on 2 process(es)") == 1
    assert read_stats(tmp_path / "ddp")[-1]["kimg"] == pytest.approx(2 * 8 / 1000)
    out = tmp_path / "samples"
    sample_script.main(
        parse(sample_script.Config, ["--checkpoint", str(tmp_path / "ddp"), "--n_samples", "4", "--out_dir", str(out)])
    )
    assert json.loads((out / "sample_info.json").read_text())["nfe"] == 1
