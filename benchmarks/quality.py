"""One equal-budget quality table for every family: the same data (Fashion-MNIST), one torch thread per run, FD_cls
in the loop at fixed intervals and on many samples at the end, read from the runs' own files.

    python benchmarks/quality.py --out benchmarks/results/quality              # the table (about 3 h on 2 cores)
    python benchmarks/quality.py --only dcgan,edm --out /tmp/q                 # some families
    python benchmarks/quality.py --smoke --data_dir /tmp/idx --out /tmp/q      # every code path on tiny budgets
    python benchmarks/quality.py --publish       # results.json again into results.md, README.md, docs/results.md

Per family (benchmarks/quality_fashion_mnist.yaml says which script, flags and budget), as a user would run it: the
training script with `--eval_interval` (FD_cls on `eval_samples` samples; translation: its own metric), timed by
the lines it prints; then per table row `sample.py` on `final_samples` seeds (timed: sampling seconds per 1k
images), `fid.py --mode gen --detector fmnist`, and FD_cls, precision/recall and the class accuracy against the
training set's statistics (`fid.py --mode ref`, computed once), with the library functions `fid.py --mode fid`
uses; a row that keeps the best of several ways of sampling (`best_of`) chooses on `eval_samples` samples.
Two families run side by side (`--jobs 2`), each on one thread; a family that needs another (a teacher, a data
score) waits for it. Writes results.json, results.md, curves.png (FD_cls against minutes, one line per family) and
grids/<row>.png. "minutes" are wall minutes on one thread since the training process started (evaluations
included); a family that fails becomes an error row and the others go on.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metrics.stats import frechet_distance, precision_recall  # noqa: E402

CONFIG = ROOT / "benchmarks" / "quality_fashion_mnist.yaml"
# The in-loop evaluation line of utils/run.py: "step 500: fd_cls 41.2345 on 2000 samples ...".
EVAL_LINE = re.compile(r"^step (\d+): (\w+) (-?[\d.]+(?:e[-+]?\d+)?|nan|inf)\b")
# --smoke: every family at a few steps with its tiny networks (`smoke_args`), so a test can run the whole pipeline.
SMOKE = {"n_steps": 4, "eval_first": 1, "eval_interval": 2, "eval_samples": 32, "final_samples": 48}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (120, 60, 0),
           (0, 90, 160), (200, 0, 120), (90, 140, 0), (160, 160, 255)]  # fmt: skip


class FamilyError(RuntimeError):
    """A command of a family failed; the message holds the command and the end of its output."""


def run_command(cmd: list[str], log: Path, on_line=None) -> float:
    """Run `cmd` from the repository root with one torch thread, appending its output to `log`; call
    `on_line(line, seconds_since_start)` for each line. Returns the wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        tail = []
        for line in process.stdout:
            out.write(line)
            out.flush()  # the log can be followed while the family trains
            tail = (tail + [line])[-30:]
            if on_line is not None:
                on_line(line.rstrip("\n"), time.perf_counter() - start)
        process.wait()
    if process.returncode != 0:
        raise FamilyError(f"{shlex.join(cmd)} exited {process.returncode}:\n{''.join(tail)}")
    return time.perf_counter() - start


def train(name: str, family: dict, spec: dict, args, work: Path) -> dict:
    """Train one family; return its run folder, training command, minutes and the in-loop curve."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = [str(a) for a in family["args"]]
    if family.get("needs"):
        flags += [family["needs_flag"], str(work / "runs" / family["needs"])]
    if args.smoke:
        flags += [str(a) for a in family.get("smoke_args", [])] + ["--n_steps", str(SMOKE["n_steps"])]
    interval = SMOKE["eval_interval"] if args.smoke else family["eval_interval"]
    first = SMOKE["eval_first"] if args.smoke else family.get("eval_first", 0)
    samples = SMOKE["eval_samples"] if args.smoke else spec["eval_samples"]
    data = [] if family.get("needs_flag") == "--teacher" else ["--data_dir", args.data_dir, "--no-download"]
    every = str(interval)  # evaluation, log row and grid together; one checkpoint, the final one
    cmd = [sys.executable, family["script"], *flags, *data, "--workdir", str(run_dir), "--loggers", "none",
           "--eval_interval", every, "--eval_first", str(first), "--eval_samples", str(samples), "--seed", "0",
           "--sample_interval", every, "--log_interval", every, "--checkpoint_interval", str(10**9)]  # fmt: skip
    curve = []

    def on_line(line: str, seconds: float) -> None:
        match = EVAL_LINE.match(line)
        if match:
            curve.append({"step": int(match[1]), "metric": match[2], "value": float(match[3]), "minutes": seconds / 60})

    seconds = run_command(cmd, work / "logs" / f"{name}.log", on_line)
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    if not curve:
        raise FamilyError(f"{name}: the run printed no evaluation")
    kimg = rows[-1]["kimg"]
    return {"run_dir": run_dir, "command": cmd, "minutes": seconds / 60, "kimg": kimg, "curve": curve,
            "sec_per_kimg": seconds / kimg if kimg else float("nan")}  # fmt: skip


def score_samples(name: str, run_dir: Path, sample_args: list[str], n: int, work: Path, ref: dict) -> dict:
    """sample.py on seeds 0..n-1 (timed by its own sample_info.json), fid.py --mode gen, then FD_cls,
    precision/recall and the class accuracy against the reference statistics."""
    out = work / "samples" / name
    shutil.rmtree(out, ignore_errors=True)
    log = work / "logs" / f"{name}.log"
    sample = [sys.executable, "sample.py", "--checkpoint", str(run_dir), "--start_seed", "0", "--end_seed",
              str(n - 1), "--batch_size", "500", "--out_dir", str(out), *sample_args]  # fmt: skip
    seconds = run_command(sample, log)
    stats = work / "stats" / name
    run_command([sys.executable, "fid.py", "--mode", "gen", "--img_folder", str(out), "--detector", "fmnist",
                 "--dest", str(stats)], log)  # fmt: skip
    with np.load(f"{stats}.npz", allow_pickle=False) as f:
        gen = {k: f[k] for k in f.files}
    precision, recall = precision_recall(ref["features"], gen["features"], k=3)
    info = json.loads((out / "sample_info.json").read_text())
    row = {
        "fd_cls": float(frechet_distance(ref["mu"], ref["sigma"], gen["mu"], gen["sigma"])),
        "precision": float(precision),
        "recall": float(recall),
        "sampling_s_per_1k": float(info.get("seconds_per_1k_images", seconds * 1000 / n)),
        "sample_command": shlex.join(sample[1:]),
        "grid": out / "grid.png",
    }
    if "accuracy" in gen:
        row["class_accuracy"] = float(gen["accuracy"])
    return row


def score_translation(name: str, trained: dict, n: int, work: Path) -> dict:
    """The translation script's own --only_test on n held-out images of the final snapshot."""
    cmd = [c for c in trained["command"]]
    cmd[cmd.index("--eval_samples") + 1] = str(n)
    run_command(cmd + ["--only_test", "--resume", str(trained["run_dir"])], work / "logs" / f"{name}.log")
    result = json.loads(sorted((trained["run_dir"] / "test").glob("last-step-*.json"))[-1].read_text())
    grids = sorted((trained["run_dir"] / "grids").glob("ema-*.png")) or sorted(
        (trained["run_dir"] / "grids").glob("*.png")
    )
    scores = {k: v for k, v in result.items() if k in ("l1", "ssim", "fd_target", "fd_target_untranslated")}
    # CycleGAN's FD to the target domain is an FD_cls (on 1-channel 32 px data); pix2pix has none.
    return scores | {"metric": result["metric"], "value": result["value"], "fd_cls": result.get("fd_target"),
                     "grid": grids[-1] if grids else None}  # fmt: skip


def schedule(chosen: list[str], families: dict, work: Path, reuse_needs: bool = False) -> list[str]:
    """The families to train, in the order they are started: a chosen family's dependency (a teacher, a data score)
    is added, unless `reuse_needs` and its run in `work` has a snapshot; dependencies first and the families that
    wait for them last, so that no worker sits idle waiting while the family it waits for is queued behind it."""
    chosen = list(chosen)
    for name in list(chosen):
        need = families[name].get("needs")
        if not need or need in chosen:
            continue
        if not (reuse_needs and any((work / "runs" / need / "snapshots").glob("snapshot-*.safetensors"))):
            chosen.insert(0, need)
    needed = {families[n].get("needs") for n in chosen}
    return sorted(chosen, key=lambda n: 0 if n in needed else 2 if families[n].get("needs") else 1)


def run_family(name: str, family: dict, spec: dict, args, work: Path, ref: dict, waits: dict) -> list[dict]:
    if family.get("needs") in waits:  # else --reuse_needs: the run already in --work
        waits[family["needs"]].result()  # a teacher or data score first (its failure fails this family too)
    trained = train(name, family, spec, args, work)
    n = SMOKE["final_samples"] if args.smoke else spec["final_samples"]
    base = {"family": name, "script": family["script"], "kimg": trained["kimg"], "minutes": trained["minutes"],
            "sec_per_kimg": trained["sec_per_kimg"], "curve": trained["curve"],
            "first_fd_cls": trained["curve"][0]["value"], "command": shlex.join(trained["command"][1:])}  # fmt: skip
    if family.get("translation"):
        scored = score_translation(name, trained, n, work)
        return [base | {"row": next(iter(family["rows"])), "first_value": trained["curve"][0]["value"]} | scored]
    rows = []
    for row_name, row in family["rows"].items():
        candidates = [[str(a) for a in c] for c in row.get("best_of") or [row.get("sample_args", [])]]
        choice = {}
        if len(candidates) > 1:  # chosen on the in-loop sample count, then scored on the final count like any row
            m = SMOKE["eval_samples"] if args.smoke else spec["eval_samples"]
            scored = [score_samples(f"{row_name}-{i}", trained["run_dir"], c, m, work, ref)
                      for i, c in enumerate(candidates)]  # fmt: skip
            choice = {"candidates": {s["sample_command"]: s["fd_cls"] for s in scored}, "candidates_samples": m}
            candidates = [candidates[min(range(len(scored)), key=lambda i: scored[i]["fd_cls"])]]
        rows.append(base | {"row": row_name} | score_samples(row_name, trained["run_dir"], candidates[0], n, work, ref)
                    | choice)  # fmt: skip
    return rows


def plot_curves(results: list[dict], path: Path) -> None:
    """FD_cls against minutes, one line per family (log y axis), with a legend."""
    series = {}
    for r in results:
        points = [(p["minutes"], p["value"]) for p in r.get("curve", []) if p["metric"] in ("fd_cls", "fd_target")]
        points = [(x, y) for x, y in points if y > 0 and math.isfinite(y)]
        if points:
            series.setdefault(r["family"], points)
    width, height, left, right, top, bottom = 900, 560, 70, 200, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=13)
    draw.text((left, 10), "FD_cls (in-loop) against minutes on one thread", fill="black", font=font)
    x_end, y_end = width - right, height - bottom
    draw.rectangle([left, top, x_end, y_end], outline="black")
    if not series:
        image.save(path)
        return
    xs = [x for s in series.values() for x, _ in s]
    ys = [math.log10(y) for s in series.values() for _, y in s]
    x_hi, y_lo, y_hi = max(xs) or 1.0, math.floor(min(ys)), math.ceil(max(ys))
    y_hi = y_hi if y_hi > y_lo else y_lo + 1

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return left + x / x_hi * (x_end - left), y_end - (math.log10(y) - y_lo) / (y_hi - y_lo) * (y_end - top)

    for e in range(y_lo, y_hi + 1):  # decades
        y = to_xy(0, 10**e)[1]
        draw.line([(left, y), (x_end, y)], fill=(225, 225, 225))
        draw.text((8, y - 7), f"{10**e:g}", fill="black", font=font)
    for k in range(6):
        x = left + k / 5 * (x_end - left)
        draw.text((x - 10, y_end + 6), f"{k / 5 * x_hi:.1f}", fill="black", font=font)
    draw.text(((left + x_end) // 2 - 20, y_end + 26), "minutes", fill="black", font=font)
    for i, (name, points) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        line = [to_xy(x, y) for x, y in points]
        draw.line(line, fill=colour, width=2) if len(line) > 1 else None
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([(x_end + 12, top + 8 + 18 * i), (x_end + 32, top + 8 + 18 * i)], fill=colour, width=3)
        draw.text((x_end + 38, top + 18 * i), name, fill="black", font=font)
    image.save(path)


def halved(r: dict) -> str:
    """The table's "must": the final score (FD_cls; pix2pix L1; CycleGAN FD to the target domain) is at most half the
    first in-loop evaluation."""
    first, final = (r["first_value"], r["value"]) if "metric" in r else (r["first_fd_cls"], r["fd_cls"])
    return "yes" if final <= first / 2 else "no"


def against_dcgan(results: list[dict]) -> None:
    """The target's comparison, in place: each FD_cls row's last in-loop FD_cls over DCGAN's in-loop FD_cls at the
    same minutes (linear between DCGAN's evaluations, its first or last one outside them), conditional rows against
    the conditional DCGAN. Both are 2,000-sample FDs: a final 10,000-sample FD is lower, so it is not mixed in."""
    curves = {r["family"]: r["curve"] for r in results if r["family"] in ("dcgan", "dcgan_cond") and "curve" in r}
    for r in results:
        reference = "dcgan_cond" if "class_accuracy" in r else "dcgan"
        if "error" in r or "metric" in r or reference not in curves:
            continue
        own, at = r["curve"][-1], r["curve"][-1]["minutes"]
        ref = float(np.interp(at, [p["minutes"] for p in curves[reference]], [p["value"] for p in curves[reference]]))
        r["vs_dcgan"] = {"reference": reference, "minutes": at, "fd_cls": own["value"], "reference_fd_cls": ref,
                         "ratio": own["value"] / ref}  # fmt: skip


def write_markdown(results: list[dict], path: Path, header: str) -> None:
    lines = [header, "", "| row | kimg | minutes | sec/kimg | FD_cls (first in-loop → final) | precision | recall | "
             "class acc. | sampling s/1k | final ≤ ½ first | last in-loop FD_cls ÷ DCGAN's at those minutes | "
             "command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    fmt = lambda v, spec=".3g": "–" if v is None else format(v, spec)  # noqa: E731

    def versus(r: dict) -> str:
        v = r.get("vs_dcgan")
        return "–" if v is None else f"{v['fd_cls']:.1f} ÷ {v['reference_fd_cls']:.1f} = {v['ratio']:.2f}"

    for r in results:
        if "error" in r:
            lines.append(f"| {r['family']} | error: {r['error'].splitlines()[0][:200]} | | | | | | | | | | |")
            continue
        if "metric" in r:  # translation: its own metric
            extra = f", untranslated {r['fd_target_untranslated']:.2f}" if "fd_target_untranslated" in r else ""
            score = f"{r['metric']} {r['first_value']:.4g} → {r['value']:.4g}{extra}"
            if "ssim" in r:
                score += f" (SSIM {r['ssim']:.3f})"
        else:
            score = f"{r['first_fd_cls']:.2f} → **{r['fd_cls']:.2f}**"
        lines.append(
            f"| {r['row']} | {r['kimg']:.1f} | {r['minutes']:.1f} | {r['sec_per_kimg']:.1f} | {score} | "
            f"{fmt(r.get('precision'))} | {fmt(r.get('recall'))} | {fmt(r.get('class_accuracy'))} | "
            f"{fmt(r.get('sampling_s_per_1k'))} | {halved(r)} | {versus(r)} | `{r['command']}`"
            + (f"; `{r['sample_command']}`" if "sample_command" in r else "")
            + " |"  # fmt: skip
        )
    path.write_text("\n".join(lines) + "\n")


def write_table(results: list[dict], out: Path) -> None:
    """results.json, results.md (headed by each harness command that made its rows, with the hours of its run) and
    curves.png."""
    against_dcgan(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    hours = {}  # per harness command, the hours when its last row was written: the run's length
    for c in (r["table_command"] for r in results if "table_command" in r):
        hours[c["command"]] = max(c["hours"], hours.get(c["command"], 0.0))
    made = [f"`{command}` ({h:.2f} h)" for command, h in hours.items()]
    write_markdown(results, out / "results.md", f"Made by {'; '.join(sorted(made))}, each family on one thread.")
    plot_curves(results, out / "curves.png")


START, END = "<!-- quality table: written by benchmarks/quality.py -->", "<!-- end of the quality table -->"


def publish(results: list[dict], out: Path, pages: dict[Path, str]) -> None:
    """Write the table into each page between the START and END markers (already there): docs/results.md gets the
    whole results.md and the curve plot, README.md a short table (row, FD_cls first → final, minutes)."""
    short = ["| row | FD_cls (first in-loop → final) | final ≤ ½ first | minutes | kimg |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            short.append(f"| {r['family']} | error | | | |")
            continue
        score = f"{r['first_fd_cls']:.1f} → **{r['fd_cls']:.1f}**" if "metric" not in r else (
            f"{r['metric']} {r['first_value']:.3g} → **{r['value']:.3g}**")  # fmt: skip
        short.append(f"| {r['row']} | {score} | {halved(r)} | {r['minutes']:.1f} | {r['kimg']:.1f} |")
    full = (out / "results.md").read_text().strip()
    for page, kind in pages.items():
        text = page.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{page}: no {START} ... {END} block to write the table into")
        plot = f"![FD_cls against minutes]({os.path.relpath(out, page.parent)}/curves.png)"
        body = f"{full}\n\n{plot}" if kind == "full" else "\n".join(short)
        head, rest = text.split(START, 1)
        page.write_text(f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}")


def merge(results: list[dict], earlier: Path | None, order: list[str]) -> list[dict]:
    """The rows in the config's family order. With `earlier` (a results.json; `--only`), these rows replace the same
    families' rows there and the other families' rows (each with the harness command that made it) stay."""
    fresh = {r["family"] for r in results}
    kept = json.loads(earlier.read_text()) if earlier and earlier.is_file() else []
    kept = [r for r in kept if r["family"] not in fresh]
    rank = {name: i for i, name in enumerate(order)}
    return sorted(kept + results, key=lambda r: rank.get(r["family"], len(rank)))  # stable: rows keep their order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality"))
    parser.add_argument("--work", default="", help="runs, samples and logs (default: <out>/work, not committed)")
    parser.add_argument("--data_dir", default="data", help="Fashion-MNIST IDX files (else /usr/share/datasets)")
    parser.add_argument("--only", default="", help="comma-separated family names")
    parser.add_argument(
        "--reuse_needs",
        action="store_true",
        help="with --only: a teacher or data score already trained in --work "
        "is used as it is, not trained again (its own row stays as it is in the table)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="families trained side by side, one thread each")
    parser.add_argument("--smoke", action="store_true", help="a few steps and tiny networks: the pipeline only")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="only write --out's table (from its results.json) into the README and docs",
    )
    args = parser.parse_args(argv)
    spec = yaml.safe_load(Path(args.config).read_text())
    families = spec["families"]
    out = Path(args.out).resolve()
    pages = {ROOT / "docs" / "results.md": "full", ROOT / "README.md": "short"}
    if args.publish:  # results.md, curves.png and the comparison with DCGAN are made again from results.json
        results = json.loads((out / "results.json").read_text())
        write_table(results, out)
        publish(results, out, pages)
        return
    chosen = [n for n in args.only.split(",") if n] or list(families)
    unknown = sorted(set(chosen) - set(families))
    if unknown:
        parser.error(f"unknown families {unknown}; valid: {sorted(families)}")
    work = Path(args.work).resolve() if args.work else out / "work"
    chosen = schedule(chosen, families, work, args.reuse_needs)
    for sub in ("logs", "stats", "runs", "samples"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(parents=True, exist_ok=True)

    # The training set's statistics, once (the reference of every final FD_cls).
    ref_path = work / "stats" / "fashion_mnist_train"
    if not Path(f"{ref_path}.npz").is_file():
        run_command([sys.executable, "fid.py", "--mode", "ref", "--data_name", "fashion_mnist", "--data_dir",
                     args.data_dir, "--no-download", "--detector", "fmnist", "--dest", str(ref_path)],
                    work / "logs" / "ref.log")  # fmt: skip
    with np.load(f"{ref_path}.npz", allow_pickle=False) as f:
        ref = {k: f[k] for k in f.files}

    started = time.perf_counter()
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        waits = {}
        for name in chosen:  # dependencies are listed first, so their futures exist when a family waits
            waits[name] = pool.submit(run_family, name, families[name], spec, args, work, ref, waits)
        results = []
        for name in chosen:  # the table is written again as each family ends: a stopped run keeps what it made
            try:
                rows = waits[name].result()
            except Exception as e:  # noqa: BLE001 - one failed family must not lose the others' rows
                rows = [{"family": name, "error": f"{type(e).__name__}: {e}"}]
            hours = (time.perf_counter() - started) / 3600
            for r in rows:
                if r.get("grid") and Path(r["grid"]).is_file():
                    shutil.copyfile(r["grid"], out / "grids" / f"{r['row']}.png")
                r.pop("grid", None)
                r["table_command"] = {"command": command, "hours": round(hours, 2), "jobs": args.jobs}
            results += rows
            earlier = out / "results.json" if args.only else None  # the whole table replaces an earlier one
            write_table(merge(results, earlier, list(families)), out)
    if out == (ROOT / "benchmarks" / "results" / "quality").resolve() and not args.smoke:  # the committed table
        publish(json.loads((out / "results.json").read_text()), out, pages)  # as merged and written above
    print(f"wrote {out / 'results.md'}: {len(results)} new rows ({sum('error' in r for r in results)} errors)")


if __name__ == "__main__":
    main()
