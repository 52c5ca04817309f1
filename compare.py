"""Teacher ODE vs distilled student on the same seeds: a side-by-side grid and the sampling time of each
(CharacteristicGenerator's compare.py).

    python compare.py --teacher logs/fmnist_follmer_cond --student logs/fmnist_char_cond --out compare/fmnist
    python compare.py ... --teacher_solver heun --teacher_steps 18 --student_steps 1 2 4 --timing_images 1000

Row 0 is the teacher (its solver and grid), then one row per student step count; column k is seed k in every row
(the same latent z and the same label), so each column shows what distillation kept of the teacher's sample.
Writes <out>.png and <out>.json. Timing: every sampler generates --timing_images images in batches of --batch_size,
after one untimed warm-up batch, in this one process; the table gives seconds per 1,000 images and the speed-up over
the teacher. Only the network and solver are timed (no PNG writing).
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelling import build_denoiser
from sampling.diffusion import ODE_SOLVERS, StackedNoise, sample, use_distilled_grid
from utils.ckpt import build_from_snapshot, load_snapshot
from utils.cli import UserError, script_cli
from utils.grid import save_grid


@dataclass
class Config:
    teacher: str = field(default="", metadata={"help": "diffusion_train.py snapshot or run folder"})
    student: str = field(default="", metadata={"help": "distill_characteristic.py snapshot or run folder"})
    out: str = field(default="compare", metadata={"help": "writes <out>.png and <out>.json"})
    n_seeds: int = field(default=10, metadata={"help": "grid columns: seeds start_seed.."})
    start_seed: int = 0
    teacher_solver: str = field(default="heun", metadata={"choices": list(ODE_SOLVERS)})
    teacher_steps: int = field(default=18, metadata={"help": "grid points N (Heun: NFE 2N - 1 = 35)"})
    teacher_rho: float | None = field(default=None, metadata={"help": "default: the teacher's (Föllmer 1)"})
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    timing_images: int = field(default=200, metadata={"help": "images timed per sampler; 0 = no timing"})
    batch_size: int = 100


def load(path: str, kind: str):
    meta, state_dict = load_snapshot(path)
    if meta["kind"] != kind:
        raise UserError(f"{meta['path']}: a {meta['kind']!r} snapshot where a {kind!r} one is needed")
    return build_from_snapshot(meta, state_dict, build_denoiser).eval(), meta


def main(cfg: Config) -> None:
    if not cfg.teacher or not cfg.student:
        raise UserError("--teacher and --student are both required")
    if cfg.n_seeds < 1 or cfg.batch_size < 1 or cfg.timing_images < 0 or min(cfg.student_steps, default=0) < 1:
        raise UserError("--n_seeds, --batch_size and every --student_steps must be >= 1, --timing_images >= 0")
    teacher, teacher_meta = load(cfg.teacher, "diffusion")
    student, student_meta = load(cfg.student, "characteristic")
    use_distilled_grid(student, student_meta)  # the student samples on the grid it was distilled on
    if teacher.sample_shape != student.sample_shape or teacher.n_classes != student.n_classes:
        raise UserError("the teacher and the student generate different shapes or classes")
    if len(teacher.sample_shape) != 3:
        raise UserError("compare.py draws image grids; 2-D toy models have no images")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(device), student.to(device)

    rows = [("teacher", teacher, dict(solver=cfg.teacher_solver, num_steps=cfg.teacher_steps, rho=cfg.teacher_rho))]
    grid = dict(t_min=student.t_min, t_max=student.t_max, rho=student.rho)  # recorded in <out>.json
    rows += [(f"student-{n}", student, dict(num_steps=n, **grid)) for n in cfg.student_steps]

    def generate(model, settings, seeds):
        labels = torch.tensor([s % model.n_classes for s in seeds], device=device) if model.n_classes else None
        return sample(model, StackedNoise(seeds), labels, device=device, **settings)

    seeds = list(range(cfg.start_seed, cfg.start_seed + cfg.n_seeds))
    images, results = [], []
    for name, model, settings in rows:
        out, nfe = generate(model, settings, seeds)
        images.append(out.float().cpu())
        result = {"sampler": name, "nfe": nfe, **{k: v for k, v in settings.items() if v is not None}}
        if cfg.timing_images:
            timed = list(range(cfg.timing_images))
            generate(model, settings, timed[: cfg.batch_size])  # warm-up: allocator, kernels, caches
            start = time.perf_counter()
            for i in range(0, len(timed), cfg.batch_size):
                generate(model, settings, timed[i : i + cfg.batch_size])
            if device.type == "cuda":
                torch.cuda.synchronize()
            result["seconds_per_1k_images"] = (time.perf_counter() - start) / len(timed) * 1000
        results.append(result)
        print(name, json.dumps(result))

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(images), out.with_suffix(".png"), nrow=cfg.n_seeds)
    if cfg.timing_images:
        base = results[0]["seconds_per_1k_images"]
        for result in results:
            result["speedup_vs_teacher"] = base / result["seconds_per_1k_images"]
        print(f"{'sampler':<12} {'NFE':>4} {'s / 1k images':>14} {'speed-up':>9}")
        for r in results:
            print(
                f"{r['sampler']:<12} {r['nfe']:>4} {r['seconds_per_1k_images']:>14.2f} {r['speedup_vs_teacher']:>8.1f}x"
            )
    info = {
        "teacher": teacher_meta["path"],
        "student": student_meta["path"],
        "seeds": [seeds[0], seeds[-1]],
        "device": str(device),
        "timing_images": cfg.timing_images,
        "batch_size": cfg.batch_size,
        "rows": results,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    names = ", ".join(r["sampler"] for r in results)
    print(f"wrote {out.with_suffix('.png')} (rows: {names}) and {out.with_suffix('.json')}")


cli = script_cli(__file__, __doc__, Config, main)


if __name__ == "__main__":
    cli()
