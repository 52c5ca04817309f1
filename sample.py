"""Write PNG samples (one file per seed, plus a grid) from any genzoo snapshot.

    python sample.py --checkpoint logs/mnist_dcgan --n_samples 1000 --out_dir samples/mnist_dcgan --seed 0
    python sample.py --checkpoint logs/mnist_dcgan_cond --n_samples 100 --class_label 3 --out_dir samples/threes
    python sample.py --checkpoint logs/celeba_stylegan2 --truncation 0.7 --out_dir samples/sg2_psi07
    python sample.py --checkpoint logs/fmnist_biggan --class_label 7 --truncation 0.5 --out_dir samples/bg_t05
    # image-to-image translation snapshots (translate.py): one output per input image
    python sample.py --checkpoint logs/edges_pix2pix --input_dir my_edges --out_dir translated
    python sample.py --checkpoint logs/shoes_cyclegan --input_dir my_boots --reverse --out_dir sneakers   # B -> A
    accelerate launch --num_processes 4 sample.py --checkpoint logs/mnist_dcgan --start_seed 0 --end_seed 49999 \
        --out_dir samples/mnist_dcgan_50k
    torchrun --nproc_per_node 2 sample.py ...
    # diffusion snapshots (diffusion_train.py): CharacteristicGenerator's solver flags
    python sample.py --checkpoint logs/fmnist_edm --ode_solver heun --num_steps 18 --out_dir samples/edm_heun35
    python sample.py --checkpoint logs/mnist-denoiser --ode_solver deis --num_steps 10 --rho 1 --eval_eps0 1e-3 \
        --churn --s_min 0.05 --s_max 0.6 --gamma 0.1 --start_seed 0 --end_seed 49999 --out_dir samples/follmer
    python sample.py --checkpoint logs/imagenet64_edm --num_steps 256 --S_churn 40 --S_min 0.05 --S_max 50 \
        --S_noise 1.003 --out_dir samples/edm_stochastic    # EDM's flags as published; --churn True also parses
    # distilled characteristic generators (distill_characteristic.py): one step, or a few through intermediate times
    python sample.py --checkpoint logs/fmnist_char_cond --num_steps 1 --out_dir samples/char_1step
    python sample.py --checkpoint logs/fmnist_char_cond --num_steps 1 --n_samples 256 --grid_size 256 --out_dir teaser
    # GPM: ScoreGAN generators sample in one pass; Discriminator Flow runs its critic's particle flow (NFE = steps)
    python sample.py --checkpoint logs/fashion_mnist_score_gan --start_seed 0 --end_seed 9999 --out_dir samples/sg
    python sample.py --checkpoint logs/gaussians_discr_flow --n_samples 4000 --trajectory webp --out_dir samples/df
    python sample.py --checkpoint logs/gaussians_discr_flow --num_steps 14 --total_steps 56 --out_dir samples/df14
    # GEBMs (ebm_train.py): latent MCMC with GEBM's flags; --num_sampler_steps 0 = the base generator
    python sample.py --checkpoint logs/fmnist_gebm --latent_sampler mala --lmc_gamma 1e-4 --num_sampler_steps 100 \
        --temperature 100 --animation_every 10 --out_dir samples/gebm_mala

Image k is drawn from its own RNG seeded with its seed (`--seed + k`, or each seed of `--start_seed..--end_seed`,
inclusive), so the files do not depend on the batch size or the number of processes; seeds are dealt to processes
round-robin. Conditional models use `--class_label`, else class = seed mod n_classes (balanced classes).
The snapshot says which model to build; nothing from the training script's flags is needed. Diffusion solvers
(sampling/diffusion.py): euler, heun (EDM Algorithm 2), deis (DDIM), ancestral (stochastic); --churn adds EDM's
noise injection. Defaults per method: EDM heun, rho 7, sigma in [0.002, 80]; Föllmer deis, rho 1, t in
[eval_eps0, 1 - eval_eps1] = [1e-3, 0.999]. Characteristic snapshots default to the grid they were distilled on (its
t_min, t_max, rho are in the snapshot), jump along it with the learned flow map G(x, t_i, t_i+1) and end with
G(x, t_min, 0): --num_steps 1 (the default for them) is the one-step generator
G(z, t_max, 0). The number of network evaluations per image (NFE) and the sampling time (network and solver only, no
PNG writing) are printed and stored in sample_info.json. 2-D toy snapshots write points.npy (seed order) and
scatter.png instead of PNGs (and, for `gaussians`, the mode frequencies in sample_info.json). Discriminator Flow
snapshots take --num_steps (flow steps, default the snapshot's K) and --total_steps (the grid t_k = k/K; default
--num_steps, so fewer steps alone keep the flow time eta), and --trajectory gif|webp animates the flow of the grid's
seeds (2-D: of every point) as trajectory.<format>.
Translation snapshots read every image under --input_dir (recursively; centre square resized to the model's
size) and write exactly one PNG per input, at the same relative path with a .png suffix, plus grid.png of
[input | output] pairs.
scatter.png instead of PNGs. GEBM snapshots run one latent chain per seed (sampling/latent_mcmc.py; defaults: the
seed's sampling run, langevin, 1000 steps, gamma 1e-4 x 0.1 every 200 steps, temperature 100) and record the
acceptance rates of mala/hmc/mh in sample_info.json; --animation_every K writes chain.gif.
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from modelling.precond import EDMDenoiser
from sampling import SNAPSHOT_KINDS
from sampling.diffusion import SOLVERS, use_distilled_grid
from sampling.latent_mcmc import (
    METROPOLIS,
    LatentMcmcConfig,
    acceptance_summary,
    latent_sampler_settings,
    save_chain_animation,
)
from sampling.particles import flow_settings
from utils.ckpt import build_from_snapshot, load_snapshot
from utils.cli import UserError, script_cli
from utils.data import image_files, mode_frequencies, read_image, to_signed_unit
from utils.grid import (
    check_finite,
    grid_image,
    save_animation,
    save_grid,
    save_png,
    save_scatter,
    scatter_image,
    to_uint8,
)
from utils.tracking import progress


@dataclass
class Config(LatentMcmcConfig):  # GEBM snapshots' latent-MCMC flags (sampling/latent_mcmc.py) first
    checkpoint: str = field(default="", metadata={"help": "snapshot .safetensors, or a run folder (newest snapshot)"})
    out_dir: str = field(
        default="samples",
        metadata={"aliases": ["workdir"], "help": "output folder (--workdir: CharacteristicGenerator's eval.py)"},
    )
    expect_snapshot: str | None = field(
        default=None,
        metadata={
            "choices": ["denoiser", "characteristic"],
            "aliases": ("mode",),
            "help": "refuse a snapshot of another kind (--mode: CharacteristicGenerator's eval.py)",
        },
    )
    n_samples: int = 64
    seed: int = field(default=0, metadata={"help": "first seed when --start_seed/--end_seed are not given"})
    start_seed: int | None = None
    end_seed: int | None = field(default=None, metadata={"help": "inclusive"})
    batch_size: int = 64
    class_label: int | None = field(default=None, metadata={"help": "conditional models: one class for every image"})
    # The truncation trick: style GANs w' = w_avg + psi (w - w_avg); BigGAN z resampled until every |z_i| <= threshold.
    truncation: float | None = field(
        default=None, metadata={"help": "style GANs: psi in [0, 1] (0.7: StyleGAN's); biggan: threshold > 0; off"}
    )
    truncation_cutoff: int | None = field(default=None, metadata={"help": "truncate the first k ws only (all)"})
    grid: bool = field(default=True, metadata={"help": "also write grid.png of the first --grid_size seeds"})
    grid_size: int = field(default=100, metadata={"help": "images in grid.png (e.g. 256 for a 16 x 16 teaser)"})
    # Diffusion snapshots only (CharacteristicGenerator's names; None = the method's default).
    ode_solver: str | None = field(default=None, metadata={"choices": list(SOLVERS), "help": "EDM heun, Föllmer deis"})
    num_steps: int | None = field(
        default=None,
        metadata={"help": "time-grid points N (Heun: NFE 2N - 1, others N); default 18, distilled 1; flow: steps"},
    )
    total_steps: int | None = field(default=None, metadata={"help": "discriminator flow: grid K (GPM total_nb_steps)"})
    trajectory: str = field(
        default="", metadata={"choices": ["", "gif", "webp"], "help": "discriminator flow: animate the particles"}
    )
    rho: float | None = field(default=None, metadata={"help": "grid exponent: EDM 7, Föllmer 1 (uniform)"})
    sigma_min: float | None = field(default=None, metadata={"help": "EDM: last noise level (0.002)"})
    sigma_max: float | None = field(default=None, metadata={"help": "EDM: first noise level (80)"})
    eval_eps0: float | None = field(default=None, metadata={"help": "Föllmer: t_min (1e-3)"})
    eval_eps1: float | None = field(default=None, metadata={"help": "Föllmer: t_max = 1 - eval_eps1 (1e-3)"})
    churn: bool = field(
        default=False, metadata={"help": "inject noise (CharacteristicGenerator's mollification; also --churn True)"}
    )
    gamma: float | None = field(default=None, metadata={"help": "churn: t_hat = t·(1 + gamma); default 0.1"})
    S_churn: float | None = field(
        default=None, metadata={"help": "EDM's form: churn with gamma = min(S_churn/N, sqrt(2) - 1), N = --num_steps"}
    )
    s_min: float | None = field(
        default=None, metadata={"aliases": ["S_min"], "help": "churn only for t >= s_min (EDM 0, Föllmer 0.05)"}
    )
    s_max: float | None = field(
        default=None, metadata={"aliases": ["S_max"], "help": "churn only for t <= s_max (EDM inf, Föllmer 0.6)"}
    )
    s_noise: float = field(
        default=1.0, metadata={"aliases": ["S_noise"], "help": "noise inflation of churn and ancestral steps"}
    )
    # Translation snapshots only (translate.py).
    input_dir: str = field(default="", metadata={"help": "translation: folder of input images, one output each"})
    reverse: bool = field(default=False, metadata={"help": "translation: a CycleGAN snapshot's B -> A generator"})
    # GEBM snapshots only (and the latent-MCMC flags of LatentMcmcConfig, listed first).
    animation_every: int = field(default=0, metadata={"help": "GEBM: chain.gif of the first chains every K steps"})


def seed_list(cfg: Config) -> list[int]:
    if (cfg.start_seed is None) != (cfg.end_seed is None):
        raise UserError("give both --start_seed and --end_seed, or neither (then --seed and --n_samples are used)")
    if cfg.start_seed is not None:
        if cfg.end_seed < cfg.start_seed:
            raise UserError(f"--end_seed {cfg.end_seed} is below --start_seed {cfg.start_seed}")
        return list(range(cfg.start_seed, cfg.end_seed + 1))
    if cfg.n_samples < 1:
        raise UserError(f"--n_samples must be >= 1, got {cfg.n_samples}")
    return list(range(cfg.seed, cfg.seed + cfg.n_samples))


def truncation_settings(generator, cfg: Config) -> dict:
    """Generator keyword arguments for the truncation trick; refused for generators without a mapping network,
    except BigGAN's, whose truncation is a threshold on the latents (`sampling.truncated_latents`)."""
    if cfg.truncation is None and cfg.truncation_cutoff is None:
        return {}
    if getattr(generator, "truncates_latents", False):
        if cfg.truncation_cutoff is not None or not (cfg.truncation or 0) > 0:
            raise UserError("biggan: --truncation is a threshold > 0 on |z|, and --truncation_cutoff does not apply")
        return dict(truncation=cfg.truncation)
    if not hasattr(generator, "mapping"):
        raise UserError("--truncation/--truncation_cutoff need a style generator (stylegan, stylegan2) or biggan")
    psi = 1.0 if cfg.truncation is None else cfg.truncation
    if not 0 <= psi <= 1 or not 0 < (cfg.truncation_cutoff or 1) <= generator.num_ws:
        raise UserError(f"need 0 <= --truncation <= 1 and 1 <= --truncation_cutoff <= {generator.num_ws}")
    return dict(truncation=psi, truncation_cutoff=cfg.truncation_cutoff)


def solver_settings(denoiser, cfg: Config) -> dict:
    """The sampler keyword arguments for this denoiser; flags of the other method are refused."""
    edm = isinstance(denoiser, EDMDenoiser)
    wrong = ("eval_eps0", "eval_eps1") if edm else ("sigma_min", "sigma_max")
    for name in wrong:
        if getattr(cfg, name) is not None:
            raise UserError(f"--{name} does not apply to a {'EDM' if edm else 'Föllmer'} snapshot")
    if cfg.ode_solver is not None and (cfg.ode_solver == "characteristic") != denoiser.two_time:
        kind = "a distilled (characteristic) snapshot" if denoiser.two_time else "a diffusion snapshot"
        raise UserError(f"--ode_solver {cfg.ode_solver} does not apply to {kind}")
    num_steps = cfg.num_steps if cfg.num_steps is not None else (1 if denoiser.two_time else 18)
    if num_steps < 1:
        raise UserError(f"--num_steps must be >= 1, got {num_steps}")
    if edm:
        t_min, t_max = cfg.sigma_min, cfg.sigma_max
    else:
        t_min = cfg.eval_eps0
        t_max = None if cfg.eval_eps1 is None else 1 - cfg.eval_eps1
    settings = dict(solver=cfg.ode_solver, num_steps=num_steps, rho=cfg.rho, t_min=t_min, t_max=t_max)
    if cfg.S_churn is not None and cfg.gamma is not None:
        raise UserError("give --gamma (CharacteristicGenerator's form) or --S_churn (EDM's), not both")
    churn, gamma = cfg.churn, 0.1 if cfg.gamma is None else cfg.gamma
    if cfg.S_churn is not None:  # EDM Algorithm 2: gamma_i = min(S_churn/N, sqrt(2) - 1), N = grid points
        churn, gamma = cfg.churn or cfg.S_churn > 0, min(cfg.S_churn / num_steps, math.sqrt(2) - 1)
    settings |= dict(churn=churn, gamma=gamma, s_min=cfg.s_min, s_max=cfg.s_max, s_noise=cfg.s_noise)
    # Resolve the method defaults, so sample_info.json records what actually ran.
    for key, default in (("solver", "solver"), ("rho", "rho"), ("t_min", "t_min"), ("t_max", "t_max")):
        settings[key] = getattr(denoiser, default) if settings[key] is None else settings[key]
    for i, key in enumerate(("s_min", "s_max")):
        settings[key] = denoiser.churn_range[i] if settings[key] is None else settings[key]
    if not 0 < settings["t_min"] < settings["t_max"] or (not edm and settings["t_max"] >= 1):
        raise UserError(f"need 0 < t_min < t_max{'' if edm else ' < 1'}: got {settings['t_min']}, {settings['t_max']}")
    if settings["rho"] <= 0 or gamma < 0 or cfg.s_noise < 0:
        raise UserError("--rho must be > 0, --gamma, --S_churn and --s_noise >= 0")
    return settings


def main(cfg: Config) -> None:
    if not cfg.checkpoint:
        raise UserError("--checkpoint is required (a run folder such as logs/mnist_dcgan, or a snapshot file)")
    if cfg.batch_size < 1 or cfg.grid_size < 1:
        raise UserError(f"--batch_size and --grid_size must be >= 1, got {cfg.batch_size}, {cfg.grid_size}")
    seeds = seed_list(cfg)
    meta, state_dict = load_snapshot(cfg.checkpoint)
    if meta["kind"] not in SNAPSHOT_KINDS:
        valid = sorted(SNAPSHOT_KINDS)
        raise UserError(f"{meta['path']}: snapshot kind {meta['kind']!r} has no sampler; valid: {valid}")
    build, sample_fn = SNAPSHOT_KINDS[meta["kind"]]
    if meta["kind"] == "translation" or cfg.input_dir or cfg.reverse:
        translate_folder(cfg, meta, state_dict)
        return
    if cfg.expect_snapshot is not None:  # CharacteristicGenerator's eval.py --mode: one of its two snapshot kinds
        if {"denoiser": "diffusion", "characteristic": "characteristic"}[cfg.expect_snapshot] != meta["kind"]:
            raise UserError(f"--expect_snapshot {cfg.expect_snapshot}: {meta['path']} is a {meta['kind']!r} snapshot")
        if cfg.expect_snapshot == "characteristic" and cfg.ode_solver is not None:
            print(
                f"note: --ode_solver {cfg.ode_solver} is ignored for a characteristic snapshot "
                "(as CharacteristicGenerator does)"
            )
            cfg = dataclasses.replace(cfg, ode_solver=None)

    accelerator = Accelerator(cpu=not torch.accelerator.is_available())  # CPU-only torchrun: shard over gloo
    device = accelerator.device
    model = build_from_snapshot(meta, state_dict, build)
    model.to(device).eval()  # eval: BatchNorm uses the snapshot's standing statistics, not the batch's
    if meta["kind"] == "characteristic":
        use_distilled_grid(model, meta)  # default t_min/t_max/rho: the grid the student was distilled on
    n_classes = getattr(model, "n_classes", 0)
    if cfg.class_label is not None and not 0 <= cfg.class_label < n_classes:
        detail = f"labels are 0..{n_classes - 1}" if n_classes else "the model is unconditional"
        raise UserError(f"--class_label {cfg.class_label}: {detail}")
    # Refuse bad flags before writing anything.
    gebm = meta["kind"] == "gebm"
    latent = latent_sampler_settings(cfg, applies=gebm)  # also refuses latent-MCMC flags for other snapshots
    if gebm:
        settings = latent
    elif meta["kind"] in ("diffusion", "characteristic"):
        settings = solver_settings(model, cfg)
    elif meta["kind"] == "discr_flow":
        settings = flow_settings(model, cfg.num_steps, cfg.total_steps)
    else:  # a generator: gan, score_gan
        settings = truncation_settings(model, cfg)
    if cfg.trajectory and meta["kind"] != "discr_flow":
        raise UserError(f"--trajectory animates a particle flow; {meta['path']} is a {meta['kind']!r} snapshot")
    points = len(getattr(model, "sample_shape", (1, 1, 1))) == 1  # 2-D toy data: no images
    if cfg.animation_every and (not gebm or points or cfg.animation_every < 0):
        raise UserError("--animation_every K (K >= 1) animates the chains of a GEBM snapshot of images")
    record = {"frames_every": cfg.animation_every} if gebm else None  # chain acceptance (and frames) of GEBMs

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    my_seeds = seeds[accelerator.process_index :: accelerator.num_processes]
    nfe, my_points, seconds = 0, [], 0.0
    batches = [my_seeds[i : i + cfg.batch_size] for i in range(0, len(my_seeds), cfg.batch_size)]
    for batch in progress(batches, accelerator.is_main_process, desc="sampling"):
        labels = None
        if n_classes:
            labels = torch.tensor([cfg.class_label if cfg.class_label is not None else s % n_classes for s in batch])
            labels = labels.to(device)
        start = time.perf_counter()
        images, nfe = sample_fn(model, batch, labels, device, **settings, **({"record": record} if gebm else {}))
        check_finite(images, f"the samples of seeds {batch[0]}..{batch[-1]}")  # never a silent black PNG
        if device.type != "cpu":
            torch.accelerator.synchronize()  # time the work, not its queueing
        seconds += time.perf_counter() - start
        if points:
            my_points.append(images.cpu().numpy())
            continue
        images = to_uint8(images).cpu()
        for s, image in zip(batch, images, strict=True):
            save_png(image, out_dir / f"{s:06d}.png")
    if points:  # each process writes its share; the main process merges them in seed order
        shard = np.concatenate(my_points) if my_points else np.zeros((0, *model.sample_shape), np.float32)
        np.save(out_dir / f".points-{accelerator.process_index}.npy", shard)
    accelerator.wait_for_everyone()
    mcmc = {}
    if gebm and settings["latent_sampler"] in METROPOLIS and settings["num_sampler_steps"]:
        per_step = record.get("accepted_per_step", torch.zeros(settings["num_sampler_steps"], dtype=torch.int64))
        counts = torch.cat([per_step, torch.tensor([record.get("chains", 0)])]).to(device)  # every process joins
        counts = accelerator.reduce(counts, reduction="sum").cpu() if accelerator.num_processes > 1 else counts.cpu()
        mcmc["acceptance"] = acceptance_summary(counts[:-1], int(counts[-1]), settings)

    # The grid is assembled from the written files, so it shows exactly what was saved, whoever wrote it.
    if accelerator.is_main_process:
        if points:
            shards = [out_dir / f".points-{r}.npy" for r in range(accelerator.num_processes)]
            merged = np.zeros((len(seeds), *model.sample_shape), np.float32)
            for r, path in enumerate(shards):
                merged[r :: accelerator.num_processes] = np.load(path)
                path.unlink()
            np.save(out_dir / "points.npy", merged)
            save_scatter(torch.from_numpy(merged), out_dir / "scatter.png")
        elif cfg.grid:
            grid_seeds = seeds[: cfg.grid_size]
            nrow = max(10, round(len(grid_seeds) ** 0.5))
            if n_classes and cfg.class_label is None and len(grid_seeds) % n_classes == 0:
                # one row per class: class = seed mod n_classes, so a stable sort by class groups the rows
                grid_seeds, nrow = sorted(grid_seeds, key=lambda s: s % n_classes), len(grid_seeds) // n_classes
            tiles = [torch.from_numpy(np.array(Image.open(out_dir / f"{s:06d}.png"))) for s in grid_seeds]
            tiles = torch.stack([t[None] if t.ndim == 2 else t.permute(2, 0, 1) for t in tiles])
            save_grid(tiles.float() / 127.5 - 1, out_dir / "grid.png", nrow=nrow)
        if cfg.trajectory:  # the flow again for the grid's seeds (2-D: all points), every state kept
            frame_seeds = seeds if points else seeds[: cfg.grid_size]
            states, _ = sample_fn(model, frame_seeds, None, device, trajectory=True, **settings)
            nrow = max(10, round(len(frame_seeds) ** 0.5))
            frames = [scatter_image(state) if points else grid_image(state, nrow) for state in states]
            save_animation(frames, out_dir / f"trajectory.{cfg.trajectory}")
        info = {
            "snapshot": meta["path"],
            "step": meta["step"],
            "model": meta["model"],
            "n_images": len(seeds),
            "seeds": [seeds[0], seeds[-1]],
            "class_label": cfg.class_label,
            "n_classes": n_classes,
            "nfe": nfe,
            # the main process's share of the network and solver time (other processes run in parallel)
            "sampling_seconds": round(seconds, 3),
            "seconds_per_1k_images": round(seconds / max(len(my_seeds), 1) * 1000, 3),
            "sampler": {k: "inf" if v == float("inf") else v for k, v in settings.items()},  # strict JSON
            **mcmc,
        }
        if points and meta["config"].get("dataset") == "gaussians":
            freqs, off = mode_frequencies(torch.from_numpy(merged))
            info |= {"mode_frequencies": [round(f, 4) for f in freqs.tolist()], "off_mode": round(off, 4)}
        (out_dir / "sample_info.json").write_text(json.dumps(info, indent=2))
        if record and record.get("frames"):
            save_chain_animation(model, record["frames"], out_dir / "chain.gif")
        what = "points" if points else "images"
        print(
            f"wrote {len(seeds)} {what} (seeds {seeds[0]}..{seeds[-1]}, {nfe} NFE each, "
            f"{info['seconds_per_1k_images']:.2f} s per 1000 on this process) to {out_dir}"
        )


def translate_folder(cfg: Config, meta: dict, state_dict: dict) -> None:
    """A translation snapshot on --input_dir: exactly one output PNG per input image, at the input's relative path
    with a .png suffix; inputs are dealt round-robin to the processes."""
    if meta["kind"] != "translation":
        raise UserError(f"--input_dir/--reverse apply to translation snapshots; {meta['path']} is {meta['kind']!r}")
    if not cfg.input_dir:
        raise UserError(f"{meta['path']} is a translation snapshot: give --input_dir, a folder of input images")
    root, out_dir = Path(cfg.input_dir), Path(cfg.out_dir)
    if not root.is_dir():
        raise UserError(f"--input_dir {cfg.input_dir}: no such folder")
    if out_dir.resolve() == root.resolve() or root.resolve() in out_dir.resolve().parents:
        raise UserError(f"--out_dir {cfg.out_dir} lies inside --input_dir: outputs would be read as inputs next time")
    files = image_files(root)
    if not files:
        raise UserError(f"--input_dir {cfg.input_dir}: no image files in it or below it")
    names = [f.relative_to(root).with_suffix(".png") for f in files]
    if len(set(names)) < len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise UserError(f"--input_dir: two inputs would both be written as {clash} (same name, other extensions)")
    build, sample_fn = SNAPSHOT_KINDS["translation"]
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    model = build_from_snapshot(meta, state_dict, build).to(accelerator.device).eval()
    if cfg.reverse and not getattr(model, "reversible", False):
        raise UserError(f"--reverse needs a CycleGAN snapshot (two generators); {meta['path']} has one")
    channels = model.out_channels if cfg.reverse else model.in_channels
    settings = dict(reverse=True) if cfg.reverse else {}

    mine = list(range(accelerator.process_index, len(files), accelerator.num_processes))
    batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    for batch in progress(batches, accelerator.is_main_process, desc="translating"):
        inputs = to_signed_unit(torch.stack([read_image(files[i], model.img_size, channels) for i in batch]))
        outputs, _ = sample_fn(model, inputs, None, accelerator.device, **settings)
        check_finite(outputs, f"the translations of {files[batch[0]]} ...")
        for i, image in zip(batch, to_uint8(outputs).cpu(), strict=True):
            (out_dir / names[i]).parent.mkdir(parents=True, exist_ok=True)
            save_png(image, out_dir / names[i])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.grid and Path("grid.png") not in names:  # [input | output] pairs of the first inputs, from the files
            first = range(min(len(files), cfg.grid_size // 2))
            tiles = [t for i in first for t in (read_image(files[i], model.img_size), read_image(out_dir / names[i]))]
            c = max(t.shape[0] for t in tiles)
            save_grid(to_signed_unit(torch.stack([t.expand(c, -1, -1) for t in tiles])), out_dir / "grid.png", nrow=10)
        info = dict(snapshot=meta["path"], step=meta["step"], model=meta["model"], input_dir=str(root))
        info |= dict(n_inputs=len(files), n_outputs=len(files), reverse=cfg.reverse, img_size=model.img_size)
        (out_dir / "sample_info.json").write_text(json.dumps(info, indent=2))
        direction = " (B -> A)" if cfg.reverse else ""
        print(f"wrote {len(files)} translations{direction} of the images in {root} to {out_dir}")


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
