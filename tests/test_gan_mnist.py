"""Script-level tests: gan_mnist.py run the way users run it, on tiny data in the real IDX format."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import assert_one_line_error, read_stats, run_script, train
from utils.ckpt import list_states, load_training_state


def _same_tree(a, b, path="") -> list[str]:
    """Paths at which two training-state trees differ (tensors compared bit for bit)."""
    import torch

    if isinstance(a, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        return sum((_same_tree(a[k], b[k], f"{path}.{k}") for k in a), []) if a.keys() == b.keys() else [path]
    if isinstance(a, (list, tuple)):
        return sum((_same_tree(x, y, f"{path}.{i}") for i, (x, y) in enumerate(zip(a, b, strict=True))), [])
    return [] if a == b else [path]


def test_run_folder_holds_every_artefact(tmp_path, mnist_dir):
    result = train(
        mnist_dir, tmp_path, "--log_name", "cond", "--conditional", "--ema", "--n_steps", "4",
        "--log_interval", "2", "--sample_interval", "2", "--checkpoint_interval", "2",
    )  # fmt: skip
    run_dir = tmp_path / "cond"
    config = json.loads((run_dir / "config.json").read_text())
    assert (
        config["conditional"] and config["ema"] and config["n_steps"] == 4 and config["gen_kwargs"] == {"base_dim": 8}
    )

    rows = read_stats(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("kimg", "sec_per_kimg", "loss/d", "loss/g", "d/real", "d/fake", "skipped", "mem_gb"):
        assert key in rows[-1]
    assert rows[-1]["kimg"] == pytest.approx(4 * 8 / 1000)
    assert "step 4/4 kimg 0.0 sec_per_kimg" in result.stdout  # the status line
    assert "it/s" in result.stderr or "s/it" in result.stderr  # the tqdm progress bar

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb")).Reload()
    assert [e.step for e in events.Scalars("loss/d")] == [2, 4]

    from PIL import Image

    for tag in ("raw", "ema"):
        for step in (2, 4):
            grid = Image.open(run_dir / "grids" / f"{tag}-{step:08d}.png")
            assert grid.size == (10 * 32 + 11 * 2,) * 2  # 10 x 10, one row per class

    snaps = sorted((run_dir / "snapshots").iterdir())
    assert [p.name for p in snaps] == ["snapshot-00000002.safetensors", "snapshot-00000004.safetensors"]
    with safe_open(str(snaps[-1]), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "gan" and meta["model"] == "dcgan" and meta["step"] == "4"
    assert json.loads(meta["model_kwargs"])["n_classes"] == 10
    assert json.loads(meta["config"])["ema"] is True
    assert [s for s, _ in list_states(run_dir / "states")] == [2, 4]
    state = load_training_state(run_dir / "states" / "state-00000004")
    assert state["step"] == 4 and state["ema"] is not None and set(state["optim_g"]) == {"state", "param_groups"}


RESUME_CASES = {
    "gan-labels-ema-cond": ["--method", "gan", "--soft_labels", "--noisy_labels", "0.3", "--ema", "--conditional"],
    "wgan-gp-ema": ["--method", "wgan-gp", "--ema", "--beta1", "0", "--beta2", "0.9"],
    "wgan-rmsprop": ["--method", "wgan", "--optimizer", "RMSprop", "--lr", "5e-5", "--train_g_interval", "2"],
    "hinge-sn": ["--method", "hinge", "--sn_disc", "--sn_gen"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bit_exact(tmp_path, mnist_dir, case):
    """N steps straight == N/2 steps, a new process resuming, N/2 more: every tensor bit-identical, data order
    included (256 images / batch 8 = 32 steps an epoch, so the resume point is mid-epoch)."""
    args = RESUME_CASES[case] + ["--checkpoint_interval", "6", "--log_interval", "3", "--sample_interval", "100"]
    train(mnist_dir, tmp_path, "--log_name", "straight", "--n_steps", "12", *args)
    train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "6", *args)
    result = train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "12", "--resume", "latest", *args)
    assert "resuming from" in result.stdout and "changed: ['n_steps']" in result.stdout
    straight = load_training_state(tmp_path / "straight" / "states" / "state-00000012")
    split = load_training_state(tmp_path / "split" / "states" / "state-00000012")
    for key in ("gen", "disc", "optim_g", "optim_d", "ema", "skipped", "step"):
        assert _same_tree(straight[key], split[key], key) == []
    # The logged losses agree too, and the resumed stats.jsonl has no duplicated rows.
    rows_a, rows_b = read_stats(tmp_path / "straight"), read_stats(tmp_path / "split")
    assert [r["step"] for r in rows_b] == [3, 6, 9, 12]
    assert [r["loss/d"] for r in rows_a] == [r["loss/d"] for r in rows_b]


@pytest.mark.slow
def test_resume_refuses_another_setup_and_keeps_states(tmp_path, mnist_dir):
    train(mnist_dir, tmp_path, "--log_name", "r", "--n_steps", "2", "--checkpoint_interval", "1")
    states = tmp_path / "r" / "states"
    before = {p.name: (p / "tensors.safetensors").read_bytes() for p in states.iterdir()}
    result = train(
        mnist_dir, tmp_path, "--log_name", "r", "--n_steps", "4", "--resume", "latest", "--method", "hinge", ok=False
    )
    assert_one_line_error(result, "cannot resume", "method: saved 'gan' vs now 'hinge'")
    result = train(mnist_dir, tmp_path, "--log_name", "r", "--n_steps", "4", ok=False)  # forgot --resume
    assert_one_line_error(result, "already holds a run (training states", "--resume latest", "--delete")
    after = {p.name: (p / "tensors.safetensors").read_bytes() for p in states.iterdir()}
    assert before == after


@pytest.mark.slow
def test_resume_applies_a_new_lr_and_refuses_another_runs_folder(tmp_path, mnist_dir):
    train(mnist_dir, tmp_path, "--log_name", "a", "--n_steps", "2", "--checkpoint_interval", "2")
    new = ["--lr", "1e-3", "--beta1", "0.1"]
    train(mnist_dir, tmp_path, "--log_name", "a", "--n_steps", "4", "--resume", "latest", *new)
    state = load_training_state(tmp_path / "a" / "states" / "state-00000004")
    for group in state["optim_g"]["param_groups"] + state["optim_d"]["param_groups"]:
        assert group["lr"] == 1e-3 and tuple(group["betas"]) == (0.1, 0.999)
    train(mnist_dir, tmp_path, "--log_name", "b", "--n_steps", "2")
    result = train(mnist_dir, tmp_path, "--log_name", "b", "--n_steps", "6", "--resume", tmp_path / "a", ok=False)
    assert_one_line_error(result, "from another run", "choose another --log_name")
    assert [s for s, _ in list_states(tmp_path / "b" / "states")] == [2]


def test_resume_latest_without_states_starts_fresh(tmp_path, mnist_dir):
    result = train(mnist_dir, tmp_path, "--log_name", "fresh", "--n_steps", "1", "--resume", "latest")
    assert "starting from scratch" in result.stdout
    assert list_states(tmp_path / "fresh" / "states")[-1][0] == 1


def test_two_processes_with_torchrun(tmp_path, mnist_dir):
    """DDP over gloo: both ranks train, only rank 0 writes, and the parameters are bit-identical on both ranks
    at every checkpoint (the script checks and would fail otherwise)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = train(
        mnist_dir,
        tmp_path,
        "--log_name",
        "ddp",
        "--n_steps",
        "4",
        "--checkpoint_interval",
        "2",
        "--log_interval",
        "2",
        "--method",
        "wgan-gp",
        "--ema",
        "--conditional",
        launcher=launcher,
    )
    out = result.stdout
    assert "2 process(es) on cpu" in out
    assert out.count("parameters identical on 2 process(es)") == 2  # printed by rank 0 only, once per checkpoint
    rows = read_stats(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [2, 4]  # one writer: no duplicated rows
    assert rows[-1]["kimg"] == pytest.approx(4 * 2 * 8 / 1000)  # both ranks' images are counted
    assert len(list((tmp_path / "ddp" / "snapshots").iterdir())) == 2
    writers = {p.name.split(".")[-2] for p in (tmp_path / "ddp" / "tb").rglob("events.out.tfevents*")}
    assert len(writers) == 1  # event files (scalars + hparams) all come from one process id


@pytest.mark.slow
def test_two_process_resume_is_bit_exact(tmp_path, mnist_dir):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--ema", "--conditional", "--checkpoint_interval", "3", "--sample_interval", "100"]
    train(mnist_dir, tmp_path, "--log_name", "straight", "--n_steps", "6", *args, launcher=launcher)
    train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "3", *args, launcher=launcher)
    train(mnist_dir, tmp_path, "--log_name", "split", "--n_steps", "6", "--resume", "latest", *args, launcher=launcher)
    straight = load_training_state(tmp_path / "straight" / "states" / "state-00000006")
    split = load_training_state(tmp_path / "split" / "states" / "state-00000006")
    for key in ("gen", "disc", "optim_g", "optim_d", "ema"):
        assert _same_tree(straight[key], split[key], key) == []


@pytest.mark.slow
def test_bf16_and_fp16_requests_on_cpu(tmp_path, mnist_dir):
    result = train(
        mnist_dir, tmp_path, "--log_name", "bf16", "--n_steps", "3", "--method", "wgan-gp", "--mixed_precision", "bf16"
    )
    assert "mixed precision bf16" in result.stdout
    rows = read_stats(tmp_path / "bf16")
    assert rows[-1]["skipped"] == 0 and all(abs(rows[-1][k]) < 1e3 for k in ("loss/d", "loss/g", "penalty/gp"))
    result = train(mnist_dir, tmp_path, "--log_name", "fp16", "--n_steps", "1", "--mixed_precision", "fp16")
    assert "does not apply fp16 autocast on CPU" in result.stdout  # said, not silently ignored


def test_accelerate_launch(tmp_path, mnist_dir):
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--mixed_precision",
        "bf16",
    ]
    result = train(mnist_dir, tmp_path, "--log_name", "acc", "--n_steps", "2", launcher=launcher)
    assert "mixed precision bf16" in result.stdout
    assert (tmp_path / "acc" / "snapshots" / "snapshot-00000002.safetensors").is_file()


@pytest.mark.slow
def test_compile_with_gradient_penalty(tmp_path, mnist_dir):
    """G and D are compiled; the second-order penalty runs on the eager module and training stays finite."""
    result = train(
        mnist_dir, tmp_path, "--log_name", "compiled", "--n_steps", "3", "--method", "wgan-gp", "--compile",
        "--log_interval", "1", timeout=900,
    )  # fmt: skip
    assert "step 3/3" in result.stdout
    assert all(r["skipped"] == 0 and r["penalty/gp"] < 10 for r in read_stats(tmp_path / "compiled"))


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, mnist_dir):
    result = train(
        mnist_dir, tmp_path, "--log_name", "nan", "--n_steps", "20", "--lr", "1e30", "--log_interval", "1",
        "--checkpoint_interval", "1", "--max_skipped_steps", "2", ok=False,
    )  # fmt: skip
    assert_one_line_error(result, "non-finite gradients", "newest training state is")
    rows = read_stats(tmp_path / "nan")
    assert rows[-1]["skipped"] >= 1  # logged before the stop
    assert "2 steps in a row" in result.stderr  # --max_skipped_steps 2 stops at the second one
    assert list_states(tmp_path / "nan" / "states")  # what was saved before the divergence is still there


def test_dry_run_and_config_file(tmp_path, mnist_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: hinge\nlr: 0.001\nema: true\ngen_kwargs: {base_dim: 4}\n")
    result = run_script("gan_mnist.py", "--config", cfg, "--lr", "0.002", "--log_dir", tmp_path, "--dry_run")
    resolved = json.loads(result.stdout)
    assert resolved["method"] == "hinge" and resolved["lr"] == 0.002 and resolved["ema"] is True
    assert resolved["gen_kwargs"] == {"base_dim": 4}
    assert list(tmp_path.iterdir()) == [cfg]  # a dry run writes nothing


def _corrupt_dir(tmp_path: Path, mnist_dir: Path) -> Path:
    bad = tmp_path / "corrupt"
    shutil.copytree(mnist_dir, bad)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    return bad


BAD_INPUTS = {
    "unknown-model": (["--model", "stylegan9"], ["invalid choice", "dcgan"]),
    "unknown-method": (["--method", "lsgan"], ["invalid choice", "wgan-gp"]),
    "wrong-img-size": (["--img_size", "30"], ["img_size", "30"]),
    "labels-with-hinge": (["--method", "hinge", "--soft_labels"], ["--method gan only"]),
    "batchnorm-critic": (["--method", "wgan-gp", "--disc_kwargs", '{"norm": "batch"}'], ["without BatchNorm"]),
    "bad-kwarg": (["--gen_kwargs", '{"base_dims": 8}'], ["base_dims"]),
    "bad-json": (["--gen_kwargs", "{base_dim: 8"], ["JSON"]),
    "missing-resume": (["--resume", "/nonexistent/state"], ["no such file"]),
    "one-state": (["--keep_states", "1"], [">= 2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(tmp_path, mnist_dir, case):
    args, fragments = BAD_INPUTS[case]
    result = run_script(
        "gan_mnist.py",
        "--data_dir",
        mnist_dir,
        "--no-download",
        "--log_dir",
        tmp_path,
        "--n_steps",
        "1",
        *args,
        ok=False,
    )
    assert_one_line_error(result, *fragments)


@pytest.mark.slow
def test_missing_and_corrupt_data(tmp_path, mnist_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script(
        "gan_mnist.py", "--data_dir", empty, "--dataset", "mnist", "--no-download", "--log_dir", tmp_path, ok=False
    )
    assert_one_line_error(result, "mnist not found", "(1)", "(2)", "(3)", "not tried")
    result = run_script(
        "gan_mnist.py",
        "--data_dir",
        _corrupt_dir(tmp_path, mnist_dir),
        "--no-download",
        "--log_dir",
        tmp_path,
        ok=False,
    )
    assert_one_line_error(result, "train-images-idx3-ubyte.gz", "cannot read")


FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_system_copy(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script(
        "gan_mnist.py",
        "--dataset",
        "fashion_mnist",
        "--data_dir",
        empty,
        "--no-download",
        "--log_dir",
        tmp_path,
        "--n_steps",
        "3",
        "--batch_size",
        "16",
        "--log_interval",
        "3",
    )
    assert "60000 training samples" in result.stdout
    assert read_stats(tmp_path / "fashion_mnist_dcgan_gan")[-1]["step"] == 3
