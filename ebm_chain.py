"""FD and KALE along the latent MCMC chains of a GEBM snapshot: GEBM's sampling mode as a command.

    python ebm_chain.py --checkpoint logs/fmnist_gebm --n_samples 5000 --num_sampler_steps 1000 --eval_every 10 \
        --out_dir chain/fmnist_langevin                        # GEBM's sampling.yaml: langevin, gamma 1e-4, T 100
    python ebm_chain.py --checkpoint logs/cifar10_gebm --metric fid --eval_weights pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 2 ebm_chain.py ...               # chains and statistics shared out to the processes

Chains start at the base latents of seeds 0..N-1 (so step 0 is the base generator) and run the sampler of
sample.py's flags (same names, same defaults: sampling/latent_mcmc.py); every --eval_every steps the current
samples G(z) are scored with the FD metric of the training scripts (`--metric auto`: FD_cls for 1-channel 28/32 px
data, FD on pixels otherwise, `fid` with the Inception file) against the snapshot's training set, and with KALE
(metrics/kale.py; the energy's log-partition from training). Writes chain.json (one row per evaluation: step, step
size, FD, KALE, acceptance of the steps since the last row, seconds), chain.png (both curves against the step)
and chain.gif (the first 64 chains at every evaluation). GEBM ran this in chunks of 10 steps and scored after each;
here the chunk is --eval_every and the chains are exactly those of one uninterrupted run (per-seed noise).

A separate script rather than a sample.py flag: scoring needs the training data, a detector and its reference
statistics, which sample.py (a writer of images for fid.py) never loads.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from metrics.evaluate import Evaluator, resolve_metric
from metrics.kale import KALEEvaluator
from modelling import build_gebm
from sampling.latent_mcmc import (
    METROPOLIS,
    ChainNoise,
    LatentChains,
    LatentMcmcConfig,
    latent_potential,
    latent_sampler_settings,
    save_chain_animation,
)
from utils.ckpt import build_from_snapshot, load_snapshot
from utils.cli import UserError, script_cli
from utils.data import build_dataset
from utils.run import EVAL_METRIC_CHOICES
from utils.tracking import progress

GIF_CHAINS = 64


@dataclass
class Config(LatentMcmcConfig):  # sample.py's latent-MCMC flags (sampling/latent_mcmc.py) first
    checkpoint: str = field(default="", metadata={"help": "GEBM snapshot, or an ebm_train.py run folder"})
    out_dir: str = "chain"
    n_samples: int = field(default=5000, metadata={"help": "chains (seeds 0..N-1); GEBM's sampling.yaml: 5000"})
    batch_size: int = field(default=500, metadata={"help": "chains per batch (GEBM's sample_b_size)"})
    eval_every: int = field(default=10, metadata={"help": "sampler steps between evaluations (GEBM: 10)"})
    metric: str = field(default="auto", metadata={"choices": EVAL_METRIC_CHOICES, "help": "FD metric, as training"})
    eval_weights: str = field(default="", metadata={"help": "fid: the Inception file; fd_cls: another classifier"})
    kale: bool = field(default=True, metadata={"help": "also KALE along the chain"})
    data_dir: str = field(default="", metadata={"help": "the training data (default: the snapshot's --data_dir)"})


def save_plot(
    rows: list[dict], keys: list[str], path: Path, title: str = "", width: int = 720, panel: int = 260
) -> None:
    """One line-chart panel per key (value against sampler step), with 5 labelled y levels and the evaluated steps
    as x ticks (at most 11 labelled)."""
    font = ImageFont.load_default(size=13)
    image = Image.new("RGB", (width, panel * len(keys) + 24), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 4), title, fill="black", font=font)
    left, right, top, bottom = 80, 20, 50, 40
    for i, key in enumerate(keys):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        y0 = i * panel
        x_end, y_end = width - right, y0 + panel - bottom
        draw.rectangle([left, y0 + top, x_end, y_end], outline="black")
        draw.text((left, y0 + top - 18), f"{key} against the number of sampler steps", fill="black", font=font)
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
        sx, sy = (x_end - left) / max(x_hi - x_lo, 1), (y_end - y0 - top) / ((y_hi - y_lo) or 1.0)
        for k in range(5):  # y levels
            value = y_lo + (y_hi - y_lo) * k / 4
            y = y_end - (value - y_lo) * sy
            draw.line([(left, y), (x_end, y)], fill=(225, 225, 225))
            draw.text((6, y - 7), f"{value:.4g}", fill="black", font=font)
        for x in xs[:: max(1, -(-len(xs) // 11))] + [xs[-1]]:  # x ticks
            draw.text((left + (x - x_lo) * sx - 8, y_end + 6), str(x), fill="black", font=font)
        line = [(left + (x - x_lo) * sx, y_end - (y - y_lo) * sy) for x, y in points]
        if len(line) > 1:
            draw.line(line, fill=(200, 30, 30), width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    image.save(path)


def main(cfg: Config) -> None:
    if not cfg.checkpoint:
        raise UserError("--checkpoint is required (an ebm_train.py run folder or a GEBM snapshot)")
    if cfg.n_samples < 2 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise UserError("need --n_samples >= 2, --batch_size >= 1 and --eval_every >= 1")
    settings = latent_sampler_settings(cfg)
    meta, weights = load_snapshot(cfg.checkpoint)
    if meta["kind"] != "gebm":
        raise UserError(f"{meta['path']}: a {meta['kind']!r} snapshot; ebm_chain.py needs a GEBM (ebm_train.py)")
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    model = build_from_snapshot(meta, weights, build_gebm).to(device).eval()
    train_cfg, out_dir = meta["config"], Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Data: the snapshot's training set (and its test split for KALE where there is one).
    data = dict(data_dir=cfg.data_dir or train_cfg.get("data_dir", "data"), img_size=train_cfg.get("img_size", 32))
    with accelerator.main_process_first():
        dataset = build_dataset(train_cfg["dataset"], **data, download=train_cfg.get("download", True))
    test = None
    if cfg.kale and train_cfg["dataset"] not in ("folder", "celeba"):
        test = build_dataset(train_cfg["dataset"], **data, train=False, download=train_cfg.get("download", True))
    metric = resolve_metric(cfg.metric, tuple(dataset.sample_shape))
    fd = Evaluator(accelerator, metric, cfg.n_samples, dataset, out_dir / f"ref-{metric}.npz", cfg.eval_weights)
    kale = KALEEvaluator(accelerator, cfg.n_samples, dataset, test, fixed=True) if cfg.kale else None

    # Chains: this process's seeds in batches; every chain is a pure function of its seed.
    mine = list(range(rank, cfg.n_samples, world))
    row_of = {seed: i for i, seed in enumerate(mine)}
    potential = latent_potential(model, settings["temperature"])
    batches = []
    for first in range(0, len(mine), cfg.batch_size):
        seeds = mine[first : first + cfg.batch_size]
        noise = ChainNoise(seeds)
        zs = noise.randn(model.z_dim, device)
        batches.append(LatentChains(
            potential, zs, noise, settings["latent_sampler"], settings["lmc_gamma"], settings["lmc_kappa"],
            settings["lmc_gamma_decay"], settings["lmc_gamma_decay_every"],
        ))  # fmt: skip

    def chain_samples(model, seeds, labels, device):
        """The chains' current samples of `seeds` (this process's, in the evaluators' order)."""
        zs = torch.cat([chains.z for chains in batches])[[row_of[s] for s in seeds]]
        with torch.no_grad():
            return model.base(zs), 1

    rows, frames, total = [], [], settings["num_sampler_steps"]
    checkpoints = sorted({0, total} | set(range(0, total, cfg.eval_every)))
    for target in progress(checkpoints, accelerator.is_main_process, desc="chain"):
        start = time.perf_counter()
        accepted_before = sum(int(chains.accepted.sum()) for chains in batches)
        for chains in batches:
            chains.advance(target - chains.steps)
        steps_done = target - (rows[-1]["step"] if rows else 0)
        sampling_seconds = time.perf_counter() - start
        row = {"step": target, "gamma": batches[0].gamma_at(max(target, 1)) if batches else None}
        row[fd.metric] = fd(chain_samples, model, 0)["value"]
        if kale is not None:
            scores = kale(chain_samples, model)
            row |= {"kale": scores["value"]} | ({"kale_test": scores["kale_test"]} if "kale_test" in scores else {})
        if settings["latent_sampler"] in METROPOLIS and steps_done:
            counts = torch.tensor([sum(int(c.accepted.sum()) for c in batches) - accepted_before, len(mine)])
            counts = accelerator.reduce(counts.to(device), reduction="sum").cpu() if world > 1 else counts
            row["acceptance"] = round(counts[0].item() / (counts[1].item() * steps_done), 4)
        row |= {"sampling_seconds": round(sampling_seconds, 3), "seconds": round(time.perf_counter() - start, 3)}
        rows.append(row)
        if batches:
            frames.append(torch.cat([chains.z for chains in batches])[:GIF_CHAINS].cpu())
        if accelerator.is_main_process:
            progress_line = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
            tqdm.write(f"step {target}: {progress_line}")

    if accelerator.is_main_process:
        info = {"snapshot": meta["path"], "n_samples": cfg.n_samples, "metric": fd.metric, "sampler": settings}
        (out_dir / "chain.json").write_text(json.dumps(info | {"rows": rows}, indent=2))
        title = (f"{meta['path']}: {settings['latent_sampler']}, gamma {settings['lmc_gamma']:g}, temperature "
                 f"{settings['temperature']:g}, {cfg.n_samples} chains")  # fmt: skip
        save_plot(rows, [fd.metric] + (["kale"] if kale is not None else []), out_dir / "chain.png", title)
        if frames and len(model.sample_shape) == 3:
            save_chain_animation(model, frames, out_dir / "chain.gif", duration_ms=300)
        best = min(rows, key=lambda r: r[fd.metric])
        print(f"wrote {out_dir / 'chain.json'} and chain.png: {fd.metric} {rows[0][fd.metric]:.4f} at step 0 "
              f"(the base), {best[fd.metric]:.4f} at step {best['step']} (lowest), {rows[-1][fd.metric]:.4f} at "
              f"step {rows[-1]['step']}")  # fmt: skip
    accelerator.wait_for_everyone()


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
