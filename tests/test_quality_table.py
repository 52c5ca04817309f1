"""benchmarks/quality.py end to end on tiny budgets (--smoke): a family that needs another (the student and its
Föllmer teacher), a conditional GAN (class accuracy), a row chosen from several latent samplers (GEBM) and a
translation family scored by its own script, each trained, sampled and scored by the real scripts."""

import json
import sys

import pytest
from PIL import Image

from benchmarks.quality import END, START, against_dcgan, merge, publish, schedule, write_markdown
from tests.conftest import run

KEYS = {"family", "kimg", "minutes", "fd_cls", "first_fd_cls", "precision", "recall", "command"}


@pytest.mark.slow
def test_the_quality_table_runs_every_path_on_tiny_budgets(tmp_path, mnist_dir):
    out = tmp_path / "quality"
    result = run([sys.executable, "benchmarks/quality.py", "--smoke", "--data_dir", str(mnist_dir), "--out", str(out),
                  "--only", "dcgan_cond,student,gebm,cyclegan"], timeout=1800)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())}
    expected = {"follmer", "student_1step", "student_4step", "dcgan_cond", "gebm_base", "gebm_sampler", "cyclegan"}
    assert set(rows) == expected, rows
    for name in expected - {"cyclegan"}:
        row = rows[name]
        assert KEYS <= set(row), (name, sorted(row))
        assert row["fd_cls"] > 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        # --eval_first 1 starts the curve, --eval_interval 2 goes on (the smoke budget: 4 steps).
        assert row["curve"][0]["value"] == row["first_fd_cls"] and [p["step"] for p in row["curve"]] == [1, 2, 4]
        assert row["curve"][0]["minutes"] < row["curve"][1]["minutes"] < row["curve"][2]["minutes"]
        assert Image.open(out / "grids" / f"{name}.png").size[0] > 0
    assert 0 <= rows["dcgan_cond"]["class_accuracy"] <= 1 and "class_accuracy" not in rows["gebm_base"]
    # The two student rows sample one run with 1 and 4 flow-map steps; the teacher ran first, as its own family.
    assert rows["student_1step"]["command"] == rows["student_4step"]["command"]
    assert "--teacher" in rows["student_1step"]["command"] and rows["follmer"]["family"] == "follmer"
    assert rows["student_1step"]["sample_command"].endswith("--num_steps 1")
    # The GEBM sampler row keeps the candidate of lowest FD_cls on the in-loop sample count, then scores it on the
    # final count.
    candidates = rows["gebm_sampler"]["candidates"]
    assert len(candidates) == 3 and rows["gebm_sampler"]["candidates_samples"] == 32
    chosen = min(candidates, key=candidates.get).split()[-4:]  # --latent_sampler <name> --num_sampler_steps <n>
    assert rows["gebm_sampler"]["sample_command"].split()[-4:] == chosen
    # CycleGAN: its own metric, FD to the target domain, from translate.py --only_test.
    assert rows["cyclegan"]["metric"] == "fd_target" and rows["cyclegan"]["fd_cls"] == rows["cyclegan"]["value"] > 0
    assert rows["cyclegan"]["fd_target_untranslated"] > 0
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in expected) and "error" not in table
    assert Image.open(out / "curves.png").size == (900, 560)


def test_only_replaces_its_families_rows_and_keeps_the_others_in_config_order(tmp_path):
    def row(family, fd, command):
        made = {"command": command, "hours": 1.0, "jobs": 2}
        return {"family": family, "row": family, "fd_cls": fd, "first_fd_cls": 2 * fd, "kimg": 1.0, "minutes": 1.0,
                "sec_per_kimg": 1.0, "command": family, "table_command": made}  # fmt: skip

    earlier = tmp_path / "results.json"
    earlier.write_text(json.dumps([row("dcgan", 10.0, "all"), row("edm", 30.0, "all"), row("gebm", 50.0, "all")]))
    merged = merge([row("edm", 20.0, "only edm")], earlier, ["dcgan", "edm", "gebm"])
    assert [(r["family"], r["fd_cls"]) for r in merged] == [("dcgan", 10.0), ("edm", 20.0), ("gebm", 50.0)]
    assert merge([row("gebm", 1.0, "x"), row("dcgan", 2.0, "x")], None, ["dcgan", "gebm"])[0]["family"] == "dcgan"
    write_markdown(merged, tmp_path / "results.md", "header")
    table = (tmp_path / "results.md").read_text()
    assert "20.00" in table and "30.00" not in table


def test_publish_writes_the_table_between_the_markers_and_nothing_else(tmp_path):
    out = tmp_path / "quality"
    out.mkdir()
    (out / "results.md").write_text("| row | ... |\n| dcgan | 100.00 → **20.00** |\n")
    rows = [{"family": "dcgan", "row": "dcgan", "first_fd_cls": 100.0, "fd_cls": 20.0, "minutes": 9.5, "kimg": 128.0},
            {"family": "pix2pix", "row": "pix2pix", "metric": "l1", "first_value": 0.3, "value": 0.16, "minutes": 6.0,
             "kimg": 12.0}]  # fmt: skip
    docs, readme = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    docs.parent.mkdir()
    for page in (docs, readme):
        page.write_text(f"before\n{START}\nold table\n{END}\nafter\n")
    publish(rows, out, {docs: "full", readme: "short"})
    publish(rows, out, {docs: "full", readme: "short"})  # again: the block is replaced, not added
    full, short = docs.read_text(), readme.read_text()
    assert full.startswith(f"before\n{START}\n| row | ... |") and full.endswith(f"{END}\nafter\n")
    assert "![FD_cls against minutes](../quality/curves.png)" in full and "old table" not in full
    assert "| dcgan | 100.0 → **20.0** | yes | 9.5 | 128.0 |" in short
    assert "| pix2pix | l1 0.3 → **0.16** | no | 6.0 | 12.0 |" in short  # L1 not halved: the "must" is missed
    assert short.count(START) == 1 and short.endswith(f"{END}\nafter\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- quality table"):
        publish(rows, out, {readme: "short"})


def test_each_row_is_set_against_dcgan_at_the_same_minutes_conditional_against_conditional():
    def curve(*points):
        return [{"step": i, "metric": "fd_cls", "value": v, "minutes": m} for i, (m, v) in enumerate(points)]

    rows = [{"family": "dcgan", "row": "dcgan", "curve": curve((2.0, 100.0), (6.0, 20.0))},
            {"family": "dcgan_cond", "row": "dcgan_cond", "class_accuracy": 0.8,
             "curve": curve((2.0, 80.0), (4.0, 40.0))},
            {"family": "edm", "row": "edm", "curve": curve((3.0, 90.0), (5.0, 30.0))},
            {"family": "biggan", "row": "biggan", "class_accuracy": 0.5, "curve": curve((9.0, 60.0))},
            {"family": "stylegan2", "row": "stylegan2", "curve": curve((1.0, 50.0))},
            {"family": "pix2pix", "row": "pix2pix", "metric": "l1", "curve": curve((1.0, 0.3))}]  # fmt: skip
    against_dcgan(rows)
    edm, biggan, early = rows[2]["vs_dcgan"], rows[3]["vs_dcgan"], rows[4]["vs_dcgan"]
    assert edm["reference"] == "dcgan" and edm["reference_fd_cls"] == pytest.approx(40.0)  # halfway from 100 to 20
    assert edm["ratio"] == pytest.approx(30.0 / 40.0)
    assert biggan["reference"] == "dcgan_cond" and biggan["reference_fd_cls"] == 40.0  # after DCGAN's end: its last
    assert early["reference_fd_cls"] == 100.0 and early["ratio"] == 0.5  # before DCGAN's first evaluation: its first
    assert rows[0]["vs_dcgan"]["ratio"] == 1.0 and "vs_dcgan" not in rows[5]


def test_dependencies_run_first_and_reuse_needs_keeps_a_finished_one(tmp_path):
    """A chosen family's teacher is trained too, before it, and families that wait come last; with --reuse_needs
    a teacher whose run in --work has a snapshot is not trained again, one without a snapshot still is."""
    families = {"teacher": {}, "student": {"needs": "teacher"}, "gan": {}}
    assert schedule(["student", "gan"], families, tmp_path) == ["teacher", "gan", "student"]
    assert schedule(["student"], families, tmp_path, reuse_needs=True) == ["teacher", "student"]
    snapshots = tmp_path / "runs" / "teacher" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "snapshot-00000010.safetensors").write_bytes(b"")
    assert schedule(["student", "gan"], families, tmp_path, reuse_needs=True) == ["gan", "student"]
    assert schedule(["student"], families, tmp_path) == ["teacher", "student"]
