"""``xenlab sim``: run, compare, sweep, check, schedulers through main(), as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import struct
from pathlib import Path

import pytest

from tests.clirun import run_cli as run

SCENARIO = """
[sim]
duration_ms = 100
seed = 2
scheduler = "credit"
compare = ["credit", "null"]
[host]
pcpus = 2
[[domain]]
name = "rt"
workload = { kind = "periodic", run_ms = 1, period_ms = 10 }
[[domain]]
name = "io"
workload = { kind = "io", run_us = 300, block_us = 900 }
[[expect]]
vcpu = "rt.0"
misses_max = 0
"""




@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    p = tmp_path / "cli.toml"
    p.write_text(SCENARIO)
    return p


def test_run_writes_the_report_and_json_is_stable(capsys: pytest.CaptureFixture[str],
                                                  scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, text, err = run(capsys, "sim", "run", str(scenario), "--out", str(out), "--json")
    assert code == 0, err
    assert json.loads(text)["scheduler"]["name"] == "credit"
    assert (out / "results.json").read_text() == text
    assert sorted(p.name for p in out.iterdir()) == [
        "gantt.png", "latency.png", "pcpus.csv", "results.json", "vcpus.csv"]
    rows = list(csv.DictReader(io.StringIO((out / "vcpus.csv").read_text())))
    assert [r["vcpu"] for r in rows] == ["rt.0", "io.0"] and rows[0]["jobs"] == "10"
    png = (out / "gantt.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 250)
    code, again, _ = run(capsys, "sim", "run", str(scenario), "--json")
    assert again == text
    code, other, _ = run(capsys, "sim", "run", str(scenario), "--json", "--seed", "3")
    assert code == 0 and other != text and json.loads(other)["seed"] == 3


def test_run_table_and_check(capsys: pytest.CaptureFixture[str], scenario: Path,
                             tmp_path: Path) -> None:
    code, text, _ = run(capsys, "sim", "run", str(scenario), "--sched", "null", "--check")
    assert code == 0
    assert "rt.0" in text and "expect[0] rt.0: misses_max 0: got 0 (ok)" in text
    # A claim that fails: --check exits 1 and says which.
    bad = tmp_path / "bad.toml"
    bad.write_text(SCENARIO.replace("misses_max = 0", "jobs_min = 50"))
    code, text, err = run(capsys, "sim", "run", str(bad), "--check")
    assert code == 1 and "FAILED" in text and "1 claim(s) failed under credit" in err
    code, _, _ = run(capsys, "sim", "run", str(bad))
    assert code == 0  # without --check a failed claim is reported, not an error


def test_compare_one_table_and_plots(capsys: pytest.CaptureFixture[str], scenario: Path,
                                     tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code, text, err = run(capsys, "sim", "compare", str(scenario), "--out", str(out), "--json")
    assert code == 0, err
    data = json.loads(text)
    assert [r["scheduler"]["name"] for r in data["runs"]] == ["credit", "null"]
    assert {"compare.png", "gantt-credit.png", "gantt-null.png", "latency-null.png",
            "compare.json", "vcpus.csv", "pcpus.csv"} <= {p.name for p in out.iterdir()}
    code, text, _ = run(capsys, "sim", "compare", str(scenario), "--sched", "null,credit")
    assert code == 0 and text.index("null") < text.index("credit")


def test_sweep_table_json_and_files(capsys: pytest.CaptureFixture[str], scenario: Path,
                                    tmp_path: Path) -> None:
    out = tmp_path / "sw"
    code, text, err = run(capsys, "sim", "sweep", str(scenario), "--param",
                          "domain.rt.workload.run_ms=1,12", "--sched", "credit,null",
                          "--jobs", "1", "--out", str(out), "--json")
    assert code == 0, err
    pts = json.loads(text)["points"]
    assert [(p["params"]["domain.rt.workload.run_ms"], p["scheduler"]) for p in pts] == [
        (1, "credit"), (1, "null"), (12, "credit"), (12, "null")]
    assert pts[0]["misses"] == 0 and pts[2]["domains"]["rt"]["misses"] > 0  # 12 ms every 10
    assert pts[2]["ok"] is False
    assert (out / "sweep.json").read_text() == text
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    code, text, _ = run(capsys, "sim", "sweep", str(scenario), "--param", "host.pcpus=1,2",
                        "--jobs", "1")
    assert code == 0 and "pcpus=1" in text and "pcpus=2" in text


def test_errors_and_exit_codes(capsys: pytest.CaptureFixture[str], scenario: Path,
                               tmp_path: Path) -> None:
    bad = tmp_path / "neg.toml"
    bad.write_text(SCENARIO.replace("run_ms = 1,", "run_ms = -1,"))
    code, _, err = run(capsys, "sim", "run", str(bad))
    assert code == 1 and err.strip() == (
        f"{bad}: domain.rt.workload.run_ms: must be positive, got -1")
    code, _, err = run(capsys, "sim", "run", str(scenario), "--sched", "bfs")
    assert code == 1 and "scheduler: unknown scheduler 'bfs'" in err
    code, _, err = run(capsys, "sim", "sweep", str(scenario), "--param", "host.pcpus")
    assert code == 1 and "expected KEY=V1,V2" in err
    # A value the scheduler refuses: the message naming the parameter's key, not a broken
    # process pool.
    code, _, err = run(capsys, "sim", "sweep", str(scenario), "--param",
                       "domain.io.sched.weight=0,abc", "--jobs", "2")
    assert code == 1 and err.strip() == (f"{scenario}: domain.io.sched.weight: credit weight "
                                         "must be an integer in 1..65535, not 0")
    code, _, err = run(capsys, "sim", "run", str(tmp_path / "missing.toml"))
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "sim", "run", str(scenario), "--seed", "-1")
    assert code == 2
    code, text, _ = run(capsys, "sim", "check", str(scenario))
    assert code == 0 and "ok: 2 domains, 2 vCPUs on 2 pCPUs, 100 ms" in text
    code, text, _ = run(capsys, "sim", "schedulers")
    assert code == 0 and "credit" in text and "weight=256" in text


def test_a_scheduler_named_twice_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                  scenario: Path) -> None:
    for cmd in ("compare", "sweep"):
        code, _, err = run(capsys, "sim", cmd, str(scenario), "--sched", "credit,null,credit")
        assert code == 2 and "'credit' is named twice" in err


def test_check_builds_the_host_under_every_scheduler(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    # A powerclamp option PowerClamp refuses is only seen when the clamp is attached to a
    # host: check attaches it (as run does), and names the option's key.
    bad = tmp_path / "clamp.toml"
    bad.write_text(SCENARIO + "[powerclamp]\ntarget = 20\nwindow_size = 50\n")
    for cmd in ("check", "run"):
        code, out, err = run(capsys, "sim", cmd, str(bad))
        assert (code, out) == (1, "") and err == (
            f"{bad}: powerclamp.window_size: window_size must be an integer in 2..10, "
            "not 50\n")


def test_out_files_write_through_symlinks(capsys: pytest.CaptureFixture[str], scenario: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    (out / "results.json").symlink_to(kept)
    code, text, err = run(capsys, "sim", "run", str(scenario), "--out", str(out), "--json",
                          "--no-plots")
    assert code == 0, err
    assert (out / "results.json").is_symlink() and kept.read_text() == text


def test_out_files_refused_by_the_write_policy(capsys: pytest.CaptureFixture[str],
                                              scenario: Path, tmp_path: Path) -> None:
    # realpath then rename: a dangling link made its target, a FIFO became a regular file.
    out = tmp_path / "out"
    out.mkdir()
    link = out / "results.json"
    link.symlink_to(tmp_path / "made.json")
    code, text, err = run(capsys, "sim", "run", str(scenario), "--out", str(out), "--no-plots")
    assert (code, text) == (1, "") and err == (
        f"{link}: cannot write: a dangling symlink (to '{tmp_path}/made.json'); not created "
        "through it\n")
    assert not (tmp_path / "made.json").exists()
    link.unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    code, text, err = run(capsys, "sim", "run", str(scenario), "--out", str(out), "--no-plots")
    assert (code, text) == (1, "") and err == (
        f"{link}: cannot write: is a FIFO, not a regular file (only files are replaced)\n")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    dangling_dir = tmp_path / "out2"
    dangling_dir.symlink_to(tmp_path / "gone")
    code, _, err = run(capsys, "sim", "run", str(scenario), "--out", str(dangling_dir))
    assert code == 1 and err == (f"{dangling_dir}: cannot write: a dangling symlink (to "
                                 f"'{tmp_path}/gone')\n")
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="a link owned by another user needs root")
def test_out_link_planted_in_a_sticky_directory(capsys: pytest.CaptureFixture[str],
                                                scenario: Path, tmp_path: Path) -> None:
    # --out /tmp-like: another user's link there is not followed (fs.protected_symlinks).
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = shared / "results.json"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)
    code, _, err = run(capsys, "sim", "run", str(scenario), "--out", str(shared), "--no-plots")
    assert code == 1 and err == (
        f"{link}: cannot write: a symlink in a sticky world-writable directory owned by another "
        "user (the kernel would not follow it either)\n")
    assert victim.read_text() == "precious"
    os.lchown(link, 0, 0)  # one's own link is written through
    code, text, err = run(capsys, "sim", "run", str(scenario), "--out", str(shared), "--json",
                          "--no-plots")
    assert code == 0, err
    assert link.is_symlink() and victim.read_text() == text
