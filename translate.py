"""Image-to-image translation: pix2pix on paired data, CycleGAN on unpaired data.

    python translate.py --model pix2pix --dataset paired --data_dir facades/train --eval_dir facades/val \
        --direction BtoA --img_size 256 --n_steps 40000 --eval_interval 2000
    python translate.py --model cyclegan --dataset unpaired --data_dir horse2zebra --eval_dir horse2zebra \
        --img_size 256 --n_steps 266000            # 200 epochs of 1,334 horses at batch 1, as the paper
    python translate.py --model pix2pix --dataset fashion_mnist_edges --img_size 32 --batch_size 32 --ema \
        --gen_kwargs '{"base_dim": 32}' --disc_kwargs '{"base_dim": 32, "n_layers": 2}' --eval_interval 500  # offline
    python translate.py --model cyclegan --dataset fashion_mnist_sneakers_boots --img_size 32 --batch_size 8 \
        --gen_kwargs '{"base_dim": 32, "n_blocks": 6}' --disc_kwargs '{"base_dim": 32, "n_layers": 2}' --ema
    accelerate launch [--num_processes N] [--mixed_precision fp16|bf16] translate.py ...
    torchrun --nproc_per_node 2 translate.py ...      # also on CPU (gloo)
    python translate.py ... --resume latest           # continue bit-exactly (image pools included)
    python sample.py --checkpoint logs/<run> --input_dir my_inputs --out_dir translated [--reverse]

pix2pix (Isola et al. 2017): U-Net G, 70x70 PatchGAN D on (input, output) pairs, G loss = BCE + 100 x L1, D loss
halved; one G forward per step, used by the D step (detached) and then the G step, as the reference code does.
CycleGAN (Zhu et al. 2017): ResNet generators G: A -> B and F: B -> A, a PatchGAN per domain, least-squares
losses, cycle loss x 10, identity loss x 0.5 x 10, D trained on fakes from a history of 50 (`ImagePool`); G step
first, then the D step, as the reference code. Both: Adam 2e-4 (0.5, 0.999), batch 1, lr constant for the first half
of --n_steps then linear to 0 (`--lr_decay_start`), instance norm. Data (`utils/pairs.py`): `paired` folders (A/
and B/ with matching names, or A|B side by side), `unpaired` folders (A/ and B/, or trainA/ and trainB/), and the
offline demos built from Fashion-MNIST on the fly. Evaluation (`--eval_interval`): pix2pix L1 and SSIM of the outputs
(as saved PNGs, pixels in [0, 1]) to the targets of held-out pairs (`--eval_metric l1|ssim`); CycleGAN the Fréchet
distance of translated held-out A images to the B training images (`fd_target`: FD_cls on 1-channel 28/32 px data,
FD on pixels otherwise). Grids: [input | output | target] triplets (CycleGAN: [input | translation | cycle]).
The run folder, resume, best checkpoint, --only_test and --delete are gan_mnist.py's (utils/run.py).
Both train on randomly jittered and mirrored images, as their papers and reference code: each training image is
resized to 286/256 x --img_size, a random --img_size square is cut from it and flipped with probability 1/2, one draw
per pair (CycleGAN: per image of each domain); `--no-augment` turns it off; evaluation and grids see the images as
they are.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from losses import LeastSquaresLoss, Pix2PixLoss, cycle_loss, identity_loss, l1_distance
from metrics.evaluate import Evaluator, loop_evaluator, resolve_metric, score_snapshot
from metrics.ssim import ssim
from modelling import build_translator
from modelling.translation import PatchDiscriminator
from utils.cli import UserError, script_cli
from utils.data import make_loader
from utils.dist import set_backends, unwrap
from utils.ema import EMA, EmaConfig
from utils.grid import save_grid, to_uint8
from utils.optim import make_optimizer, set_hyperparameters, step_optimizer
from utils.pairs import (
    DEMOS,
    fashion_mnist_edges,
    fashion_mnist_sneakers_boots,
    jitter_size,
    paired_folder,
    random_jitter,
    unpaired_folders,
)
from utils.run import Run, RunConfig
from utils.tracking import LoopTracker

GRID_EXAMPLES = 12  # grids: 12 triplets, two per row
PAIRED = {"pix2pix": ("fashion_mnist_edges", "paired"), "cyclegan": ("fashion_mnist_sneakers_boots", "unpaired")}
RESUME_KEYS = ("model", "dataset", "img_size", "gen_kwargs", "disc_kwargs", "direction", "pool_size")


@dataclass
class Config(EmaConfig, RunConfig):
    model: str = field(default="pix2pix", metadata={"choices": ["pix2pix", "cyclegan"]})
    dataset: str = field(default="paired", metadata={"choices": [*DEMOS, "paired", "unpaired"]})
    data_dir: str = field(default="data", metadata={"help": "paired/unpaired folder; demos: where Fashion-MNIST is"})
    eval_dir: str = field(default="", metadata={"help": "held-out folder (same layout); demos: their test split"})
    direction: str = field(default="AtoB", metadata={"choices": ["AtoB", "BtoA"]})
    download: bool = field(default=True, metadata={"help": "let torchvision try to download Fashion-MNIST"})
    img_size: int | None = field(
        default=None, metadata={"help": "default: 32 for the Fashion-MNIST demos (their own size), else 256 (papers')"}
    )
    gen_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the generator(s)"})
    disc_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON, passed to the PatchGAN(s)"})
    batch_size: int = field(default=1, metadata={"min": 1, "help": "per process (both papers: 1)"})
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_decay_start: float = field(default=0.5, metadata={"help": "fraction of n_steps, then lr linear to 0; 1 = off"})
    l1_weight: float = field(default=100.0, metadata={"help": "pix2pix: lambda of the L1 term"})
    cycle_weight: float = field(default=10.0, metadata={"help": "cyclegan: lambda of the cycle loss"})
    identity_weight: float = field(default=0.5, metadata={"help": "cyclegan: identity loss weight, x cycle_weight"})
    pool_size: int = field(default=50, metadata={"min": 0, "help": "cyclegan: fakes kept per domain; 0 = none"})
    augment: bool = field(default=True, metadata={"help": "training images: 286/256 resize, random crop, mirroring"})
    ema: bool = field(default=False, metadata={"help": "keep an EMA generator; grids, evaluations, snapshots use it"})
    num_workers: int = field(default=2, metadata={"min": 0, "help": "decoding processes for image folders"})
    eval_metric: str = field(
        default="auto", metadata={"choices": ["auto", "l1", "ssim", "fd_target"], "help": "auto: l1 / fd_target"}
    )


def resolve_config(cfg: Config) -> Config:
    """Fill the model's metric, then refuse combinations that cannot work, before anything is written."""
    if cfg.eval_metric == "auto":
        cfg.eval_metric = "l1" if cfg.model == "pix2pix" else "fd_target"
    if cfg.img_size is None:
        cfg.img_size = 32 if cfg.dataset in DEMOS else 256
    cfg.check()
    if cfg.dataset not in PAIRED[cfg.model]:
        raise UserError(f"--model {cfg.model} trains on {' or '.join(PAIRED[cfg.model])} data, not {cfg.dataset}")
    if (cfg.eval_metric == "fd_target") != (cfg.model == "cyclegan"):
        raise UserError(f"--eval_metric {cfg.eval_metric} does not apply to {cfg.model} (pix2pix: l1, ssim; "
                        "cyclegan: fd_target)")  # fmt: skip
    if cfg.lr <= 0 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1) or not 0 <= cfg.lr_decay_start <= 1:
        raise UserError("need --lr > 0, --beta1 and --beta2 in [0, 1), --lr_decay_start in [0, 1]")
    if min(cfg.l1_weight, cfg.cycle_weight, cfg.identity_weight) < 0:
        raise UserError("--l1_weight, --cycle_weight and --identity_weight must be >= 0")
    return cfg


def build_data(cfg: Config):
    """(training data, held-out data): pix2pix a paired dataset each; CycleGAN (A, B) pairs of domains."""
    reverse = cfg.direction == "BtoA"
    if cfg.dataset == "fashion_mnist_edges":
        train, held_out = (
            fashion_mnist_edges(cfg.data_dir, cfg.img_size, t, cfg.download, reverse) for t in (True, False)
        )
    elif cfg.dataset == "fashion_mnist_sneakers_boots":
        train, held_out = (
            fashion_mnist_sneakers_boots(cfg.data_dir, cfg.img_size, t, cfg.download) for t in (True, False)
        )
    elif cfg.dataset == "paired":
        train = paired_folder(cfg.data_dir, cfg.img_size, reverse)
        held_out = paired_folder(cfg.eval_dir, cfg.img_size, reverse) if cfg.eval_dir else train
    else:
        train = unpaired_folders(cfg.data_dir, cfg.img_size)
        held_out = unpaired_folders(cfg.eval_dir, cfg.img_size, test=True) if cfg.eval_dir else train
    if cfg.model == "cyclegan" and reverse:
        train, held_out = train[::-1], held_out[::-1]
    return train, held_out


class ImagePool:
    """CycleGAN's history of generated images (Zhu et al. 2017, Sec. 4, after Shrivastava et al. 2017): D learns from
    fakes of the last `size` G steps, not only the newest. The reference code's rule: until the pool is full every
    fake is stored and passed on; then each fake, with probability 1/2, takes the place of a random stored one, which
    is passed on instead; otherwise the fake itself is passed on. Draws come from the global RNG (reseeded every step);
    each process keeps its own pool."""

    def __init__(self, size: int, shape: tuple[int, ...], device):
        self.size, self.count = size, 0
        self.images = torch.zeros(size, *shape, device=device)

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        out = []
        for fake in fakes.detach():
            if self.count < self.size:
                self.images[self.count] = fake
                self.count += 1
                out.append(fake)
            elif torch.rand(()) < 0.5:
                j = int(torch.randint(self.size, ()))
                out.append(self.images[j].to(fake.dtype, copy=True))  # fakes may be bf16/fp16 under autocast
                self.images[j] = fake
            else:
                out.append(fake)
        return torch.stack(out)


def augment_batch(cfg: Config, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The training images of one step: random jitter (resize to 286/256 x --img_size, random crop back) and
    mirroring, one draw per sample shared by the tensors given (a pair's input and target), unless --no-augment.
    Evaluation and grids use the held-out images as they are."""
    return random_jitter(images, jitter_size(cfg.img_size)) if cfg.augment else images


# The loss of each optimizer step, assembled in one place that the loop and the tests both call.
def pix2pix_d_loss(disc, inputs, targets, outputs):
    """pix2pix's D step (Isola et al. 2017, Sec. 3.3: the objective halved for D): 0.5 * (BCE(D(x, y), 1) +
    BCE(D(x, G(x)), 0)) per patch. G(x) is detached: this step trains D only. Returns (loss, D on reals, on fakes)."""
    d_reals, d_fakes = disc(targets, inputs), disc(outputs.detach(), inputs)
    return Pix2PixLoss().d_loss(d_reals, d_fakes).mean(), d_reals, d_fakes


def pix2pix_g_loss(disc, inputs, targets, outputs, cfg: Config):
    """pix2pix's G step (Eq. 4): BCE(D(x, G(x)), 1) + --l1_weight (100) x mean |G(x) - y|, D frozen by the caller.
    Returns (loss, mean L1)."""
    loss = Pix2PixLoss(cfg.l1_weight).g_loss(disc(outputs, inputs), outputs, targets).mean()
    return loss, l1_distance(outputs, targets).mean()


def cyclegan_g_loss(gens, discs, reals_a, reals_b, cfg: Config):
    """CycleGAN's G step for both generators (Zhu et al. 2017, Eq. 3 with least squares; the reference code's sum):
    LSGAN(D_B(G(a))) + LSGAN(D_A(F(b))) + lambda (|F(G(a)) - a| + |G(F(b)) - b|) + 0.5 lambda (|G(b) - b| + |F(a) -
    a|), lambda = --cycle_weight 10, 0.5 = --identity_weight; gens = (G: A -> B, F: B -> A), discs = (D_B, D_A), both
    D frozen by the caller. Returns (loss, fakes = (G(a), F(b)), the terms for the log)."""
    (gen_ab, gen_ba), (disc_b, disc_a) = gens, discs
    fakes_b, fakes_a = gen_ab(reals_a), gen_ba(reals_b)
    lsgan = LeastSquaresLoss()
    loss_adv = (lsgan.g_loss(disc_b(fakes_b)) + lsgan.g_loss(disc_a(fakes_a))).mean()
    loss_cycle = cycle_loss(gen_ab, gen_ba, reals_a, reals_b, fakes_b, fakes_a).mean()
    loss = loss_adv + cfg.cycle_weight * loss_cycle
    stats = {"loss/g_adv": loss_adv, "loss/cycle": loss_cycle}
    if cfg.identity_weight > 0:
        loss_identity = identity_loss(gen_ab, gen_ba, reals_a, reals_b).mean()
        loss = loss + cfg.identity_weight * cfg.cycle_weight * loss_identity
        stats["loss/identity"] = loss_identity
    return loss, (fakes_b, fakes_a), stats


def cyclegan_d_loss(discs, pools, reals_a, reals_b, fakes):
    """CycleGAN's D step for both discriminators (one optimizer, as the reference code): each D's least-squares
    loss halved, 0.5 ((D(real) - 1)^2 + D(fake)^2), on its domain's reals against fakes drawn through its domain's
    image pool, detached (with --pool_size 0 they are the G step's own outputs). discs = (D_B, D_A), pools = (B's,
    A's), fakes = (G(a), F(b)) as `cyclegan_g_loss` returns them. Returns (loss, D_B on reals, D_B on fakes)."""
    (disc_b, disc_a), lsgan = discs, LeastSquaresLoss()
    pooled_b, pooled_a = pools[0].query(fakes[0]), pools[1].query(fakes[1])
    d_reals, d_fakes = disc_b(reals_b), disc_b(pooled_b.detach())
    loss = (lsgan.d_loss(d_reals, d_fakes) + lsgan.d_loss(disc_a(reals_a), disc_a(pooled_a.detach()))).mean()
    return loss, d_reals, d_fakes


@torch.no_grad()
def paired_scores(accelerator, model, data, n: int, batch_size: int = 250) -> dict:
    """L1 and SSIM of `model`'s outputs, quantised as saved PNGs, to the targets of the first n held-out pairs,
    pixels in [0, 1] (means over images); every process scores its share and the sums are all-reduced."""
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    for first in range(0, len(mine), batch_size):
        inputs, targets = data[mine[first : first + batch_size]]
        outputs = to_uint8(model(inputs.to(accelerator.device))).double() / 255
        targets = to_uint8(targets).double().to(accelerator.device) / 255
        sums += torch.stack([(outputs - targets).abs().flatten(1).mean(1).sum(), ssim(outputs, targets).sum()])
    l1, similarity = (accelerator.reduce(sums, reduction="sum") / n).tolist()
    return {"l1": l1, "ssim": similarity, "n_samples": n}


def build_models(cfg: Config, in_ch: int, out_ch: int):
    """(the generator module the snapshot holds, its kwargs, the trained networks by name): pix2pix's U-Net `gen`
    and its conditional PatchGAN `disc` on (output, input) pairs; CycleGAN's pair of ResNets, `gen_ab` (G: A -> B)
    and `gen_ba` (F: B -> A), and a PatchGAN per domain, `disc_b` then `disc_a`. Draws the initial weights from the
    global RNG in that order (the caller seeds it)."""
    paired = cfg.model == "pix2pix"
    channels = dict(in_channels=in_ch, out_channels=out_ch) if paired else dict(a_channels=in_ch, b_channels=out_ch)
    gen_kwargs = dict(img_size=cfg.img_size) | channels | cfg.gen_kwargs
    judged = [(out_ch, in_ch)] if paired else [(out_ch, 0), (in_ch, 0)]  # (image, condition) channels of each D
    try:
        gen_module = build_translator("unet" if paired else "cycle", **gen_kwargs)
        discs = [
            PatchDiscriminator(**dict(img_size=cfg.img_size, in_channels=c, cond_channels=k) | cfg.disc_kwargs)
            for c, k in judged
        ]
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"cannot build --model {cfg.model}: {e.args[0] if e.args else e}")
    if not paired and cfg.identity_weight > 0 and in_ch != out_ch:
        raise UserError(f"the identity loss needs domains of equal channels ({in_ch}, {out_ch}): --identity_weight 0")
    if paired:
        return gen_module, gen_kwargs, dict(gen=gen_module, disc=discs[0])
    return gen_module, gen_kwargs, dict(gen_ab=gen_module.ab, gen_ba=gen_module.ba, disc_b=discs[0], disc_a=discs[1])


# One training iteration of each model, chosen once before the loop; both take the step's batches (one per loader)
# and the prepared networks by name, and return (the values to log, whether the G and the D update were applied).
def pix2pix_step(accelerator, cfg: Config, batches, models: dict, pools, optim_g, optim_d, g_group, d_group):
    """pix2pix: one G forward, the D step on it (detached), then the G step that differentiates it (Isola et al.'s
    code). `pools` is unused (CycleGAN's)."""
    gen, disc = models["gen"], models["disc"]
    (batch,) = batches
    inputs, targets = (t.to(accelerator.device, non_blocking=True) for t in batch)
    inputs, targets = augment_batch(cfg, inputs, targets)  # one crop and flip for both images of a pair
    outputs = gen(inputs)  # one forward: the D step sees it detached, the G step differentiates it

    # Discriminator step: real pairs (x, y) against (x, G(x)).
    loss_d, d_reals, d_fakes = pix2pix_d_loss(disc, inputs, targets, outputs)
    optim_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    d_applied, _ = step_optimizer(accelerator, optim_d, d_group)

    # Generator step: fool the (frozen) D and stay close to the target in L1.
    disc.requires_grad_(False)
    loss_g, loss_l1 = pix2pix_g_loss(disc, inputs, targets, outputs, cfg)
    optim_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    disc.requires_grad_(True)
    g_applied, _ = step_optimizer(accelerator, optim_g, g_group)
    stats = {"loss/d": loss_d, "loss/g": loss_g, "loss/l1": loss_l1}
    return stats | {"d/real": d_reals.mean(), "d/fake": d_fakes.mean()}, g_applied, d_applied


def cyclegan_step(accelerator, cfg: Config, batches, models: dict, pools, optim_g, optim_d, g_group, d_group):
    """CycleGAN: the G step for G and F, then the D step for D_B and D_A on fakes drawn through `pools` (B's, A's),
    as the reference code."""
    gens, discs = (models["gen_ab"], models["gen_ba"]), (models["disc_b"], models["disc_a"])
    (reals_a, _), (reals_b, _) = batches
    device = accelerator.device
    reals_a, reals_b = reals_a.to(device, non_blocking=True), reals_b.to(device, non_blocking=True)
    (reals_a,), (reals_b,) = augment_batch(cfg, reals_a), augment_batch(cfg, reals_b)  # a draw per domain

    # Generator step: fool both (frozen) discriminators, come back by the cycle, leave the target domain be.
    d_group.requires_grad_(False)
    loss_g, fakes, stats = cyclegan_g_loss(gens, discs, reals_a, reals_b, cfg)
    optim_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    d_group.requires_grad_(True)
    g_applied, _ = step_optimizer(accelerator, optim_g, g_group)

    # Discriminator step: reals against fakes drawn from the pools of earlier generators.
    loss_d, d_reals, d_fakes = cyclegan_d_loss(discs, pools, reals_a, reals_b, fakes)
    optim_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    d_applied, _ = step_optimizer(accelerator, optim_d, d_group)
    stats |= {"loss/d": loss_d, "loss/g": loss_g}
    return stats | {"d/real": d_reals.mean(), "d/fake": d_fakes.mean()}, g_applied, d_applied


def make_scorer(cfg: Config, accelerator, run: Run, train, held_out, n_eval: int):
    """pix2pix: L1/SSIM to held-out targets. CycleGAN: FD of translated held-out A images to the B training images,
    with the reference statistics cached in <run>/eval (fid.py's code: metrics/evaluate.py); `baseline=True` adds
    the same FD of the A images as they are."""
    if cfg.model == "pix2pix":
        return lambda model, baseline=False: paired_scores(accelerator, model, held_out, n_eval)
    inputs = held_out[0]
    metric = resolve_metric("auto", tuple(train[1].sample_shape))
    source = Path(cfg.resume) if cfg.only_test and cfg.resume not in ("", "latest") else run.dir
    ref = source / "eval" / f"ref-target-{metric}.npz"
    evaluator = Evaluator(accelerator, metric, n_eval, train[1], ref, cfg.eval_weights)
    translate = lambda model, seeds, labels, device: (model(inputs[seeds][0].to(device)), 1)  # noqa: E731
    untranslated = lambda model, seeds, labels, device: (inputs[seeds][0].to(device), 0)  # noqa: E731

    def scorer(model, baseline: bool = False) -> dict:
        scores = {"fd_target": evaluator(translate, model, 0)["value"], "n_samples": n_eval}
        if baseline:  # the same FD of the A images as they are: what translating has to beat
            scores["fd_target_untranslated"] = evaluator(untranslated, model, 0)["value"]
        return scores

    return scorer


def pool_state(accelerator, pools: list[ImagePool]) -> dict:
    """Every process's pools (each keeps its own history), gathered so that a resume restores all of them."""
    state = {f"images_{k}": accelerator.gather(pool.images[None]) for k, pool in enumerate(pools)}
    counts = torch.tensor([[pool.count for pool in pools]], device=accelerator.device)
    return state | {"counts": accelerator.gather(counts)}


def restore_pools(accelerator, pools: list[ImagePool], saved: dict) -> None:
    """This process's pools from `pool_state`'s gathered tensors, if the same number of processes saved them."""
    if saved["counts"].shape[0] != accelerator.num_processes:
        accelerator.print(f"note: the image pools were saved by {saved['counts'].shape[0]} processes; start empty")
        return
    for k, pool in enumerate(pools):
        pool.images.copy_(saved[f"images_{k}"][accelerator.process_index])
        pool.count = int(saved["counts"][accelerator.process_index, k])


@torch.no_grad()
def save_grids(grid_dir: Path, step: int, modules: dict, grid_inputs, paired: bool) -> None:
    """[input | output | target] triplets (CycleGAN: [A | G(A) | F(G(A))] and [B | F(B) | G(F(B))]), two a row, one
    grid per generator module (tag -> module), written to grid_dir/<tag>-<step>.png."""
    for tag, module in modules.items():
        was_training = module.training
        module.eval()  # no dropout
        if paired:
            x, y = grid_inputs
            columns = [x, module(x), y]
        else:
            a, b = grid_inputs
            fake_b, fake_a = module(a), module(b, reverse=True)
            cycles = module(fake_b, reverse=True), module(fake_a)
            columns = [torch.cat(pair) for pair in ((a, b), (fake_b, fake_a), cycles)]
        module.train(was_training)
        c = max(t.shape[1] for t in columns)
        tiles = torch.stack([t.expand(-1, c, -1, -1) for t in columns], dim=1).flatten(0, 1)  # (3n, C, H, W)
        save_grid(tiles, grid_dir / f"{tag}-{step:08d}.png", nrow=6)


def main(cfg: Config) -> None:
    cfg = resolve_config(cfg)  # idempotent: parse() already resolved it, tests may pass a raw Config
    run = Run(cfg, f"{cfg.dataset}_{cfg.model}{'_BtoA' if cfg.direction == 'BtoA' else ''}", RESUME_KEYS)
    paired = cfg.model == "pix2pix"

    # Accelerator: mixed precision, DDP and torch.compile come from the flags or from `accelerate launch`.
    set_backends(cfg.deterministic)  # GPU kernels: TF32 and cudnn autotuning, or --deterministic's bit-exact ones
    accelerator = Accelerator(**run.accelerator_kwargs())
    device, is_main, rank, world = (
        accelerator.device, accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    )  # fmt: skip
    run.open(accelerator)

    # Data: pairs (pix2pix) or two domains (CycleGAN), and the held-out data the evaluation translates.
    with accelerator.main_process_first():
        train, held_out = build_data(cfg)
    n_eval = min(cfg.eval_samples, len(held_out if paired else held_out[0]))

    if cfg.only_test:
        scorer = make_scorer(cfg, accelerator, run, train, held_out, n_eval)

        def scores_fn(model, meta):
            if meta["kind"] != "translation":
                raise UserError(f"{meta['path']} is a {meta['kind']!r} snapshot, not a translate.py one")
            return scorer(model, baseline=True)  # CycleGAN: also the FD of the untranslated A images

        score_snapshot(run, accelerator, None, scores_fn)
        return
    workers = cfg.num_workers if cfg.dataset in ("paired", "unpaired") else 0  # in-memory demos need no decoding
    loaders = [  # CycleGAN: A and B are drawn independently, from seeds seed and seed + 1
        iter(make_loader(data, cfg.batch_size, rank, world, cfg.seed + k, run.start_step, workers))
        for k, data in enumerate([train] if paired else train)
    ]

    # Models: same init on every rank; the EMA is made before prepare() wraps anything.
    torch.manual_seed(cfg.seed)
    in_ch, out_ch = (train.in_channels, train.out_channels) if paired else (d.sample_shape[0] for d in train)
    gen_module, gen_kwargs, models = build_models(cfg, in_ch, out_ch)
    snapshot_model = "unet" if paired else "cycle"  # the snapshot holds pix2pix's G, or CycleGAN's G and F
    ema = EMA(gen_module, cfg.ema_halflife_kimg, cfg.ema_rampup) if cfg.ema else None
    if ema is not None:
        ema.module.to(device)
    # CycleGAN's image pools, B's then A's (the order of the discriminators, D_B and D_A).
    pool_shapes = [] if paired else [(c, cfg.img_size, cfg.img_size) for c in (out_ch, in_ch)]
    pools = [ImagePool(cfg.pool_size, shape, device) for shape in pool_shapes]

    # Optimizers: one for the generator(s), one for the discriminator(s), as the reference code.
    betas = (cfg.beta1, cfg.beta2)
    gen_params = [p for name, m in models.items() if name.startswith("gen") for p in m.parameters()]
    disc_params = [p for name, m in models.items() if name.startswith("disc") for p in m.parameters()]
    optim_g = make_optimizer("Adam", gen_params, cfg.lr, betas)
    optim_d = make_optimizer("Adam", disc_params, cfg.lr, betas)

    # Prepare: the networks in their named order (generators, then discriminators), then the two optimizers.
    *prepared, optim_g, optim_d = accelerator.prepare(*models.values(), optim_g, optim_d)
    models = dict(zip(models, prepared, strict=True))
    g_group = torch.nn.ModuleList(m for name, m in models.items() if name.startswith("gen"))
    d_group = torch.nn.ModuleList(m for name, m in models.items() if name.startswith("disc"))  # for gradient checks

    # Resume: networks, optimizers, EMA and every process's image pools.
    nets = models | dict(optim_g=optim_g, optim_d=optim_d, ema=ema, scaler=accelerator.scaler)
    resumed = run.restore(**nets)
    if resumed.get("pools"):
        restore_pools(accelerator, pools, resumed["pools"])
    n_params = [sum(p.numel() for m in group for p in unwrap(m).parameters()) / 1e6 for group in (g_group, d_group)]
    sizes = f"{len(train)} pairs" if paired else f"{len(train[0])} A / {len(train[1])} B images"
    evaluator = loop_evaluator(run, accelerator, None)  # --eval_interval's FD metric; None: no FD in the loop
    summary = f"{cfg.model} (G {n_params[0]:.2f}M, D {n_params[1]:.2f}M parameters), {sizes}"
    run.begin(accelerator, None, evaluator, summary)
    scorer = make_scorer(cfg, accelerator, run, train, held_out, n_eval) if cfg.eval_interval else None

    # Fixed held-out examples for the grids: pix2pix (input, target) pairs; CycleGAN A and B images.
    if paired:
        grid_inputs = [t.to(device) for t in held_out[list(range(min(GRID_EXAMPLES, len(held_out))))]]
    else:
        grid_inputs = [d[list(range(min(GRID_EXAMPLES // 2, len(d))))][0].to(device) for d in held_out]
    grid_modules = {"raw": gen_module} | ({"ema": ema.module} if ema else {})

    # Loop.
    train_step = pix2pix_step if paired else cyclegan_step
    images_per_step = cfg.batch_size * world
    loop = LoopTracker(run, accelerator, images_per_step, resumed.get("skipped", 0))
    decay_from = cfg.lr_decay_start * cfg.n_steps
    for step in loop.steps():
        # Learning rate: constant, then linear to 0 over the last part of the run (both papers); a function of step.
        lr = cfg.lr * min(1.0, (cfg.n_steps - step) / max(cfg.n_steps - decay_from, 1))
        for optimizer in (optim_g, optim_d):
            set_hyperparameters(optimizer, lr, betas)
        batches = [next(loader) for loader in loaders]  # CycleGAN: A's batch, then B's
        stats, g_applied, d_applied = train_step(
            accelerator, cfg, batches, models, pools, optim_g, optim_d, g_group, d_group
        )

        # Update EMA, only after an update that really happened.
        if ema is not None and g_applied:
            ema.update(gen_module, images_per_step, (step + 1) * images_per_step)

        # Count a skipped update (too many in a row stop a diverged run); log.
        done = loop.end_step(step, d_applied and g_applied, stats, {"lr": lr})

        # Grids; evaluate the EMA generator on held-out data; save checkpoints (also at a new best evaluation).
        if is_main and run.due(done, cfg.sample_interval):
            save_grids(run.dir / "grids", done, grid_modules, grid_inputs, paired)
        if run.eval_due(done):
            model = ema.module if ema else gen_module
            was_training = model.training
            run.evaluate(accelerator, done, scores=scorer(model.eval()))
            model.train(was_training)
        if run.due(done, cfg.checkpoint_interval) or run.new_best:
            module = ema.module if ema else gen_module
            snapshot = dict(kind="translation", model=snapshot_model, model_kwargs=gen_kwargs, module=module)
            extra = dict(pools=pool_state(accelerator, pools)) if pools else {}  # a collective: all processes
            replicas = tuple(models.values())
            run.save(accelerator, done, replicas=replicas, snapshot=snapshot, **nets, **extra, skipped=loop.skips.total)

    # Final save happened at the last step; close the trackers.
    accelerator.end_training()
    run.close()


cli = script_cli(__file__, __doc__, Config, main, resolve=resolve_config)


if __name__ == "__main__":
    cli()
