"""Train a GAN (DCGAN, optionally class-conditional; SA-GAN; AC-GAN; BigGAN) on MNIST or Fashion-MNIST at 32x32.

    python gan_mnist.py --model dcgan --method gan --log_name mnist_dcgan --batch_size 32 --n_steps 100000 \
        --lr 2e-4 --beta1 0.5 --beta2 0.999 [--conditional] [--ema]
    python gan_mnist.py --dataset fashion_mnist --method wgan-gp --lr 1e-4 --beta1 0 --beta2 0.9 --train_g_interval 5
    python gan_mnist.py --method wgan --optimizer RMSprop --lr 5e-5 --batch_size 64 --train_g_interval 5
    python gan_mnist.py --method hinge --sn_disc --lr 1e-4 --beta1 0.5 --beta2 0.999
    python gan_mnist.py --dataset fashion_mnist --model acgan --conditional --ema     # D also classifies (AC-GAN)
    python gan_mnist.py --dataset fashion_mnist --model biggan --conditional --ema   # BigGAN's recipe (below)
    python gan_mnist.py --dataset fashion_mnist --image_class 7 --ema                   # sneakers only (Ganzo)
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] [--dynamo_backend inductor] gan_mnist.py ...
    torchrun --nproc_per_node 2 gan_mnist.py ...          # also on CPU (gloo)
    python gan_mnist.py ... --resume latest               # continue bit-exactly from logs/<log_name>/states

Flags left unset take the model's published recipe (modelling/recipes.py, shared with gan_celeba.py; config.json
and --dry_run show the resolved values): dcgan and acgan NS-GAN, Adam 2e-4 (0.5, 0.999); sagan hinge, G 1e-4 / D
4e-4, Adam (0, 0.9); biggan hinge, G 5e-5 / D 2e-4, Adam (0, 0.999), 2 D steps per G step, orthogonal
regularisation 1e-4. Models whose recipe needs progressive growing, R1 or path length (progressive_gan, stylegan,
stylegan2) are refused here: gan_celeba.py trains them.
`--batch_size` is per process. Every random draw of a step is seeded from (seed, rank, step) and the data order is
a pure function of (seed, position), so a resumed run equals an uninterrupted one. The run folder logs/<log_name>/
(utils/run.py) holds config.json, stats.jsonl, tb/, grids/{raw,ema}-<step>.png, snapshots/ (what sample.py reads),
states/ (full training states) and, with --eval_interval, eval/ and the best checkpoint:
    python gan_mnist.py ... --eval_interval 1000 --eval_samples 1000     # FD_cls of the EMA G, best.safetensors kept
    python gan_mnist.py ... --load logs/<name> --load_best --only_test   # score the best snapshot, no training
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from losses import AuxClassifierLoss, get_gan_loss
from losses.gan_steps import clip_critic, d_step_loss, g_step_due, g_step_loss
from metrics.evaluate import loop_evaluator, score_snapshot
from modelling import build_discriminator, build_generator
from modelling.common import latent_batches, recalibrate_batchnorm
from modelling.recipes import GanConfig, apply_recipe
from sampling import gan_images
from utils.cli import UserError, parse, user_errors
from utils.data import MNIST_LIKE, build_dataset, conditioning_classes, select_class, to_device, train_batches
from utils.dist import set_backends, unwrap
from utils.ema import EMA
from utils.grid import save_grid
from utils.optim import make_optimizer, set_hyperparameters, step_optimizer
from utils.run import Run
from utils.tracking import LoopTracker

GRID_ROWS = 10  # sample grids are 10 x 10; conditional grids have one row per class
# A resumed run must match these; anything else (lr, n_steps, intervals) may change, with a note.
RESUME_KEYS = (
    "dataset",
    "img_size",
    "model",
    "gen_kwargs",
    "disc_kwargs",
    "z_dim",
    "conditional",
    "method",
    "sn_gen",
    "sn_disc",
    "optimizer",
    "image_class",
)
DCGAN_LIKE = ("dcgan", "acgan")  # DCGAN layers: --sn_gen/--sn_disc and the BatchNorm choice apply
TRAINS = ("dcgan", "sagan", "acgan", "biggan")  # the models whose recipes need no regulariser this script lacks
# gan_celeba.py's flags for what this script does not train (drift, R1, path length, growing, decoding workers).
CELEBA_ONLY = ("drift_penalty", "r1_gamma", "r1_interval", "pl_weight", "pl_interval", "pl_batch_shrink", "pl_decay")
CELEBA_ONLY += ("progressive_growing", "fade_kimg", "num_workers")


@dataclass
class Config(GanConfig):  # the flags of both GAN scripts (modelling/recipes.py)
    dataset: str = field(default="mnist", metadata={"choices": sorted(MNIST_LIKE)})


def check_config(cfg: Config) -> Config:
    """Fill unset flags from the model's recipe (modelling/recipes.py), then refuse flag combinations that cannot
    work, before anything is written."""
    apply_recipe(cfg, "gan_mnist.py", "gan_celeba.py", TRAINS)
    cfg.check()  # the run fields, and every "min" bound (now that the recipe is filled in)
    if cfg.model == "acgan" and not cfg.conditional:
        raise UserError("--model acgan is class-conditional (D classifies its input): add --conditional")
    if cfg.image_class is not None and cfg.conditional:
        raise UserError("--image_class trains on one label: it cannot be combined with --conditional")
    if cfg.ortho_reg < 0:
        raise UserError(f"--ortho_reg must be >= 0, got {cfg.ortho_reg}")
    if cfg.method != "gan" and (cfg.soft_labels or cfg.noisy_labels):
        raise UserError(f"--soft_labels/--noisy_labels apply to --method gan only, not {cfg.method}")
    if not 0 <= cfg.noisy_labels <= 1:
        raise UserError(f"--noisy_labels is a probability in [0, 1], got {cfg.noisy_labels}")
    if cfg.method == "wgan-gp" and cfg.disc_kwargs.get("norm", "none") == "batch":
        raise UserError("--method wgan-gp needs a critic without BatchNorm (the penalty is per sample)")
    if cfg.lr <= 0 or cfg.lr_d <= 0:
        raise UserError(f"--lr and --lr_d must be > 0, got {cfg.lr}, {cfg.lr_d}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    return cfg


def build_models(cfg: Config, n_classes: int):
    gen_kwargs = dict(img_size=cfg.img_size, img_channels=1, z_dim=cfg.z_dim, n_classes=n_classes)
    disc_kwargs = dict(img_size=cfg.img_size, img_channels=1, n_classes=n_classes)
    if cfg.model in DCGAN_LIKE:  # SA-GAN and BigGAN have spectral norm and no BatchNorm choice in their layouts
        # The WGAN-GP critic has no BatchNorm by default: a per-sample gradient penalty is invalid with batch
        # statistics. Neither has SN-GAN's (spectral norm instead). --disc_kwargs '{"norm": ...}' overrides both.
        gen_kwargs["spectral_norm"] = cfg.sn_gen
        no_bn = cfg.method == "wgan-gp" or cfg.sn_disc
        disc_kwargs |= dict(spectral_norm=cfg.sn_disc, norm="none" if no_bn else "batch")
    gen_kwargs, disc_kwargs = gen_kwargs | cfg.gen_kwargs, disc_kwargs | cfg.disc_kwargs
    try:
        return build_generator(cfg.model, **gen_kwargs), gen_kwargs, build_discriminator(cfg.model, **disc_kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --model {cfg.model}: {e.args[0] if e.args else e}")


def main(cfg: Config) -> None:
    cfg = check_config(cfg)  # idempotent: parse() already resolved it, tests may pass a raw Config
    suffix = ("_cond" if cfg.conditional else "") + (f"_class{cfg.image_class}" if cfg.image_class is not None else "")
    run = Run(cfg, f"{cfg.dataset}_{cfg.model}_{cfg.method}{suffix}", RESUME_KEYS)

    # Accelerator: mixed precision, DDP and torch.compile come from the flags or from `accelerate launch`.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(**run.accelerator_kwargs())
    device, is_main = accelerator.device, accelerator.is_main_process
    run.open(accelerator)  # refuses an existing run without --resume/--delete; loads the state to resume from

    # Data.
    with accelerator.main_process_first():  # only one process downloads, the others then find the files
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    if cfg.image_class is not None:
        dataset = select_class(dataset, cfg.image_class)
    if cfg.only_test:
        score_snapshot(run, accelerator, dataset)
        return
    n_classes = conditioning_classes(cfg, dataset)
    loader = train_batches(dataset, cfg, accelerator, run.start_step)

    # Models. Same init on every rank; the EMA and the evaluation copy are made before prepare() wraps anything.
    torch.manual_seed(cfg.seed)
    gen, gen_kwargs, disc = build_models(cfg, n_classes)
    ema = EMA(gen, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    gen_eval = build_generator(cfg.model, **gen_kwargs).to(device)  # scratch copy for grids and snapshots
    if ema is not None:
        ema.module.to(device)
    loss_fn = get_gan_loss(cfg.method)
    aux_loss = AuxClassifierLoss() if cfg.model == "acgan" else None  # AC-GAN: D's class head has its own loss

    # Optimizers.
    optim_g = make_optimizer(cfg.optimizer, gen.parameters(), cfg.lr, (cfg.beta1, cfg.beta2))
    optim_d = make_optimizer(cfg.optimizer, disc.parameters(), cfg.lr_d, (cfg.beta1, cfg.beta2))

    # Prepare.
    gen, disc, optim_g, optim_d = accelerator.prepare(gen, disc, optim_g, optim_d)

    # Resume: the saved optimizer groups carry the old lr and betas, so the current flags are applied again.
    resumed = run.restore(gen=gen, disc=disc, optim_g=optim_g, optim_d=optim_d, ema=ema, scaler=accelerator.scaler)
    set_hyperparameters(optim_g, cfg.lr, (cfg.beta1, cfg.beta2))
    set_hyperparameters(optim_d, cfg.lr_d, (cfg.beta1, cfg.beta2))
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    run.begin(accelerator, dataset, evaluator)

    def eval_generator(source: torch.nn.Module) -> torch.nn.Module:
        """`gen_eval` holding `source`'s weights with standing BatchNorm statistics: batch-independent outputs."""
        gen_eval.load_state_dict(unwrap(source).state_dict())
        return recalibrate_batchnorm(gen_eval, latent_batches(cfg.z_dim, n_classes, seed=cfg.seed + 1, device=device))

    def penalty_scale() -> float:
        # fp16: second-order terms are taken from gradients of the scaled output, then unscaled (PyTorch's AMP recipe)
        return accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0

    @torch.no_grad()
    def save_grids(step: int) -> None:
        rng = torch.Generator().manual_seed(cfg.seed)
        zs = torch.randn(GRID_ROWS**2, cfg.z_dim, generator=rng).to(device)
        labels = torch.arange(n_classes).repeat_interleave(GRID_ROWS**2 // n_classes).to(device) if n_classes else None
        for tag, source in [("raw", gen)] + ([("ema", ema.module)] if ema else []):
            save_grid(eval_generator(source)(zs, labels), run.dir / "grids" / f"{tag}-{step:08d}.png", nrow=GRID_ROWS)

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    for step in loop.steps():
        reals, labels = to_device(next(loader), device, labels=n_classes > 0)
        n = reals.shape[0]
        # Discriminator step: fakes come from the current G without building its graph.
        with torch.no_grad():
            fakes = gen(torch.randn(n, cfg.z_dim, device=device), labels)
        loss_d, stats = d_step_loss(cfg, disc, loss_fn, aux_loss, reals, fakes, labels, penalty_scale())
        optim_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        d_applied, _ = step_optimizer(accelerator, optim_d, disc)
        clip_critic(cfg, disc)

        # Generator step, every `train_g_interval` D steps; D is frozen so only G gets gradients.
        g_applied = True
        if g_step_due(step, cfg.train_g_interval):
            disc.requires_grad_(False)
            loss_g, g_stats = g_step_loss(
                cfg, gen, disc, loss_fn, aux_loss, torch.randn(n, cfg.z_dim, device=device), labels
            )
            stats |= g_stats
            optim_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            disc.requires_grad_(True)
            g_applied, _ = step_optimizer(accelerator, optim_g, gen)

            # Update EMA, only after an update that really happened.
            if ema is not None and g_applied:
                # One EMA update per G step, which comes every train_g_interval steps of images_per_step images.
                ema.update(unwrap(gen), cfg.train_g_interval * images_per_step, (step + 1) * images_per_step)

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, d_applied and g_applied, stats)

        # Sample grids; evaluate the EMA generator; save checkpoints (also at a new best evaluation).
        if is_main and run.due(done, cfg.sample_interval):
            save_grids(done)
        if run.eval_due(done):
            run.evaluate(accelerator, done, gan_images, eval_generator(ema.module if ema else gen), n_classes)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            snapshot = dict(
                kind="gan", model=cfg.model, model_kwargs=gen_kwargs, module=eval_generator(ema.module if ema else gen)
            )
            nets = dict(gen=gen, disc=disc, optim_g=optim_g, optim_d=optim_d, ema=ema, scaler=accelerator.scaler)
            run.save(accelerator, done, replicas=(gen, disc), snapshot=snapshot, **nets, skipped=loop.skips.total)

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()
    run.close()


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (or `argv`) and run; bad input ends with one line on stderr and exit code 2."""
    with user_errors(Path(__file__).name):
        for arg in sys.argv[1:] if argv is None else argv:
            name = arg.split("=")[0].removeprefix("--").removeprefix("no-")
            if arg.startswith("--") and name in CELEBA_ONLY:
                raise UserError(f"--{name} is a flag of gan_celeba.py, which trains with it; gan_mnist.py has none")
        main(parse(Config, argv, description=__doc__.split("\n")[0], resolve=check_config))


if __name__ == "__main__":
    cli()
