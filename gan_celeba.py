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

Flags left unset take the model's published defaults (`MODEL_DEFAULTS`), and config.json records the resolved
values: dcgan NS-GAN, Adam 2e-4 (0.5, 0.999); progressive_gan WGAN-GP + drift 0.001, Adam 1e-3 (0, 0.99), growing
with 800k-image fade-in/stabilise phases; stylegan NS-GAN + R1 gamma 10 every step, Adam 1e-3 (0, 0.99);
stylegan2 NS-GAN + lazy R1 gamma 10 every 16 steps + path length 2 every 4, Adam 2e-3 (0, 0.99); sagan hinge,
G 1e-4 / D 4e-4, Adam (0, 0.9); acgan as dcgan plus the class loss; biggan hinge, G 5e-5 / D 2e-4, Adam (0, 0.999),
2 D steps per G step, orthogonal regularisation 1e-4 (the BigGAN paper's). Regularisers run on the eager
(uncompiled) networks; lazy ones take their own optimizer step with their weight multiplied by the interval
(StyleGAN2, App. B).
Data: `--dataset celeba` (aligned-and-cropped JPEGs in torchvision's layout), `folder` (any images, recursive, RGB,
labelled by subfolder for --conditional) — both decoded on demand, corrupt files skipped with a warning count —
or the in-memory sets (fashion_mnist, mnist, cifar10) resized to --img_size (MNIST-like 32 is zero-padded).
The run folder, resume, evaluation (--eval_interval, best checkpoint, --only_test) and --delete are gan_mnist.py's
(utils/run.py).
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from losses import AuxClassifierLoss, get_gan_loss, gradient_penalty, orthogonal_penalty, path_lengths, r1_penalty
from modelling import GENERATORS, build_discriminator, build_generator
from modelling.common import latent_batches, recalibrate_batchnorm
from modelling.progressive_gan import growth_at, stage_changed
from sampling import gan_images
from utils.cli import UserError, parse, user_errors
from utils.data import DATASETS, TOY_DATASETS, ImageFileDataset, build_dataset, make_loader, select_class, step_seed
from utils.dist import set_backends, uncompiled, unwrap, zero_term
from utils.ema import EMA
from utils.grid import save_grid
from utils.optim import OPTIMIZERS, make_optimizer, set_hyperparameters
from utils.run import Run, RunConfig
from utils.tracking import KimgClock, RunningMeans, SkipCounter, progress, step_optimizer

GRID_COLS = 10  # 10 x 10 grids; conditional grids have one row of 10 per class
STYLE_MODELS = ("stylegan", "stylegan2")  # generators with a mapping network (ws, truncation, path length)
# Per-model defaults for flags left unset (papers / seed 003 / StyleGAN2-ADA's stylegan2 config).
MODEL_DEFAULTS = {
    "dcgan": dict(method="gan", lr=2e-4, beta1=0.5, beta2=0.999),
    "progressive_gan": dict(method="wgan-gp", drift_penalty=0.001, lr=1e-3, beta1=0.0, beta2=0.99),
    "stylegan": dict(method="gan", r1_gamma=10.0, r1_interval=1, lr=1e-3, beta1=0.0, beta2=0.99),
    "stylegan2": dict(method="gan", r1_gamma=10.0, r1_interval=16, pl_weight=2.0, lr=2e-3, beta1=0.0, beta2=0.99),
    "sagan": dict(method="hinge", lr=1e-4, lr_d=4e-4, beta1=0.0, beta2=0.9),
    "acgan": dict(method="gan", lr=2e-4, beta1=0.5, beta2=0.999),  # AC-GAN paper: Adam 2e-4, beta1 0.5
    "biggan": dict(method="hinge", lr=5e-5, lr_d=2e-4, beta1=0.0, beta2=0.999, train_g_interval=2, ortho_reg=1e-4),
}
FALLBACKS = dict(drift_penalty=0.0, r1_gamma=0.0, r1_interval=1, pl_weight=0.0, train_g_interval=1, ortho_reg=0.0)
CONDITIONAL_MODELS = ("dcgan", "sagan", "acgan", "biggan")
DCGAN_LIKE = ("dcgan", "acgan")  # DCGAN layers: --sn_gen/--sn_disc and the BatchNorm choice apply
RESUME_KEYS = ("dataset", "img_size", "model", "gen_kwargs", "disc_kwargs", "z_dim", "conditional", "method")
RESUME_KEYS += ("image_class",)
RESUME_KEYS += ("sn_gen", "sn_disc", "optimizer", "r1_interval", "pl_interval", "progressive_growing", "fade_kimg")


@dataclass
class Config(RunConfig):
    dataset: str = field(default="celeba", metadata={"choices": [d for d in DATASETS if d not in TOY_DATASETS]})
    data_dir: str = field(default="data", metadata={"help": "looked up first; then system copies; then download"})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download MNIST-like data"})
    img_size: int = 64
    model: str = field(default="dcgan", metadata={"choices": sorted(GENERATORS)})
    gen_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the generator"})
    disc_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the discriminator"})
    z_dim: int = 128
    conditional: bool = field(
        default=False, metadata={"help": "dcgan (CGAN), sagan (CBN + projection D), acgan (needs it), biggan"}
    )
    image_class: int | None = field(default=None, metadata={"help": "train on this label only (Ganzo)"})
    method: str | None = field(default=None, metadata={"choices": ["gan", "wgan", "wgan-gp", "hinge"]})
    gp_lambda: float = field(default=10.0, metadata={"help": "WGAN-GP penalty weight"})
    clip_value: float = field(default=0.01, metadata={"help": "WGAN critic weight clipping"})
    drift_penalty: float | None = field(default=None, metadata={"help": "ProGAN eps_drift * D(real)^2"})
    r1_gamma: float | None = field(default=None, metadata={"help": "R1 weight gamma (penalty gamma/2 ||grad||^2)"})
    r1_interval: int | None = field(default=None, metadata={"min": 1, "help": "lazy R1: every k D steps, weight x k"})
    pl_weight: float | None = field(default=None, metadata={"help": "path-length weight (style models)"})
    pl_interval: int = field(default=4, metadata={"min": 1, "help": "lazy path length: every k G steps, weight x k"})
    pl_batch_shrink: int = field(default=2, metadata={"min": 1})
    pl_decay: float = 0.01
    sn_disc: bool = field(default=False, metadata={"help": "dcgan: spectral norm in D, no BatchNorm (SN-GAN)"})
    sn_gen: bool = field(default=False, metadata={"help": "dcgan: spectral norm on every G layer"})
    ortho_reg: float | None = field(default=None, metadata={"help": "orthogonal regularisation beta on G (BigGAN)"})
    progressive_growing: bool = field(default=True, metadata={"help": "progressive_gan: grow from 4x4 with fade-in"})
    fade_kimg: float = field(default=800.0, metadata={"help": "growing: kimg per fade-in and per stable phase"})
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
    ema_halflife_kimg: float = 10.0
    ema_rampup: float = field(default=0.05, metadata={"min": 0, "help": "half-life <= ratio x images seen; 0 = off"})
    num_workers: int = field(default=4, metadata={"min": 0, "help": "decoding processes for celeba/folder data"})


def gradient_penalised(cfg: Config) -> bool:
    """WGAN-GP or R1: a per-sample gradient penalty on D (after `resolve_config` filled r1_gamma)."""
    return cfg.method == "wgan-gp" or cfg.r1_gamma > 0


def resolve_config(cfg: Config) -> Config:
    """Fill unset flags from MODEL_DEFAULTS, then refuse combinations that cannot work, before anything is written."""
    defaults = FALLBACKS | MODEL_DEFAULTS[cfg.model]
    if cfg.lr_d is None:  # the model's TTUR rate, unless --lr was given alone (then both networks use it)
        cfg.lr_d = cfg.lr if cfg.lr is not None else defaults.get("lr_d", defaults["lr"])
    unset = ("method", "drift_penalty", "r1_gamma", "r1_interval", "pl_weight", "lr", "beta1", "beta2")
    for name in unset + ("train_g_interval", "ortho_reg"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, defaults[name])
    cfg.check()  # the run fields, and every "min" bound (now that the model defaults are filled in)
    if cfg.lr <= 0 or cfg.lr_d <= 0:
        raise UserError(f"--lr and --lr_d must be > 0, got {cfg.lr}, {cfg.lr_d}")
    if min(cfg.r1_gamma, cfg.pl_weight, cfg.drift_penalty, cfg.ortho_reg) < 0:
        raise UserError("--r1_gamma, --pl_weight, --drift_penalty and --ortho_reg must be >= 0")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
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


def main(cfg: Config) -> None:
    cfg = resolve_config(cfg)  # idempotent: parse() already resolved it, tests may pass a raw Config
    suffix = ("_cond" if cfg.conditional else "") + (f"_class{cfg.image_class}" if cfg.image_class is not None else "")
    run = Run(cfg, f"{cfg.dataset}_{cfg.model}_{cfg.method}{suffix}", RESUME_KEYS)
    growing = cfg.model == "progressive_gan" and cfg.progressive_growing
    lazy_r1 = cfg.r1_gamma > 0 and cfg.r1_interval > 1

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
        run.test(accelerator, dataset)
        return
    if cfg.conditional and not dataset.n_classes:
        raise UserError(f"--conditional needs labelled data; {cfg.dataset} at {cfg.data_dir} has no classes")
    n_classes = dataset.n_classes if cfg.conditional else 0
    workers = cfg.num_workers if isinstance(dataset, ImageFileDataset) else 0  # in-memory data needs no decoding
    loader = iter(
        make_loader(
            dataset,
            cfg.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            cfg.seed,
            run.start_step,
            workers,
        )
    )

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
    d_reg_interval = cfg.r1_interval if lazy_r1 else 1
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
    run.begin(
        accelerator, dataset, f"{cfg.model} (G {n_params[0]:.2f}M, D {n_params[1]:.2f}M parameters), {cfg.method}"
    )

    def eval_generator(source: torch.nn.Module) -> torch.nn.Module:
        """`gen_eval` holding `source`'s weights (and growth stage) with standing BatchNorm statistics."""
        gen_eval.load_state_dict(unwrap(source).state_dict())
        return recalibrate_batchnorm(gen_eval, latent_batches(cfg.z_dim, n_classes, seed=cfg.seed + 1, device=device))

    @torch.no_grad()
    def save_grids(step: int) -> None:
        rows = n_classes or GRID_COLS
        zs = torch.randn(rows * GRID_COLS, cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        labels = torch.arange(n_classes).repeat_interleave(GRID_COLS).to(device) if n_classes else None
        for tag, source in [("raw", gen)] + ([("ema", ema.module)] if ema else []):
            save_grid(eval_generator(source)(zs, labels), run.dir / "grids" / f"{tag}-{step:08d}.png", nrow=GRID_COLS)

    def judge(images: torch.Tensor, labels: torch.Tensor | None):
        """D's source logits (N,) and, for AC-GAN, its class logits (N, n_classes) (else None)."""
        return disc(images, labels, aux=True) if aux_loss else (disc(images, labels), None)

    def penalty_scale() -> float:
        # fp16: second-order terms are taken from gradients of the scaled output, then unscaled (PyTorch's AMP recipe)
        return accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    meters, clock = RunningMeans(), KimgClock(run.start_step, images_per_step)
    skips = SkipCounter(cfg.max_skipped_steps, run.dir / "states", resumed.get("skipped", 0))
    pbar = progress(
        range(run.start_step, cfg.n_steps), is_main, initial=run.start_step, total=cfg.n_steps, desc=run.dir.name
    )
    for step in pbar:
        torch.manual_seed(step_seed(cfg.seed, accelerator.process_index, step))
        stats = {}
        if growing:
            # The stage is a pure function of the images seen: resuming mid-fade re-enters it exactly.
            prev_growth, growth = (
                growth_at(s * images_per_step, cfg.fade_kimg * 1000, unwrap(gen).depth) for s in (step - 1, step)
            )
            for net in (unwrap(gen), unwrap(disc)) + ((ema.module,) if ema else ()):
                net.set_growth(growth)
            stats["growth"] = torch.tensor(growth, device=device)  # stacked with the losses: same device
            # Adam's moments restart when a level starts or finishes fading in (NVIDIA's reset_opt_for_new_lod),
            # decided from the schedule alone, so a resumed run resets at the same steps.
            if stage_changed(prev_growth, growth):
                for optim in (optim_g, optim_d):
                    optim.state.clear()
        reals, labels = next(loader)
        reals = reals.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if n_classes else None
        if growing:
            reals = unwrap(disc).fade_reals(reals)  # reals at the resolution G draws now (NVIDIA's lod blending)
        n = reals.shape[0]

        # Discriminator step: fakes from the current G without its graph.
        with torch.no_grad():
            fakes = gen(torch.randn(n, cfg.z_dim, device=device), labels)
        (d_reals, c_reals), (d_fakes, c_fakes) = judge(reals, labels), judge(fakes, labels)
        loss_d = loss_fn.d_loss(d_reals, d_fakes).mean()
        stats |= {"loss/d": loss_d, "d/real": d_reals.mean(), "d/fake": d_fakes.mean()}
        if aux_loss:  # AC-GAN: D also learns the class of reals (their labels) and of fakes (the labels drawn)
            loss_class = aux_loss.d_loss(c_reals, c_fakes, labels, labels).mean()
            loss_d = loss_d + loss_class
            stats |= {"loss/d_class": loss_class, "d/class_acc": (c_reals.argmax(1) == labels).float().mean()}
        if cfg.drift_penalty > 0:  # ProGAN: keeps the critic's outputs near 0
            drift = d_reals.float().square().mean()
            loss_d = loss_d + cfg.drift_penalty * drift
            stats["penalty/drift"] = drift
        if cfg.method == "wgan-gp":
            gp = gradient_penalty(unwrap(disc), reals, fakes, labels, scale=penalty_scale()).mean()
            loss_d = loss_d + cfg.gp_lambda * gp
            stats["penalty/gp"] = gp
        if cfg.r1_gamma > 0 and not lazy_r1:  # R1 every step (StyleGAN)
            r1 = r1_penalty(unwrap(disc), reals, labels, scale=penalty_scale()).mean()
            loss_d = loss_d + cfg.r1_gamma / 2 * r1
            stats["penalty/r1"] = r1
        optim_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        d_applied, _ = step_optimizer(accelerator, optim_d, disc)
        if cfg.method == "wgan":  # clip after the update (WGAN Algorithm 1), every critic parameter
            with torch.no_grad():
                for p in disc.parameters():
                    p.clamp_(-cfg.clip_value, cfg.clip_value)

        # Lazy R1 (StyleGAN2): its own D step every r1_interval steps, weight multiplied by the interval. It runs
        # through the eager DDP module so that its gradients are averaged (`zero_term`: see utils/dist.py).
        if lazy_r1 and step % cfg.r1_interval == 0:
            critic = uncompiled(disc)
            r1 = r1_penalty(critic, reals, labels, scale=penalty_scale()).mean()
            loss_r1 = cfg.r1_gamma / 2 * cfg.r1_interval * r1 + zero_term(critic)
            optim_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_r1)
            r1_applied, _ = step_optimizer(accelerator, optim_d, disc)
            d_applied = d_applied and r1_applied
            stats["penalty/r1"] = r1

        # Generator step every train_g_interval D steps; D frozen so only G gets gradients.
        g_applied = True
        if step % cfg.train_g_interval == 0:
            disc.requires_grad_(False)
            d_fakes, c_fakes = judge(gen(torch.randn(n, cfg.z_dim, device=device), labels), labels)
            loss_g = loss_fn.g_loss(d_fakes).mean()
            if aux_loss:  # AC-GAN: G wants its fakes classified as the labels they were drawn for
                loss_g_class = aux_loss.g_loss(c_fakes, labels).mean()
                loss_g = loss_g + loss_g_class
                stats["loss/g_class"] = loss_g_class
            if cfg.ortho_reg > 0:  # BigGAN: push G's filters towards orthogonality (norms left free)
                ortho = orthogonal_penalty(unwrap(gen))
                loss_g = loss_g + cfg.ortho_reg * ortho
                stats["penalty/ortho"] = ortho
            optim_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            pl_due = cfg.pl_weight > 0 and (step // cfg.train_g_interval) % cfg.pl_interval == 0
            if not (pl_due and cfg.pl_interval == 1):  # at interval 1 the path-length gradient joins this step
                g_applied, _ = step_optimizer(accelerator, optim_g, gen)
            stats["loss/g"] = loss_g

            # Path-length regularisation (StyleGAN2): every pl_interval G steps, on a smaller batch, with the
            # running mean `a` averaged over processes so that every rank keeps the same value. Lazy (interval k > 1):
            # its own step, weight x k; k = 1: its gradient is added to the G step's, one step (as R1 in the D loss).
            if pl_due:
                generator = uncompiled(gen)
                n_pl = max(1, n // cfg.pl_batch_shrink)
                # ws enter as an input: outputs of a prepared model are converted copies under mixed precision
                ws = unwrap(gen).make_ws(torch.randn(n_pl, cfg.z_dim, device=device))
                images = generator(None, ws=ws)
                lengths = path_lengths(images, ws, scale=penalty_scale())
                pl_mean = torch.lerp(pl_mean, accelerator.reduce(lengths.detach().mean(), "mean"), cfg.pl_decay)
                pl_penalty = (lengths - pl_mean).square().mean()
                loss_pl = cfg.pl_weight * cfg.pl_interval * pl_penalty + zero_term(generator)
                if cfg.pl_interval > 1:
                    optim_g.zero_grad(set_to_none=True)
                accelerator.backward(loss_pl)
                pl_applied, _ = step_optimizer(accelerator, optim_g, gen)
                g_applied = g_applied and pl_applied
                stats |= {"penalty/pl": pl_penalty, "pl_mean": pl_mean}
            disc.requires_grad_(True)

            if ema is not None and g_applied:
                ema.update(unwrap(gen), cfg.train_g_interval * images_per_step, (step + 1) * images_per_step)
        meters.add(**stats)
        skips.update(d_applied and g_applied, step)

        # Log.
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.n_steps:
            run.log(accelerator, done, clock.tick(done) | meters.pop(accelerator) | {"skipped": skips.total})

        # Sample grids; evaluate the EMA generator; save checkpoints (also at a new best evaluation).
        if is_main and cfg.sample_interval and (done % cfg.sample_interval == 0 or done == cfg.n_steps):
            save_grids(done)
        if cfg.eval_interval and (done % cfg.eval_interval == 0 or done == cfg.n_steps):
            run.evaluate(accelerator, done, gan_images, eval_generator(ema.module if ema else gen), n_classes)
        if done % cfg.checkpoint_interval == 0 or done == cfg.n_steps or run.new_best:
            snapshot = dict(
                kind="gan", model=cfg.model, model_kwargs=gen_kwargs, module=eval_generator(ema.module if ema else gen)
            )
            run.save(
                accelerator, done, replicas=(gen, disc), snapshot=snapshot, **nets, skipped=skips.total, pl_mean=pl_mean
            )

    accelerator.end_training()
    run.close()


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line (or `argv`) and run; bad input ends with one line on stderr and exit code 2."""
    with user_errors(Path(__file__).name):
        main(parse(Config, argv, description=__doc__.split("\n")[0], resolve=resolve_config))


if __name__ == "__main__":
    cli()
