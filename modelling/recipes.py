"""Each GAN architecture's published training recipe: loss, learning rates, Adam betas, D steps per G step and the
regularisers its paper trains it with. `gan_mnist.py` and `gan_celeba.py` both fill the flags a user left unset
from this one table (`apply_recipe`), so a model means the same recipe in both scripts; a script that lacks a
regulariser a recipe needs refuses that model in one line naming the script that has it.

Sources: DCGAN, Radford et al. 2016 (Sec. 4: Adam 2e-4, beta1 0.5); Progressive GAN, Karras et al. 2018 (WGAN-GP,
eps_drift 0.001, Adam 1e-3 (0, 0.99)); StyleGAN, Karras et al. 2019 (NS-GAN + R1 gamma 10, Adam 1e-3 (0, 0.99));
StyleGAN2, Karras et al. 2020 (lazy R1 every 16, path length 2 every 4, StyleGAN2-ADA's `stylegan2` config: lr
2e-3); SA-GAN, Zhang et al. 2019 (hinge, TTUR G 1e-4 / D 4e-4, Adam (0, 0.9)); AC-GAN, Odena et al. 2017 (Adam 2e-4,
beta1 0.5); BigGAN, Brock et al. 2019 (hinge, G 5e-5 / D 2e-4, Adam (0, 0.999), 2 D steps per G step, orthogonal
regularisation 1e-4).
"""

from dataclasses import dataclass, field

from modelling import GENERATORS
from utils.cli import UserError
from utils.ema import EmaConfig
from utils.optim import OPTIMIZERS
from utils.run import RunConfig

GAN_RECIPES = {
    "dcgan": dict(method="gan", lr=2e-4, beta1=0.5, beta2=0.999),
    "progressive_gan": dict(method="wgan-gp", drift_penalty=0.001, lr=1e-3, beta1=0.0, beta2=0.99),
    "stylegan": dict(method="gan", r1_gamma=10.0, r1_interval=1, lr=1e-3, beta1=0.0, beta2=0.99),
    "stylegan2": dict(method="gan", r1_gamma=10.0, r1_interval=16, pl_weight=2.0, lr=2e-3, beta1=0.0, beta2=0.99),
    "sagan": dict(method="hinge", lr=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9),
    "acgan": dict(method="gan", lr=2e-4, beta1=0.5, beta2=0.999),
    "biggan": dict(method="hinge", lr=5e-5, lr_d=2e-4, beta1=0.0, beta2=0.999, train_g_interval=2, ortho_reg=1e-4),
}
# What a flag left unset means when the model's recipe does not name it: the regulariser off, one D step per G step.
RECIPE_FALLBACKS = dict(
    drift_penalty=0.0, r1_gamma=0.0, r1_interval=1, pl_weight=0.0, train_g_interval=1, ortho_reg=0.0
)
# Parts of a recipe that are not flags: a script that cannot train them refuses the model (see `apply_recipe`).
RECIPE_NEEDS = {"progressive_gan": "progressive growing", "stylegan": "R1", "stylegan2": "lazy R1 and path length"}


@dataclass
class GanConfig(EmaConfig, RunConfig):
    """The flags of both GAN scripts: data, networks, the recipe flags `apply_recipe` fills (None: the model's
    recipe), Ganzo's label tricks, optimisation and the EMA (its half-life flags: utils/ema.py's EmaConfig, listed
    after the run flags). A script's `Config` extends it; a field it redeclares (other default, choices or help) keeps
    its place in --help and config.json, its own fields come after."""

    dataset: str = "mnist"
    data_dir: str = field(default="data", metadata={"help": "looked up first; then system copies; then download"})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download missing data"})
    img_size: int = 32
    model: str = field(default="dcgan", metadata={"choices": sorted(GENERATORS)})
    gen_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the generator"})
    disc_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the discriminator"})
    z_dim: int = 128
    conditional: bool = False
    image_class: int | None = field(default=None, metadata={"help": "train on this label only (Ganzo)"})
    method: str | None = field(
        default=None, metadata={"choices": ["gan", "wgan", "wgan-gp", "hinge"], "help": "default: the model's recipe"}
    )
    gp_lambda: float = field(default=10.0, metadata={"help": "WGAN-GP penalty weight"})
    clip_value: float = field(default=0.01, metadata={"help": "WGAN critic weight clipping"})
    sn_disc: bool = field(default=False, metadata={"help": "spectral norm on every D layer, no BatchNorm (SN-GAN)"})
    sn_gen: bool = field(default=False, metadata={"help": "spectral norm on every G layer (SA-GAN)"})
    ortho_reg: float | None = field(default=None, metadata={"help": "orthogonal regularisation beta on G (BigGAN)"})
    soft_labels: bool = field(default=False, metadata={"help": "Ganzo: targets U[0.9,1] / U[0,0.1] (--method gan)"})
    noisy_labels: float = field(default=0.0, metadata={"help": "Ganzo: P(swap a term's targets) per D step"})
    batch_size: int = field(default=64, metadata={"min": 1, "help": "per process"})
    n_steps: int = field(default=10000, metadata={"min": 1, "help": "discriminator steps"})
    optimizer: str = field(default="Adam", metadata={"choices": OPTIMIZERS})
    lr: float | None = None
    lr_d: float | None = field(default=None, metadata={"help": "D learning rate (TTUR); default --lr"})
    beta1: float | None = None
    beta2: float | None = None
    train_g_interval: int | None = field(
        default=None, metadata={"min": 1, "help": "one G step every k D steps (WGAN n_critic)"}
    )
    ema: bool = field(default=False, metadata={"help": "keep an EMA generator; samples and snapshots use it"})


def apply_recipe(cfg, script: str, other_script: str, trains: tuple[str, ...] = tuple(GAN_RECIPES)) -> None:
    """Fill every recipe flag of `cfg` that is None (set neither by a config file nor on the command line) with
    `cfg.model`'s recipe value, else its fallback. `--lr_d` left unset takes the recipe's D rate, unless `--lr` was
    given (then both networks use it). A model outside `trains` (the models `script` can train as their papers do)
    is refused in one line naming `other_script`; so is a recipe term that `cfg` has no flag for."""
    recipe = RECIPE_FALLBACKS | GAN_RECIPES[cfg.model]
    missing = [
        f"--{k}" for k, v in GAN_RECIPES[cfg.model].items() if not hasattr(cfg, k) and v != RECIPE_FALLBACKS.get(k)
    ]
    if cfg.model not in trains or missing:
        needs = RECIPE_NEEDS[cfg.model] if cfg.model in RECIPE_NEEDS else ", ".join(missing)
        raise UserError(f"{script} cannot train --model {cfg.model} as its paper does ({needs}): use {other_script}")
    if hasattr(cfg, "lr_d") and cfg.lr_d is None:
        cfg.lr_d = cfg.lr if cfg.lr is not None else recipe.get("lr_d", recipe["lr"])
    for name, value in recipe.items():
        if name != "lr_d" and getattr(cfg, name, 0) is None:
            setattr(cfg, name, value)
