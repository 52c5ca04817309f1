"""Train ScoreGAN (GPM: Franceschi et al. 2023, arXiv 2305.16150, Sec. 4.2): a generator moved by the difference of
a frozen data score (a diffusion_train.py EDM snapshot) and the score of its own samples, learnt alongside it.

    python score_gan.py --data_score logs/gaussians_edm_mlp                  # GPM's 2-D setting (MLP generator)
    python score_gan.py --data_score logs/mnist_edm_ddpmpp-small             # GPM's MNIST setting (DCGAN generator)
    python score_gan.py --config configs/gpm/score_gan_mnist.yaml --data_score logs/mnist_edm
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] score_gan.py ...
    torchrun --nproc_per_node 2 score_gan.py ...                             # also on CPU (gloo)
    python score_gan.py ... --resume latest                                  # continue bit-exactly
    python sample.py --checkpoint logs/<run> --n_samples 1000 --out_dir samples/score_gan     # one pass, NFE 1
    python fid.py --mode gen --img_folder samples/score_gan --detector fmnist --dest stats/score_gan

Both sides are EDM denoisers D(x; sigma) (x + sigma·n noise, modelling/precond.py), whose sigma-scaled score is
(D(x; sigma) - x)/sigma. Each step (GPM `ScoreGAN.training_step`): the generator score D_gen takes one denoising step
on fresh generator samples (losses/particle.py: no lambda(sigma) weight, as GPM); every --score_steps steps the
generator then takes one step on the surrogate sum G(z)~·sg[w_gen·S_gen - w_data·S_data]. Noise levels follow GPM's
law, EDM's sampling grid made continuous (--sigma_min, --sigma_max, --rho). D_gen is the data score's network with
GPM's D_gen settings for the data and then --score_kwargs on top, freshly initialised. Flags left unset take GPM's
settings for the data (`GPM_SETTINGS`); the dataset and image size default to the data score's (FD evaluation and
the sample shape; no real image is trained on). The run folder, resume, evaluation (--eval_interval: FD of the EMA
or raw generator), --only_test and --delete are gan_mnist.py's (utils/run.py).
"""

import copy
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from losses.particle import generator_score_loss, score_gan_loss, score_gan_sigma
from metrics.evaluate import loop_evaluator, score_snapshot
from modelling import SCORE_GAN_GENERATORS, build_denoiser, build_score_gan_generator
from modelling.common import latent_batches, recalibrate_batchnorm
from sampling import gan_images
from utils.ckpt import build_from_snapshot, load_snapshot, tensors_sha256
from utils.cli import UserError, script_cli
from utils.data import DATASETS, TOY_DATASETS, build_dataset
from utils.dist import set_backends, unwrap
from utils.ema import EMA, EmaConfig
from utils.grid import save_grid, save_scatter
from utils.optim import set_hyperparameters, step_optimizer
from utils.run import Run, RunConfig
from utils.tracking import LoopTracker

GRID_ROWS = 10
SCATTER_POINTS = 4000
# GPM's config/score_gan/{gaussians,mnist,celeba}/config.yaml: the values of every flag left unset. All use Adam with
# PyTorch's default betas, generator lr 2e-4, w_data = w_gen = 1 (mnist config2: w_data 2). score_kwargs: D_gen's
# network on top of the data score's (GPM's MNIST D_gen is a 64-channel, 2-block DDPM++; its D_data 16 and 1).
GPM_SETTINGS = {
    "gaussians": dict(model="mlp", sigma_min=0.1, sigma_max=10.0, rho=3.0, score_steps=10, batch_size=128,
                      n_steps=31_500, lr_score=2e-4, score_kwargs={}),
    "mnist": dict(model="dcgan", sigma_min=0.32, sigma_max=40.0, rho=3.0, score_steps=1, batch_size=256,
                  n_steps=100_000, lr_score=1e-3,
                  score_kwargs={"model_channels": 64, "num_blocks": 2, "dropout": 0.13}),
    "celeba": dict(model="dcgan", sigma_min=0.32, sigma_max=40.0, rho=3.0, score_steps=4, batch_size=32,
                   n_steps=600_000, lr_score=4e-4,
                   score_kwargs={"model_channels": 128, "num_blocks": 2, "dropout": 0.0}),
}  # fmt: skip
# A resumed run must match these (and the data score's weights); lr, n_steps, intervals may change, with a note.
RESUME_KEYS = ("dataset", "img_size", "model", "gen_kwargs", "z_dim", "score_kwargs", "score_steps")


@dataclass
class Config(EmaConfig, RunConfig):
    data_score: str = field(default="", metadata={"help": "diffusion_train.py EDM snapshot, or its run folder"})
    dataset: str | None = field(default=None, metadata={"choices": DATASETS, "help": "default: the data score's"})
    data_dir: str | None = field(default=None, metadata={"help": "default: the data score's"})
    download: bool = True
    img_size: int | None = field(default=None, metadata={"help": "default: the data score's; must match it"})
    model: str | None = field(default=None, metadata={"choices": sorted(SCORE_GAN_GENERATORS), "help": "generator"})
    gen_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the generator"})
    z_dim: int = 128
    score_kwargs: dict = field(
        default_factory=dict, metadata={"help": "JSON: D_gen's network kwargs over GPM's D_gen over the data score's"}
    )
    sigma_min: float | None = field(default=None, metadata={"help": "training noise law (GPM: 2-D 0.1, images 0.32)"})
    sigma_max: float | None = field(default=None, metadata={"help": "(GPM: 2-D 10, images 40)"})
    rho: float | None = field(default=None, metadata={"help": "(GPM: 3)"})
    score_steps: int | None = field(default=None, metadata={"min": 1, "help": "D_gen steps per generator step"})
    w_data: float = field(default=1.0, metadata={"help": "weight of the data score"})
    w_gen: float = field(default=1.0, metadata={"help": "weight of the generator score"})
    gen_loss_scale: float = field(default=1.0, metadata={"help": "multiplies the generator loss (once; GPM: twice)"})
    batch_size: int | None = field(default=None, metadata={"min": 1, "help": "per process"})
    n_steps: int | None = field(default=None, metadata={"min": 1, "help": "score steps; default GPM's"})
    lr: float = field(default=2e-4, metadata={"help": "generator learning rate"})
    lr_score: float | None = field(default=None, metadata={"help": "D_gen learning rate"})
    beta1: float = 0.9
    beta2: float = 0.999
    ema: bool = field(default=False, metadata={"help": "keep an EMA generator; grids, evaluation, snapshots use it"})


def gpm_settings(dataset: str) -> dict:
    return GPM_SETTINGS["gaussians" if dataset in TOY_DATASETS else "celeba" if dataset == "celeba" else "mnist"]


def resolve_config(cfg: Config, data_meta: dict | None = None) -> Config:
    """Fill the data from the data score's snapshot and unset flags with GPM's settings for the data, then refuse
    what cannot work, before anything is written."""
    if data_meta is None and cfg.dataset is None:
        if not cfg.data_score:
            raise UserError("--data_score is required: a diffusion_train.py EDM snapshot or run folder")
        data_meta = load_snapshot(cfg.data_score)[0]
    score_cfg = data_meta["config"] if data_meta is not None else {}
    cfg.dataset = cfg.dataset or score_cfg.get("dataset")
    cfg.data_dir = cfg.data_dir or score_cfg.get("data_dir") or "data"
    cfg.img_size = cfg.img_size or score_cfg.get("img_size") or (64 if cfg.dataset == "celeba" else 32)
    for name, value in gpm_settings(cfg.dataset).items():
        if name == "score_kwargs":  # D_gen: GPM's for the data, then the flag's keys on top (idempotent)
            cfg.score_kwargs = copy.deepcopy(value) | cfg.score_kwargs
        elif getattr(cfg, name) is None:
            setattr(cfg, name, value)
    cfg.check()
    if (cfg.dataset in TOY_DATASETS) != (cfg.model == "mlp"):
        raise UserError(
            f"--model {cfg.model} does not fit --dataset {cfg.dataset}: 2-D toy data takes --model mlp, images a "
            "convolutional generator"
        )
    if not 0 < cfg.sigma_min < cfg.sigma_max or cfg.rho <= 0:
        raise UserError(f"need 0 < --sigma_min < --sigma_max and --rho > 0, got {cfg.sigma_min}, {cfg.sigma_max}")
    if min(cfg.lr, cfg.lr_score, cfg.gen_loss_scale) <= 0 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError("--lr, --lr_score and --gen_loss_scale must be > 0, --beta1 and --beta2 in [0, 1)")
    return cfg


def load_data_score(path: str):
    """The frozen data denoiser, its snapshot metadata and the SHA-256 of its weights. It must be an unconditional
    EDM denoiser (ScoreGAN perturbs samples as x + sigma·n, EDM's noise)."""
    meta, state_dict = load_snapshot(path)
    if meta["kind"] != "diffusion" or meta["model"] != "edm":
        raise UserError(
            f"--data_score {meta['path']}: a {meta['kind']!r} snapshot of {meta['model']!r}; the data score must be "
            "a diffusion_train.py --method edm snapshot"
        )
    denoiser = build_from_snapshot(meta, state_dict, build_denoiser)
    if denoiser.n_classes:
        raise UserError(f"--data_score {meta['path']}: class-conditional; ScoreGAN needs an unconditional score")
    # Eval mode: the data score is one fixed function (its dropout off). GPM's D_data is a submodule of its model and
    # follows model.train(), so its dropout (0.13 in GPM's MNIST data score) stays on in every generator step.
    return denoiser.eval().requires_grad_(False), meta, tensors_sha256(sorted(denoiser.state_dict().items()))


def build_models(cfg: Config, data_meta: dict, sample_shape: tuple[int, ...]):
    """The generator and D_gen (the data score's network with --score_kwargs), and the kwargs that rebuild them."""
    shape = (
        dict(dim=sample_shape[0])
        if len(sample_shape) == 1
        else dict(img_size=cfg.img_size, img_channels=sample_shape[0])
    )
    gen_kwargs = shape | dict(z_dim=cfg.z_dim) | cfg.gen_kwargs
    score_kwargs = copy.deepcopy(data_meta["model_kwargs"])
    score_kwargs["net_kwargs"] |= cfg.score_kwargs
    try:
        gen = build_score_gan_generator(cfg.model, **gen_kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --model {cfg.model} with {cfg.gen_kwargs}: {e.args[0] if e.args else e}")
    try:
        score_net = build_denoiser("edm", **score_kwargs)
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build D_gen with --score_kwargs {cfg.score_kwargs}: {e.args[0] if e.args else e}")
    return gen, gen_kwargs, score_net


def score_step_loss(score_net, gen, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D_gen's loss (GPM `forward_score_noise`): denoising score matching, mean over the batch of the per-sample sum
    of (D_gen(x + sigma·n; sigma) - x)² on generator samples x = G(z) drawn without G's graph (G gets no gradient)."""
    with torch.no_grad():
        fakes = gen(z)
    return generator_score_loss(score_net, fakes, sigma).mean()


def generator_step_loss(
    gen, data_score, score_net, z: torch.Tensor, sigma: torch.Tensor, w_data: float, w_gen: float, gen_loss_scale: float
) -> torch.Tensor:
    """The generator's loss (GPM `forward_generator`, paper Eq. 13): gen_loss_scale x the batch mean of the surrogate
    sum x~·sg[w_gen·S_gen(x~) - w_data·S_data(x~)] at x~ = G(z) + sigma·n. Both scores are held fixed: only G gets
    gradients, and they move its samples along sigma·(w_data ∇log p_data - w_gen ∇log p_gen)."""
    fakes = gen(z)
    return gen_loss_scale * score_gan_loss(fakes, data_score, unwrap(score_net), sigma, w_data, w_gen).mean()


def is_generator_step(step: int, score_steps: int) -> bool:
    """GPM's schedule: one generator step after every `score_steps` score steps (0-based steps K_s - 1, 2 K_s - 1)."""
    return (step + 1) % score_steps == 0


def main(cfg: Config) -> None:
    if not cfg.data_score:
        raise UserError("--data_score is required: a diffusion_train.py EDM snapshot or run folder")
    data_score, data_meta, data_sha = load_data_score(cfg.data_score)
    cfg = resolve_config(cfg, data_meta)
    run = Run(cfg, f"{cfg.dataset}_score_gan", RESUME_KEYS)

    # Accelerator: mixed precision, DDP and torch.compile come from the flags or from `accelerate launch`.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(**run.accelerator_kwargs())
    device, is_main = accelerator.device, accelerator.is_main_process
    run.open(accelerator)

    # Data: only for the sample shape and the evaluation's reference; ScoreGAN never trains on real samples.
    with accelerator.main_process_first():
        dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.img_size, download=cfg.download)
    if cfg.only_test:
        score_snapshot(run, accelerator, dataset)
        return
    if tuple(dataset.sample_shape) != data_score.sample_shape:
        raise UserError(
            f"--dataset {cfg.dataset} at --img_size {cfg.img_size} gives samples of shape "
            f"{tuple(dataset.sample_shape)}, but the data score models {data_score.sample_shape}"
        )

    # Models: the frozen data score, the generator and its score D_gen. Same init on every rank; the EMA and the
    # evaluation copy are made before prepare() wraps anything.
    data_score.to(device)
    torch.manual_seed(cfg.seed)
    gen, gen_kwargs, score_net = build_models(cfg, data_meta, tuple(dataset.sample_shape))
    ema = EMA(gen, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    gen_eval = build_score_gan_generator(cfg.model, **gen_kwargs).to(device)  # scratch copy for grids and snapshots
    if ema is not None:
        ema.module.to(device)

    # Optimizers: Adam with the same betas for both, as GPM.
    optim_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    optim_s = torch.optim.Adam(score_net.parameters(), lr=cfg.lr_score, betas=(cfg.beta1, cfg.beta2))

    # Prepare.
    gen, score_net, optim_g, optim_s = accelerator.prepare(gen, score_net, optim_g, optim_s)

    # Resume: the saved groups carry the old lr and betas; the data score must be the same.
    stateful = dict(gen=gen, score_net=score_net, optim_g=optim_g, optim_s=optim_s, ema=ema, scaler=accelerator.scaler)
    resumed = run.restore(**stateful)
    if resumed and resumed["data_score_sha256"] != data_sha:
        raise UserError(f"cannot resume: --data_score {data_meta['path']} is not the score this run started from")
    set_hyperparameters(optim_g, cfg.lr, (cfg.beta1, cfg.beta2))
    set_hyperparameters(optim_s, cfg.lr_score, (cfg.beta1, cfg.beta2))
    sizes = [sum(p.numel() for p in unwrap(m).parameters()) / 1e6 for m in (gen, score_net, data_score)]
    evaluator = loop_evaluator(run, accelerator, dataset)  # --eval_interval's FD metric; None: no FD in the loop
    summary = "generator {:.2f}M, D_gen {:.2f}M, D_data {:.2f}M parameters".format(*sizes)
    run.begin(accelerator, dataset, evaluator, summary)

    def eval_generator(source: torch.nn.Module) -> torch.nn.Module:
        """`gen_eval` holding `source`'s weights with standing BatchNorm statistics: batch-independent outputs."""
        gen_eval.load_state_dict(unwrap(source).state_dict())
        return recalibrate_batchnorm(gen_eval, latent_batches(cfg.z_dim, 0, seed=cfg.seed + 1, device=device))

    @torch.no_grad()
    def save_grids(step: int) -> None:
        toy = len(dataset.sample_shape) == 1
        seeds = list(range(SCATTER_POINTS if toy else GRID_ROWS**2))
        for tag, source in [("raw", gen)] + ([("ema", ema.module)] if ema else []):
            samples, _ = gan_images(eval_generator(source), seeds, None, device)
            path = run.dir / "grids" / f"{tag}-{step:08d}.png"
            save_scatter(samples, path) if toy else save_grid(samples, path, nrow=GRID_ROWS)

    def sigmas(n: int) -> torch.Tensor:
        return score_gan_sigma(n, cfg.sigma_min, cfg.sigma_max, cfg.rho, device)

    # Loop.
    images_per_step = cfg.batch_size * accelerator.num_processes
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    for step in loop.steps():
        n = cfg.batch_size

        # Score step: D_gen learns the score of the current generator's samples (drawn without G's graph).
        z, sigma = torch.randn(n, cfg.z_dim, device=device), sigmas(n)
        loss_s = score_step_loss(score_net, gen, z, sigma)
        optim_s.zero_grad(set_to_none=True)
        accelerator.backward(loss_s)
        s_applied, _ = step_optimizer(accelerator, optim_s, score_net)
        stats = {"loss/score": loss_s}

        # Generator step, every `score_steps` score steps (GPM: at k = K_s, 2 K_s, ...): both scores at fresh noisy
        # samples, neither in the backward graph; only G gets gradients. GPM applies gen_loss_scale twice; here once.
        g_applied = True
        if is_generator_step(step, cfg.score_steps):
            z, sigma = torch.randn(n, cfg.z_dim, device=device), sigmas(n)
            with accelerator.autocast():  # the frozen data score is not prepared: autocast it here
                loss_g = generator_step_loss(
                    gen, data_score, score_net, z, sigma, cfg.w_data, cfg.w_gen, cfg.gen_loss_scale
                )
            optim_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            g_applied, _ = step_optimizer(accelerator, optim_g, gen)
            stats["loss/g"] = loss_g

            # Update EMA, only after an update that really happened.
            if ema is not None and g_applied:
                ema.update(unwrap(gen), cfg.score_steps * images_per_step, (step + 1) * images_per_step)

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, s_applied and g_applied, stats)

        # Sample grids; evaluate the EMA (or raw) generator; save checkpoints (also at a new best evaluation). The
        # data score never changes: its weights are checked against their hash at every checkpoint.
        if is_main and run.due(done, cfg.sample_interval):
            save_grids(done)
        if run.eval_due(done):
            run.evaluate(accelerator, done, gan_images, eval_generator(ema.module if ema else gen), 0)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            if tensors_sha256(sorted(data_score.state_dict().items())) != data_sha:
                raise RuntimeError("the data score's weights changed during training")  # a bug, never a user error
            snapshot = dict(
                kind="score_gan", model=cfg.model, model_kwargs=gen_kwargs,
                module=eval_generator(ema.module if ema else gen), extra={"data_score": data_meta["path"]},
            )  # fmt: skip
            run.save(
                accelerator, done, replicas=(gen, score_net), snapshot=snapshot, **stateful,
                data_score_sha256=data_sha, skipped=loop.skips.total,
            )  # fmt: skip

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main, resolve=resolve_config)


if __name__ == "__main__":
    cli()
