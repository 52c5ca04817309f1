"""configs/: every file parses with the script its header names (unknown keys would be refused), and the values
that make it the paper's setting are the paper's."""

import importlib
import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from utils.cli import parse

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def load(path: Path):
    script = re.search(r"(\w+)\.py --config", path.read_text()).group(1)  # the header's command names the script
    module = importlib.import_module(script)
    resolve = getattr(module, "resolve_config", None)
    return parse(module.Config, ["--config", str(path)], resolve=resolve)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses_with_its_script(path):
    cfg = load(path)
    assert f"configs/{path.relative_to(REPO / 'configs')}" in path.read_text()  # the header shows how to run it
    assert cfg.n_steps >= 1


def test_the_papers_values():
    ada = load(REPO / "configs/stylegan2_ada/cifar.yaml")
    assert (ada.r1_gamma, ada.pl_weight, ada.lr, ada.beta1, ada.beta2, ada.batch_size) == (
        0.01,
        0.0,
        0.0025,
        0,
        0.99,
        64,
    )
    assert ada.gen_kwargs["n_mlp"] == 2 and ada.gen_kwargs["mixing_prob"] == 0 and ada.disc_kwargs["mbstd_group"] == 32
    assert ada.ema_halflife_kimg == 500 and ada.n_steps * ada.batch_size == 100_000_000
    edm = load(REPO / "configs/edm/cifar10_ddpmpp.yaml")
    assert (edm.method, edm.model, edm.lr, edm.lr_rampup_kimg, edm.ema_halflife_kimg) == (
        "edm",
        "ddpmpp-cifar",
        1e-3,
        1e4,
        500,
    )
    assert edm.n_steps * edm.batch_size == 200_000_000 and edm.grad_clip is None
    progan = load(REPO / "configs/progan/celeba.yaml")
    assert (progan.method, progan.drift_penalty, progan.lr, progan.beta2, progan.batch_size) == (
        "wgan-gp",
        1e-3,
        1e-3,
        0.99,
        16,
    )
    assert progan.n_steps * progan.batch_size == (1 + 6 * 2) * 800_000  # 4x4, then (fade + stable) for 6 levels
    teacher = load(REPO / "configs/characteristic/mnist_denoiser.yaml")
    assert (teacher.method, teacher.optimizer, teacher.ema_decay, teacher.grad_clip) == ("follmer", "RAdam", 0.999, 1.0)
    distill = load(REPO / "configs/characteristic/mnist_distill.yaml")
    assert (distill.num_steps, distill.rho, distill.t_min, distill.t_max, distill.ema_decay) == (
        20,
        1.0,
        1e-3,
        0.999,
        0.999,
    )
    assert distill.global_batch_size == 256 and not distill.train_data_end
