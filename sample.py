"""Write PNG samples (one file per seed, plus a grid) from any genzoo snapshot.

    python sample.py --checkpoint logs/mnist_dcgan --n_samples 1000 --out_dir samples/mnist_dcgan --seed 0
    python sample.py --checkpoint logs/mnist_dcgan_cond --n_samples 100 --class_label 3 --out_dir samples/threes
    accelerate launch --num_processes 4 sample.py --checkpoint logs/mnist_dcgan --start_seed 0 --end_seed 49999 \
        --out_dir samples/mnist_dcgan_50k
    torchrun --nproc_per_node 2 sample.py ...

Image k is drawn from its own RNG seeded with its seed (`--seed + k`, or each seed of `--start_seed..--end_seed`,
inclusive), so the files do not depend on the batch size or the number of processes; seeds are dealt to processes
round-robin. Conditional models use `--class_label`, else class = seed mod n_classes (balanced classes).
The snapshot says which model to build; nothing from the training script's flags is needed.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from modelling import build_generator
from utils.ckpt import load_snapshot
from utils.cli import UserError, parse, user_errors
from utils.grid import save_grid, save_png, to_uint8
from utils.tracking import progress

GRID_MAX = 100  # the grid shows the first 100 seeds


@dataclass
class Config:
    checkpoint: str = field(default="", metadata={"help": "snapshot .safetensors, or a run folder (newest snapshot)"})
    out_dir: str = "samples"
    n_samples: int = 64
    seed: int = field(default=0, metadata={"help": "first seed when --start_seed/--end_seed are not given"})
    start_seed: int | None = None
    end_seed: int | None = field(default=None, metadata={"help": "inclusive"})
    batch_size: int = 64
    class_label: int | None = field(default=None, metadata={"help": "conditional models: one class for every image"})
    grid: bool = field(default=True, metadata={"help": "also write grid.png of the first 100 seeds"})


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


@torch.no_grad()
def gan_images(generator, seeds: list[int], labels: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    """One latent per seed from that seed's own RNG; one network evaluation (NFE = 1)."""
    zs = torch.stack([torch.randn(generator.z_dim, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return generator(zs.to(device), labels), 1


# Snapshot kind -> (builder, sampler). Diffusion and distilled models add their entries here.
SAMPLERS = {"gan": (build_generator, gan_images)}


def main(cfg: Config) -> None:
    if not cfg.checkpoint:
        raise UserError("--checkpoint is required (a run folder such as logs/mnist_dcgan, or a snapshot file)")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    seeds = seed_list(cfg)
    meta, state_dict = load_snapshot(cfg.checkpoint)
    if meta["kind"] not in SAMPLERS:
        raise UserError(f"{meta['path']}: snapshot kind {meta['kind']!r} has no sampler; valid: {sorted(SAMPLERS)}")
    build, sample_fn = SAMPLERS[meta["kind"]]

    accelerator = Accelerator(cpu=not torch.accelerator.is_available())  # CPU-only torchrun: shard over gloo
    device = accelerator.device
    try:
        model = build(meta["model"], **meta["model_kwargs"])
        model.load_state_dict(state_dict)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{meta['path']}: snapshot does not match model {meta['model']!r}: {str(e).splitlines()[0]}")
    model.to(device).eval()  # eval: BatchNorm uses the snapshot's standing statistics, not the batch's
    n_classes = getattr(model, "n_classes", 0)
    if cfg.class_label is not None and not 0 <= cfg.class_label < n_classes:
        detail = f"labels are 0..{n_classes - 1}" if n_classes else "the model is unconditional"
        raise UserError(f"--class_label {cfg.class_label}: {detail}")

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    my_seeds = seeds[accelerator.process_index :: accelerator.num_processes]
    nfe = 0
    batches = [my_seeds[i : i + cfg.batch_size] for i in range(0, len(my_seeds), cfg.batch_size)]
    for batch in progress(batches, accelerator.is_main_process, desc="sampling"):
        labels = None
        if n_classes:
            labels = torch.tensor([cfg.class_label if cfg.class_label is not None else s % n_classes for s in batch])
            labels = labels.to(device)
        images, nfe = sample_fn(model, batch, labels, device)
        images = to_uint8(images).cpu()
        for s, image in zip(batch, images, strict=True):
            save_png(image, out_dir / f"{s:06d}.png")
    accelerator.wait_for_everyone()

    # The grid is assembled from the written files, so it shows exactly what was saved, whoever wrote it.
    if accelerator.is_main_process:
        if cfg.grid:
            tiles = [torch.from_numpy(np.array(Image.open(out_dir / f"{s:06d}.png"))) for s in seeds[:GRID_MAX]]
            tiles = torch.stack([t[None] if t.ndim == 2 else t.permute(2, 0, 1) for t in tiles])
            nrow = n_classes if n_classes and cfg.class_label is None else 10
            save_grid(tiles.float() / 127.5 - 1, out_dir / "grid.png", nrow=nrow)
        info = {
            "snapshot": meta["path"],
            "step": meta["step"],
            "model": meta["model"],
            "n_images": len(seeds),
            "seeds": [seeds[0], seeds[-1]],
            "class_label": cfg.class_label,
            "n_classes": n_classes,
            "nfe": nfe,
        }
        (out_dir / "sample_info.json").write_text(json.dumps(info, indent=2))
        print(
            f"wrote {len(seeds)} images (seeds {seeds[0]}..{seeds[-1]}, {nfe} network evaluation(s) each) to {out_dir}"
        )


if __name__ == "__main__":
    with user_errors():
        main(parse(Config, description=__doc__.split("\n")[0]))
