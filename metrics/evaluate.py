"""Detector statistics of an image set, and the evaluation of a generator during training (`--eval_interval`:
`loop_evaluator`, handed to utils/run.py `Run.begin`) or of a saved run (`--only_test`: `score_snapshot`). fid.py's
`ref`/`gen` modes and the training scripts share `feature_statistics`, so an in-loop FD_cls is computed exactly as
`sample.py` + `fid.py` would compute it on the same seeds.

Metrics (`--eval_metric`), all "lower is better" Fréchet distances against the training set:
- `fd_cls`: genzoo's Fashion-MNIST classifier features (1-channel 28/32 px data; offline; also the class accuracy
  of conditional samples);
- `fd_pixels`: raw pixels in [0, 1] (any image data; offline);
- `fid`: the TF FID Inception (needs `pt_inception-2015-12-05-6726825d.pth`, see fid.py);
- `fd_points`: the raw coordinates of 2-D toy data.
`auto` picks fd_points for toy data, fd_cls for 1-channel 28/32 px images and fd_pixels otherwise: never a metric
whose weights this machine cannot have.
Generated samples follow sample.py's convention: image k comes from seed k (seeds 0..N-1, dealt round-robin to the
processes), class = seed mod n_classes, and pixels are quantised to uint8 first, as a PNG would be.
"""

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from metrics.detectors import build_detector
from metrics.stats import FeatureMoments, frechet_distance
from sampling import SNAPSHOT_KINDS
from utils.ckpt import build_from_snapshot, load_snapshot, write_atomic
from utils.cli import UserError
from utils.grid import check_finite, to_uint8
from utils.run import EVAL_METRIC_CHOICES
from utils.tracking import progress

EVAL_METRICS = {"fd_cls": "fmnist", "fd_pixels": "pixels", "fid": "inception", "fd_points": "points"}


def feature_statistics(accelerator, detector, batches, n_total: int, max_features: int = 0, desc: str = "") -> dict:
    """Float64 moments of `detector` features over every process's `batches`, all-reduced, so the result does not
    depend on the number of processes (up to the detector's own fp32 arithmetic).

    `batches` yields this process's (indices, uint8 images (B, C, H, W) or float points (B, D), intended labels or
    None); indices run over 0..n_total-1 across processes. The features of a fixed random subset of `max_features`
    indices are kept (for KID and precision/recall), and the accuracy of the intended labels when the detector is a
    classifier and labels are given."""
    keep = set(torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[:max_features].tolist())
    moments, kept, correct, labelled, shape = None, [], 0, 0, None
    for indices, images, labels in progress(batches, accelerator.is_main_process, desc=desc or f"{detector.name}"):
        if shape is None:
            shape = tuple(images.shape[1:])
        elif tuple(images.shape[1:]) != shape:
            raise UserError(
                f"images of different sizes or channel counts: {shape} and {tuple(images.shape[1:])}; "
                "resize them first (statistics need one input size)"
            )
        images = images.to(accelerator.device)
        with torch.no_grad():
            feats = detector(images).double()
            if labels is not None and hasattr(detector, "logits"):
                correct += (detector.logits(images).argmax(1).cpu() == labels.cpu()).sum().item()
                labelled += len(labels)
        if moments is None:
            moments = FeatureMoments(feats.shape[1])
        moments.update(feats)
        kept += [(i, row.float().numpy()) for i, row in zip(indices, feats.cpu(), strict=True) if i in keep]
    # A process that saw no image (more processes than images) still joins the all-reduce, with the others' size.
    dims = accelerator.gather(torch.tensor([moments.dim if moments else -1], device=accelerator.device))
    moments = moments or FeatureMoments(max(int(dims.max()), 0))
    moments.all_reduce(accelerator)
    kept = sorted(gather_object(kept), key=lambda pair: pair[0])
    counts = torch.tensor([correct, labelled], dtype=torch.int64, device=accelerator.device)
    correct, labelled = accelerator.reduce(counts, reduction="sum").tolist()
    if moments.n < 2:
        raise UserError(f"{moments.n} image(s): a covariance needs at least 2")
    mu, sigma = moments.mean_cov()
    stats = {
        "mu": mu,
        "sigma": sigma,
        "count": np.int64(moments.n),
        "detector": np.str_(detector.name),
        "features": np.array([row for _, row in kept], dtype=np.float32).reshape(len(kept), moments.dim),
    }
    if labelled:
        stats["accuracy"] = np.float64(correct / labelled)
    return stats


def dataset_batches(dataset, rank: int, world: int, batch_size: int, quantise: bool = True, num_workers: int = 0):
    """This process's share of a dataset as feature_statistics batches: every world-th item, in order, decoded in
    `num_workers` processes; images back to uint8 (exact: the datasets map uint8 u to u / 127.5 - 1), points as
    they are."""
    mine = list(range(rank, len(dataset), world))
    chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    # batch_size=None: each sampler item is a list of indices, which the dataset reads in one call.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=chunks, num_workers=num_workers)
    for indices, (samples, _) in zip(chunks, loader, strict=True):
        yield indices, to_uint8(samples) if quantise else samples.float(), None


def resolve_metric(name: str, sample_shape: tuple[int, ...]) -> str:
    """`--eval_metric` for data of `sample_shape`: `auto` resolved, metrics that cannot take this data refused."""
    toy = len(sample_shape) == 1
    cls_shape = len(sample_shape) == 3 and sample_shape[0] == 1 and sample_shape[1:] in ((28, 28), (32, 32))
    if name == "auto":
        return "fd_points" if toy else "fd_cls" if cls_shape else "fd_pixels"
    if name not in EVAL_METRICS:
        raise UserError(f"unknown --eval_metric {name!r}; valid: {['auto', *sorted(EVAL_METRICS)]}")
    if toy != (name == "fd_points"):
        raise UserError(f"--eval_metric {name} does not apply to {'2-D points' if toy else 'images'}")
    if name == "fd_cls" and not cls_shape:
        raise UserError(f"--eval_metric fd_cls takes 1-channel 28 or 32 px images, the data is {sample_shape}")
    return name


class Evaluator:
    """FD of `n_samples` generated samples against the whole training set, whose statistics are computed once and
    cached in `ref_path` (reused on resume and by --only_test)."""

    def __init__(self, accelerator, metric: str, n_samples: int, dataset, ref_path, weights: str = "", batch_size=250):
        self.accelerator, self.n_samples, self.batch_size = accelerator, n_samples, batch_size
        self.metric = resolve_metric(metric, tuple(dataset.sample_shape))
        self.quantise = self.metric != "fd_points"
        self.detector = build_detector(EVAL_METRICS[self.metric], weights or None).to(accelerator.device)
        self.ref = self._reference(dataset, ref_path)

    def _reference(self, dataset, path) -> dict:
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                ref = {k: f[k] for k in f.files}
            if int(ref["count"]) == len(dataset) and str(ref["detector"]) == self.detector.name:
                return ref
        acc = self.accelerator
        batches = dataset_batches(dataset, acc.process_index, acc.num_processes, self.batch_size, self.quantise)
        ref = feature_statistics(acc, self.detector, batches, len(dataset), desc=f"reference {self.metric}")
        if acc.is_main_process:
            buffer = io.BytesIO()
            np.savez(buffer, **{k: v for k, v in ref.items() if k != "features"})
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buffer.getvalue())
        return ref

    @torch.no_grad()
    def __call__(self, sample_fn, model, n_classes: int) -> dict:
        """Score `sample_fn(model, seeds, labels, device) -> (samples in [-1, 1], nfe)` on seeds 0..n_samples-1, with
        `model` in eval mode (no dropout, standing statistics); its mode is restored afterwards."""
        acc, start, was_training = self.accelerator, time.perf_counter(), model.training
        model.eval()
        mine = list(range(acc.process_index, self.n_samples, acc.num_processes))

        def batches():
            for first in range(0, len(mine), self.batch_size):
                seeds = mine[first : first + self.batch_size]
                labels = torch.tensor([s % n_classes for s in seeds]) if n_classes else None
                samples, _ = sample_fn(model, seeds, None if labels is None else labels.to(acc.device), acc.device)
                check_finite(samples, "the evaluated model's samples")
                yield seeds, to_uint8(samples).cpu() if self.quantise else samples.float().cpu(), labels

        stats = feature_statistics(acc, self.detector, batches(), self.n_samples, desc=f"eval {self.metric}")
        model.train(was_training)
        value = frechet_distance(self.ref["mu"], self.ref["sigma"], stats["mu"], stats["sigma"])
        result = {"metric": self.metric, "value": value, "n_samples": self.n_samples}
        if "accuracy" in stats:
            result["accuracy"] = float(stats["accuracy"])
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result


def run_evaluator(accelerator, cfg, dataset, run_dir: Path) -> Evaluator:
    """The evaluator of a run's --eval_metric (one of utils.run.EVAL_METRIC_CHOICES) against `dataset`, its reference
    statistics cached in `run_dir`/eval/."""
    if dataset is None:
        raise UserError("this script has no training data to evaluate against; --eval_interval is not available")
    metric = resolve_metric(cfg.eval_metric, tuple(dataset.sample_shape))
    ref_path = run_dir / "eval" / f"ref-{metric}.npz"
    return Evaluator(accelerator, metric, cfg.eval_samples, dataset, ref_path, cfg.eval_weights)


def loop_evaluator(run, accelerator, dataset) -> Evaluator | None:
    """What a training script hands to `run.begin`: the evaluator of --eval_metric when the run evaluates in the
    loop with an FD metric; None without --eval_interval or when the script scores its own metric."""
    cfg = run.cfg
    if cfg.eval_interval and cfg.eval_metric in EVAL_METRIC_CHOICES:
        return run_evaluator(accelerator, cfg, dataset, run.dir)
    return None


def score_snapshot(run, accelerator, dataset, scores_fn=None) -> dict:
    """--only_test: evaluate the newest snapshot (--load_best: the best) of the run folder (--resume/--load naming a
    run folder, else `run.dir`) with the evaluation settings, without training; write test/*.json. A family's own
    metric comes from `scores_fn(model, meta) -> {name: value}`."""
    cfg = run.cfg
    source = Path(cfg.resume) if cfg.resume not in ("", "latest") else run.dir
    target = source / "snapshots" / "best.safetensors" if cfg.load_best else source
    if cfg.load_best and not target.is_file():
        raise UserError(f"--only_test --load_best: {source} has no snapshots/best.safetensors")
    meta, weights = load_snapshot(target)
    if meta["kind"] not in SNAPSHOT_KINDS:
        raise UserError(f"{meta['path']}: snapshot kind {meta['kind']!r} cannot be evaluated here")
    build, sample_fn = SNAPSHOT_KINDS[meta["kind"]]
    model = build_from_snapshot(meta, weights, build).to(accelerator.device).eval()
    result = {"snapshot": meta["path"], "step": meta["step"]}
    if cfg.eval_metric in EVAL_METRIC_CHOICES:
        evaluator = run_evaluator(accelerator, cfg, dataset, source)
        result |= evaluator(sample_fn, model, getattr(model, "n_classes", 0))
    elif scores_fn is None:
        raise UserError(f"--only_test with --eval_metric {cfg.eval_metric} is not supported by this script")
    else:
        result |= scores_fn(model, meta)
        result |= {"metric": cfg.eval_metric, "value": float(result[cfg.eval_metric])}
    if accelerator.is_main_process:
        (source / "test").mkdir(parents=True, exist_ok=True)
        name = f"{'best' if cfg.load_best else 'last'}-step-{meta['step']:08d}-{result['metric']}.json"
        write_atomic(source / "test" / name, json.dumps(result, indent=2))
        extra = f" on {result['n_samples']} samples" if "n_samples" in result else ""
        extra += f", class accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
        print(f"{meta['path']} (step {meta['step']}): {result['metric']} {result['value']:.4f}{extra}; "
              f"wrote {source / 'test' / name}")  # fmt: skip
    return result
