"""Train the GAN architecture zoo (DCGAN, Progressive GAN, StyleGAN, StyleGAN2, SA-GAN, AC-GAN, BigGAN) on CelebA or
any image folder.

    python gan_celeba.py --model dcgan --method gan --img_size 64 --log_name celeba_dcgan --batch_size 128 \
        --n_steps 100000 --lr 2e-4 --beta1 0.5 --beta2 0.999 --ema --data_dir data
    python gan_celeba.py --model dcgan --method wgan --img_size 64 --log_name celeba_dcgan_wgan --batch_size 64 \
        --n_steps 100000 --optimizer RMSprop --lr 5e-5 --train_g_interval 5
    python gan_celeba.py --model progressive_gan --loggers tensorboard --img_size 256 --z_dim 512 --batch_size 16 \
        --method wgan-gp --log_name celeba_progressive_gan --n_steps 650000 --optimizer Adam --beta1 0 --beta2 0.99 \
        --lr 1e-3 --ema --drift_penalty 0.001 --checkpoint_interval 50000
    python gan_celeba.py --model stylegan2 --ema                  # R1 (lazy, every 16) + path length (every 4)
    python gan_celeba.py --model sagan --dataset folder --data_dir my_images --conditional   # hinge, TTUR
    python gan_celeba.py --model acgan --dataset cifar10 --img_size 32 --conditional    # D classifies too (AC-GAN)
    python gan_celeba.py --model biggan --dataset folder --data_dir my_images --conditional --ema   # BigGAN
    python gan_celeba.py --model dcgan --dataset folder --data_dir my_images --image_class 2   # one class (Ganzo)
    python gan_celeba.py --model dcgan --dataset fashion_mnist --img_size 32    # offline, 1 channel
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] [--dynamo_backend inductor] gan_celeba.py ...
    python gan_celeba.py ... --resume latest          # continue bit-exactly, also mid-growth and mid-regularisation

Flags left unset take the model's published recipe (`GAN_RECIPES` in modelling/recipes.py, shared with gan_mnist.py),
and config.json and --dry_run show the resolved values: dcgan NS-GAN, Adam 2e-4 (0.5, 0.999); progressive_gan WGAN-GP
+ drift 0.001, Adam 1e-3 (0, 0.99), growing with 800k-image fade-in/stabilise phases; stylegan NS-GAN + R1 gamma 10
every step, Adam 1e-3 (0, 0.99); stylegan2 NS-GAN + lazy R1 gamma 10 every 16 steps + path length 2 every 4, Adam 2e-3
(0, 0.99); sagan hinge, G 1e-4 / D 4e-4, Adam (0, 0.9); acgan as dcgan plus the class loss; biggan hinge, G 5e-5 / D
2e-4, Adam (0, 0.999), 2 D steps per G step, orthogonal regularisation 1e-4 (the BigGAN paper's). Regularisers run on
the eager (uncompiled) networks; lazy ones take their own optimizer step with their weight multiplied by the interval
(StyleGAN2, App. B).
Data: `--dataset celeba` (aligned-and-cropped JPEGs in torchvision's layout), `folder` (any images, recursive, RGB,
labelled by subfolder for --conditional) — both decoded on demand, corrupt files skipped with a warning count —
or the in-memory sets (fashion_mnist, mnist, cifar10) resized to --img_size (MNIST-like 32 is zero-padded).
The run folder, resume, evaluation (--eval_interval, best checkpoint, --only_test) and --delete are gan_mnist.py's
(utils/run.py).
"""

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from losses import AuxClassifierLoss, get_gan_loss, path_lengths, r1_penalty
from losses.gan_steps import clip_critic, d_step_loss, g_step_due, g_step_loss
from metrics.evaluate import loop_evaluator, score_snapshot
from modelling import build_discriminator, build_generator
from modelling.common import latent_batches, recalibrate_batchnorm, standing_batches
from modelling.progressive_gan import growth_at, stage_changed
from modelling.recipes import GanConfig, apply_recipe
from sampling import gan_images
from utils.cli import UserError, script_cli
from utils.data import (
    DATASETS,
    TOY_DATASETS,
    ImageFileDataset,
    build_dataset,
    conditioning_classes,
    select_class,
    to_device,
    train_batches,
)
from utils.dist import set_backends, uncompiled, unwrap, zero_term
from utils.ema import EMA
from utils.grid import save_grid
from utils.optim import make_optimizer, set_hyperparameters, step_optimizer
from utils.run import Run
from utils.tracking import LoopTracker

GRID_COLS = 10  # 10 x 10 grids; conditional grids have one row of 10 per class
STYLE_MODELS = ("stylegan", "stylegan2")  # generators with a mapping network (ws, truncation, path length)
CONDITIONAL_MODELS = ("dcgan", "sagan", "acgan", "biggan")
DCGAN_LIKE = ("dcgan", "acgan")  # DCGAN layers: --sn_gen/--sn_disc and the BatchNorm choice apply
RESUME_KEYS = ("dataset", "img_size", "model", "gen_kwargs", "disc_kwargs", "z_dim", "conditional", "method")
RESUME_KEYS += ("image_class",)
RESUME_KEYS += ("sn_gen", "sn_disc", "optimizer", "r1_interval", "pl_interval", "progressive_growing", "fade_kimg")


@dataclass
class Config(GanConfig):  # the flags of both GAN scripts (modelling/recipes.py), then the ones of this script
    dataset: str = field(default="celeba", metadata={"choices": [d for d in DATASETS if d not in TOY_DATASETS]})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download MNIST-like data"})
    img_size: int = 64
    conditional: bool = field(
        default=False, metadata={"help": "dcgan (CGAN), sagan (CBN + projection D), acgan (needs it), biggan"}
    )
    method: str | None = field(default=None, metadata={"choices": ["gan", "wgan", "wgan-gp", "hinge"]})
    sn_disc: bool = field(default=False, metadata={"help": "dcgan: spectral norm in D, no BatchNorm (SN-GAN)"})
    sn_gen: bool = field(default=False, metadata={"help": "dcgan: spectral norm on every G layer"})
    drift_penalty: float | None = field(default=None, metadata={"help": "ProGAN eps_drift * D(real)^2"})
    r1_gamma: float | None = field(default=None, metadata={"help": "R1 weight gamma (penalty gamma/2 ||grad||^2)"})
    r1_interval: int | None = field(default=None, metadata={"min": 1, "help": "lazy R1: every k D steps, weight x k"})
    pl_weight: float | None = field(default=None, metadata={"help": "path-length weight (style models)"})
    pl_interval: int = field(default=4, metadata={"min": 1, "help": "lazy path length: every k G steps, weight x k"})
    pl_batch_shrink: int = field(default=2, metadata={"min": 1})
    pl_decay: float = 0.01
    progressive_growing: bool = field(default=True, metadata={"help": "progressive_gan: grow from 4x4 with fade-in"})
    fade_kimg: float = field(default=800.0, metadata={"help": "growing: kimg per fade-in and per stable phase"})
    num_workers: int = field(default=4, metadata={"min": 0, "help": "decoding processes for celeba/folder data"})


def gradient_penalised(cfg: Config) -> bool:
    """WGAN-GP or R1: a per-sample gradient penalty on D (after `resolve_config` filled r1_gamma)."""
    return cfg.method == "wgan-gp" or cfg.r1_gamma > 0


def resolve_config(cfg: Config) -> Config:
    """Fill unset flags from the model's recipe (modelling/recipes.py), then refuse combinations that cannot work,
    before anything is written."""
    apply_recipe(cfg, "gan_celeba.py", "gan_mnist.py")  # every model's recipe can be trained here
    cfg.check()  # the run fields, and every "min" bound (now that the model defaults are filled in)
    if cfg.lr <= 0 or cfg.lr_d <= 0:
        raise UserError(f"--lr and --lr_d must be > 0, got {cfg.lr}, {cfg.lr_d}")
    if min(cfg.r1_gamma, cfg.pl_weight, cfg.drift_penalty, cfg.ortho_reg) < 0:
        raise UserError("--r1_gamma, --pl_weight, --drift_penalty and --ortho_reg must be >= 0")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    if cfg.method != "gan" and (cfg.soft_labels or cfg.noisy_labels):
        raise UserError(f"--soft_labels/--noisy_labels apply to --method gan only, not {cfg.method}")
    if not 0 <= cfg.noisy_labels <= 1:
        raise UserError(f"--noisy_labels is a probability in [0, 1], got {cfg.noisy_labels}")
    if cfg.pl_weight > 0 and cfg.model not in STYLE_MODELS:
        raise UserError(
            f"--pl_weight needs a generator with a mapping network ({', '.join(STYLE_MODELS)}), not {cfg.model}"
        )
    if cfg.conditional and cfg.model not in CONDITIONAL_MODELS:
        raise UserError(f"--conditional is supported by {', '.join(CONDITIONAL_MODELS)}, not {cfg.model}")
    if cfg.model == "acgan" and not cfg.conditional:
        raise UserError("--model acgan is class-conditional (D classifies its input): add --conditional")
    if cfg.image_class is not None and cfg.conditional:
        raise UserError("--image_class trains on one label: it cannot be combined with --conditional")
    if cfg.model == "progressive_gan" and "growing" in cfg.gen_kwargs | cfg.disc_kwargs:
        # Both networks and the loop's growth schedule must agree: one flag decides for all three.
        raise UserError("progressive_gan's growing is set by --progressive_growing / --no-progressive_growing, "
                        "not by --gen_kwargs/--disc_kwargs")  # fmt: skip
    if gradient_penalised(cfg) and cfg.model in DCGAN_LIKE and cfg.disc_kwargs.get("norm", "none") == "batch":
        raise UserError("gradient penalties (wgan-gp, R1) need a critic without BatchNorm (they are per sample)")
    return cfg


def build_models(cfg: Config, img_channels: int, n_classes: int):
    common = dict(img_size=cfg.img_size, img_channels=img_channels, n_classes=n_classes)
    gen_kwargs, disc_kwargs = common | dict(z_dim=cfg.z_dim), dict(common)
    if cfg.model in DCGAN_LIKE:
        # A per-sample gradient penalty is invalid with batch statistics: the penalised critic has no BatchNorm.
        # SN-GAN's critic has spectral norm and no BatchNorm either. --disc_kwargs '{"norm": ...}' overrides both.
        gen_kwargs["spectral_norm"] = cfg.sn_gen
        no_bn = gradient_penalised(cfg) or cfg.sn_disc
        disc_kwargs |= dict(spectral_norm=cfg.sn_disc, norm="none" if no_bn else "batch")
    if cfg.model == "progressive_gan":  # without growing, only the full-resolution toRGB/fromRGB are built
        gen_kwargs["growing"] = disc_kwargs["growing"] = cfg.progressive_growing
    gen_kwargs, disc_kwargs = gen_kwargs | cfg.gen_kwargs, disc_kwargs | cfg.disc_kwargs
    try:
        return build_generator(cfg.model, **gen_kwargs), gen_kwargs, build_discriminator(cfg.model, **disc_kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --model {cfg.model}: {e.args[0] if e.args else e}")


def lazy_r1_due(step: int, cfg: Config) -> bool:
    """Lazy R1 (StyleGAN2): its own D step every r1_interval D steps, the first at step 0."""
    return cfg.r1_gamma > 0 and cfg.r1_interval > 1 and step % cfg.r1_interval == 0


def lazy_r1_loss(cfg: Config, critic, reals, labels, scale: float = 1.0):
    """(loss, logged terms) of a lazy R1 step: gamma / 2 * r1_interval * mean ||grad D(real)||^2 (the weight times
    the interval, StyleGAN2 App. B). `critic`: the eager, still DDP-synchronised D; `zero_term` gives every parameter
    a gradient so that DDP's reducer completes (utils/dist.py)."""
    r1 = r1_penalty(critic, reals, labels, scale=scale).mean()
    return cfg.r1_gamma / 2 * cfg.r1_interval * r1 + zero_term(critic), {"penalty/r1": r1}


def pl_step_due(step: int, cfg: Config) -> bool:
    """Path length (StyleGAN2): every pl_interval G steps, the first at G step 0."""
    return (
        cfg.pl_weight > 0
        and g_step_due(step, cfg.train_g_interval)
        and (step // cfg.train_g_interval) % cfg.pl_interval == 0
    )


def pl_step_loss(cfg: Config, gen, zs, pl_mean, scale: float = 1.0, mean_over_processes=lambda x: x):
    """(loss, new running mean a, logged terms) of a path-length step on a batch of latents `zs`: pl_weight *
    pl_interval * mean (||J_w^T y|| - a)^2, with a <- lerp(a, mean length, pl_decay) updated first (StyleGAN2
    Eq. 4, lazy: weight times the interval). `mean_over_processes` averages the lengths' mean over ranks, so that
    every rank keeps the same a. `gen`: the prepared G; ws enter as an input (outputs of a prepared model are
    converted copies under mixed precision)."""
    generator = uncompiled(gen)
    ws = unwrap(gen).make_ws(zs)
    lengths = path_lengths(generator(None, ws=ws), ws, scale=scale)
    pl_mean = torch.lerp(pl_mean, mean_over_processes(lengths.detach().mean()), cfg.pl_decay)
    pl_penalty = (lengths - pl_mean).square().mean()
    loss = cfg.pl_weight * cfg.pl_interval * pl_penalty + zero_term(generator)
    return loss, pl_mean, {"penalty/pl": pl_penalty, "pl_mean": pl_mean}


def penalty_scale(accelerator: Accelerator) -> float:
    """The loss scale that second-order penalties multiply in and divide out again: fp16 takes their terms from
    gradients of the scaled output, then unscales them (PyTorch's AMP recipe); 1 without a scaler."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0


def set_growth_stage(cfg: Config, step: int, images_per_step: int, nets: dict) -> int:
    """Progressive GAN: set G, D and the EMA copy to the growth stage of `step` and return it. The stage is a pure
    function of the images seen, so a run resumed mid-fade re-enters it exactly; Adam's moments restart when a level
    starts or finishes fading in (NVIDIA's reset_opt_for_new_lod), decided from the schedule alone, so a resumed run
    resets at the same steps."""
    gen, disc, ema = unwrap(nets["gen"]), unwrap(nets["disc"]), nets["ema"]
    prev_growth, growth = (growth_at(s * images_per_step, cfg.fade_kimg * 1000, gen.depth) for s in (step - 1, step))
    for net in (gen, disc) + ((ema.module,) if ema else ()):
        net.set_growth(growth)
    if stage_changed(prev_growth, growth):
        for optim in (nets["optim_g"], nets["optim_d"]):
            optim.state.clear()
    return growth


def train_step(cfg: Config, accelerator: Accelerator, nets: dict, loss_fns: tuple, step: int, reals, labels, pl_mean):
    """One training iteration on a batch of `reals`: the D step, the lazy R1 step when due, and every
    train_g_interval D steps the G step with its path-length step when due and the EMA update. Each step's loss
    comes from its named step function. Returns (logged terms, path-length mean a, whether every optimizer step
    was applied)."""
    gen, disc, optim_g, optim_d, ema = (nets[k] for k in ("gen", "disc", "optim_g", "optim_d", "ema"))
    loss_fn, aux_loss = loss_fns
    device, n = accelerator.device, reals.shape[0]
    images_per_step = cfg.batch_size * accelerator.num_processes

    # Discriminator step: fakes from the current G without its graph.
    with torch.no_grad():
        fakes = gen(torch.randn(n, cfg.z_dim, device=device), labels)
    loss_d, d_stats = d_step_loss(cfg, disc, loss_fn, aux_loss, reals, fakes, labels, penalty_scale(accelerator))
    stats = dict(d_stats)
    optim_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    d_applied, _ = step_optimizer(accelerator, optim_d, disc)
    clip_critic(cfg, disc)

    # Lazy R1 (StyleGAN2): its own D step, through the eager DDP module so that its gradients are averaged.
    if lazy_r1_due(step, cfg):
        loss_r1, r1_stats = lazy_r1_loss(cfg, uncompiled(disc), reals, labels, penalty_scale(accelerator))
        optim_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_r1)
        r1_applied, _ = step_optimizer(accelerator, optim_d, disc)
        d_applied = d_applied and r1_applied
        stats |= r1_stats

    # Generator step every train_g_interval D steps; D frozen so only G gets gradients.
    g_applied = True
    if g_step_due(step, cfg.train_g_interval):
        disc.requires_grad_(False)
        loss_g, g_stats = g_step_loss(
            cfg, gen, disc, loss_fn, aux_loss, torch.randn(n, cfg.z_dim, device=device), labels
        )
        stats |= g_stats
        optim_g.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        pl_due = pl_step_due(step, cfg)
        if not (pl_due and cfg.pl_interval == 1):  # at interval 1 the path-length gradient joins this step
            g_applied, _ = step_optimizer(accelerator, optim_g, gen)

        # Path-length regularisation (StyleGAN2) on a smaller batch. Lazy (interval k > 1): its own step; k = 1:
        # its gradient is added to the G step's, one step (as R1 in the D loss).
        if pl_due:
            zs_pl = torch.randn(max(1, n // cfg.pl_batch_shrink), cfg.z_dim, device=device)
            loss_pl, pl_mean, pl_stats = pl_step_loss(
                cfg, gen, zs_pl, pl_mean, penalty_scale(accelerator), lambda x: accelerator.reduce(x, "mean")
            )
            if cfg.pl_interval > 1:
                optim_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_pl)
            pl_applied, _ = step_optimizer(accelerator, optim_g, gen)
            g_applied = g_applied and pl_applied
            stats |= pl_stats
        disc.requires_grad_(True)

        if ema is not None and g_applied:
            ema.update(unwrap(gen), cfg.train_g_interval * images_per_step, (step + 1) * images_per_step)
    return stats, pl_mean, d_applied and g_applied


@torch.no_grad()
def save_grids(cfg: Config, run: Run, step: int, sources: list, eval_generator, n_classes: int, device) -> None:
    """A 10 x 10 grid (one row of 10 per class when conditional) of fixed latents for each (tag, generator) in
    `sources`, drawn by `eval_generator(generator)`, as grids/<tag>-<step>.png."""
    rows = n_classes or GRID_COLS
    zs = torch.randn(rows * GRID_COLS, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    labels = torch.arange(n_classes).repeat_interleave(GRID_COLS).to(device) if n_classes else None
    chunk = standing_batches(cfg.img_size)[1]  # all 100 at once up to 64 px; large images a few at a time
    for tag, source in sources:
        model = eval_generator(source)
        images = torch.cat([model(zs[i : i + chunk], None if labels is None else labels[i : i + chunk])
                            for i in range(0, len(zs), chunk)])  # fmt: skip
        save_grid(images, run.dir / "grids" / f"{tag}-{step:08d}.png", nrow=GRID_COLS)


def main(cfg: Config) -> None:
    cfg = resolve_config(cfg)  # idempotent: parse() already resolved it, tests may pass a raw Config
    suffix = ("_cond" if cfg.conditional else "") + (f"_class{cfg.image_class}" if cfg.image_class is not None else "")
    run = Run(cfg, f"{cfg.dataset}_{cfg.model}_{cfg.method}{suffix}", RESUME_KEYS)
    growing = cfg.model == "progressive_gan" and cfg.progressive_growing

    # Accelerator. A growing network leaves its future levels unused: DDP must be told.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(
        **run.accelerator_kwargs(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=growing)]
    )
    device, is_main = accelerator.device, accelerator.is_main_process
    run.open(accelerator)

    # Data.
    with accelerator.main_process_first():
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download, in_memory=False)
    if cfg.image_class is not None:
        dataset = select_class(dataset, cfg.image_class)
    if cfg.only_test:
        score_snapshot(run, accelerator, dataset)
        return
    n_classes = conditioning_classes(cfg, dataset)
    workers = cfg.num_workers if isinstance(dataset, ImageFileDataset) else 0  # in-memory data needs no decoding
    loader = train_batches(dataset, cfg, accelerator, run.start_step, workers)

    # Models: same init on every rank; EMA and the evaluation copy are made before prepare() wraps anything.
    torch.manual_seed(cfg.seed)
    gen, gen_kwargs, disc = build_models(cfg, dataset.sample_shape[0], n_classes)
    ema = EMA(gen, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    gen_eval = build_generator(cfg.model, **gen_kwargs).to(device)
    if ema is not None:
        ema.module.to(device)
    loss_fn = get_gan_loss(cfg.method)
    aux_loss = AuxClassifierLoss() if cfg.model == "acgan" else None  # AC-GAN: D's class head has its own loss

    # Optimizers (lazy regularisers take their own steps: lr and betas adjusted, utils/optim.py).
    betas = (cfg.beta1, cfg.beta2)
    g_reg_interval = cfg.pl_interval if cfg.pl_weight > 0 else 1
    d_reg_interval = cfg.r1_interval if cfg.r1_gamma > 0 else 1
    optim_g = make_optimizer(cfg.optimizer, gen.parameters(), cfg.lr, betas, g_reg_interval)
    optim_d = make_optimizer(cfg.optimizer, disc.parameters(), cfg.lr_d, betas, d_reg_interval)

    # Prepare.
    gen, disc, optim_g, optim_d = accelerator.prepare(gen, disc, optim_g, optim_d)

    # Resume (pl_mean: the path-length running mean `a`); the current lr and betas are applied again.
    nets = dict(gen=gen, disc=disc, optim_g=optim_g, optim_d=optim_d, ema=ema, scaler=accelerator.scaler)
    resumed = run.restore(**nets)
    set_hyperparameters(optim_g, cfg.lr, betas, g_reg_interval)
    set_hyperparameters(optim_d, cfg.lr_d, betas, d_reg_interval)
    pl_mean = resumed.get("pl_mean", torch.zeros(())).to(device)
    n_params = [sum(p.numel() for p in unwrap(net).parameters()) / 1e6 for net in (gen, disc)]
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    summary = f"{cfg.model} (G {n_params[0]:.2f}M, D {n_params[1]:.2f}M parameters), {cfg.method}"
    run.begin(accelerator, dataset, evaluator, summary)

    def eval_generator(source: torch.nn.Module) -> torch.nn.Module:
        """`gen_eval` holding `source`'s weights (and growth stage) with standing BatchNorm statistics."""
        gen_eval.load_state_dict(unwrap(source).state_dict())
        batches = latent_batches(
            cfg.z_dim, n_classes, *standing_batches(cfg.img_size), seed=cfg.seed + 1, device=device
        )
        return recalibrate_batchnorm(gen_eval, batches)

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    for step in loop.steps():
        stats = {}
        if growing:
            growth = set_growth_stage(cfg, step, images_per_step, nets)
            stats["growth"] = torch.tensor(growth, device=device)  # stacked with the losses: same device
        reals, labels = to_device(next(loader), device, labels=n_classes > 0)
        if growing:
            reals = unwrap(disc).fade_reals(reals)  # reals at the resolution G draws now (NVIDIA's lod blending)
        step_stats, pl_mean, applied = train_step(
            cfg, accelerator, nets, (loss_fn, aux_loss), step, reals, labels, pl_mean
        )
        stats |= step_stats

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, applied, stats)

        # Sample grids; evaluate the EMA generator; save checkpoints (also at a new best evaluation).
        if is_main and run.due(done, cfg.sample_interval):
            sources = [("raw", gen)] + ([("ema", ema.module)] if ema else [])
            save_grids(cfg, run, done, sources, eval_generator, n_classes, device)
        if run.eval_due(done):
            run.evaluate(accelerator, done, gan_images, eval_generator(ema.module if ema else gen), n_classes)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            snapshot = dict(
                kind="gan", model=cfg.model, model_kwargs=gen_kwargs, module=eval_generator(ema.module if ema else gen)
            )
            run.save(
                accelerator, done, replicas=(gen, disc), snapshot=snapshot, **nets, skipped=loop.skips.total,
                pl_mean=pl_mean,
            )  # fmt: skip

    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main, resolve=resolve_config)


if __name__ == "__main__":
    cli()
