"""sim.report, sim.plots: byte-stable JSON, CSVs that parse back, PNGs; the examples' claims."""

from __future__ import annotations

import csv
import io
import json
import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest

from xenlab.sim import plots
from xenlab.sim.report import (
    compare_json,
    pcpus_csv,
    report_json,
    run_scenario,
    vcpus_csv,
)
from xenlab.sim.scenario import load_scenario, scenario_from_dict

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "sim").glob("*.toml"))

SCENARIO = """
[sim]
duration_ms = 300
seed = 11
scheduler = "credit"
trace_ms = [0, 30]
[host]
pcpus = 2
[[domain]]
name = "io"
vcpus = 2
workload = { kind = "io", run_us = 300, block_us = 700 }
[[domain]]
name = "rt"
workload = { kind = "sporadic", run_ms = 1, min_gap_ms = 5, max_gap_ms = 9 }
[[domain]]
name = "hog"
workload = { kind = "hog" }
[[expect]]
domain = "rt"
misses_max = 0
"""


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    p = tmp_path / "mix.toml"
    p.write_text(SCENARIO)
    return p


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR (and check it is a PNG)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_json_is_byte_identical_for_a_seed_and_differs_for_another(scenario_file: Path) -> None:
    sc = load_scenario(scenario_file)
    a = report_json(run_scenario(sc))
    b = report_json(run_scenario(load_scenario(scenario_file)))
    c = report_json(run_scenario(sc, seed=12))
    assert a == b
    assert a != c
    data = json.loads(a)
    assert data["seed"] == 11 and json.loads(c)["seed"] == 12
    assert data["scheduler"] == {"name": "credit", "kind": "credit", "options": {}}
    assert a == json.dumps(data, sort_keys=True, indent=2).encode() + b"\n"  # keys sorted
    # Energy is there and adds up: every pCPU's residency covers the run.
    for p in data["energy"]["pcpus"]:
        assert sum(p["residency_ns"].values()) == 300_000_000


def test_csvs_parse_back_to_the_metrics(scenario_file: Path) -> None:
    sc = load_scenario(scenario_file)
    r1, r2 = run_scenario(sc, "credit"), run_scenario(sc, "null")
    rows = list(csv.DictReader(io.StringIO(vcpus_csv([r1, r2]))))
    assert [(r["scheduler"], r["vcpu"]) for r in rows] == [
        (s, v) for s in ("credit", "null") for v in ("io.0", "io.1", "rt.0", "hog.0")]
    for row, v in zip(rows, r1.metrics.vcpus, strict=False):
        assert int(row["cpu_ns"]) == v.cpu_ns and int(row["jobs"]) == v.jobs
        assert int(row["wake_p99_ns"]) == v.wake_latency.p99_ns
        assert float(row["cpu_pct"]) == pytest.approx(100 * v.cpu_ns / 300_000_000, abs=1e-6)
    prow = list(csv.DictReader(io.StringIO(pcpus_csv([r1]))))
    assert len(prow) == 2
    assert all(int(p["busy_ns"]) + int(p["idle_ns"]) == 300_000_000 for p in prow)
    both = json.loads(compare_json([r1, r2]))
    assert [r["scheduler"]["name"] for r in both["runs"]] == ["credit", "null"]


def test_pngs_are_real_pngs_of_the_expected_size(scenario_file: Path) -> None:
    sc = load_scenario(scenario_file)
    r = run_scenario(sc)
    assert r.segments and all(0 <= s < e <= 30_000_000 for _, s, e, _ in r.segments)
    g = plots.gantt_png(r)
    assert png_size(g) == plots.gantt_size(2) == (1000, 250)
    assert png_size(plots.latency_cdf_png(r)) == (1000, 500)
    assert png_size(plots.compare_png([r, run_scenario(sc, "null")])) == (1000, 500)
    assert png_size(plots.sweep_png(["a", "b"], {"x": [1.0, 2.0]}, xlabel="p", ylabel="m",
                                    title="t")) == (1000, 500)
    assert plots.gantt_png(r) == g  # the same run draws the same bytes


def test_powerclamp_runs_report_idle_against_target(tmp_path: Path) -> None:
    p = tmp_path / "clamp.toml"
    p.write_text(SCENARIO.replace("[[expect]]", "[powerclamp]\ntarget = 30\n[[expect]]")
                 .replace("duration_ms = 300", "duration_ms = 1000")
                 .replace('kind = "io", run_us = 300, block_us = 700', 'kind = "hog"'))
    r = run_scenario(load_scenario(p))
    assert r.idle_target == 30.0 and len(r.idle_series) == 50  # 20 ms steps
    data = json.loads(report_json(r))
    assert data["powerclamp"]["type"] == "intel_powerclamp"
    assert data["powerclamp"]["cur_state"] == 30
    mean_idle = sum(pct for _, pct in r.idle_series[5:]) / len(r.idle_series[5:])
    assert 27 <= mean_idle <= 33
    assert png_size(plots.idle_png(r)) == (1000, 500)


def _named(raw: dict[str, Any]) -> list[str]:
    sim = raw["sim"]
    return list(dict.fromkeys([sim["scheduler"], *sim.get("compare", [])]))


def _cases() -> list[tuple[Path, str]]:
    out = []
    for path in EXAMPLES:
        raw = tomllib.loads(path.read_text())
        out += [(path, name) for name in _named(raw)]
    return out


@pytest.mark.parametrize(("path", "sched"), _cases(), ids=[f"{p.stem}-{s}" for p, s in _cases()])
def test_every_example_holds_its_claims(path: Path, sched: str) -> None:
    """Each example under each scheduler it names: its [[expect]] claims hold."""
    sc = load_scenario(path)  # an unknown scheduler is an error here, not a skip
    r = run_scenario(sc, sched)
    assert r.verdicts, "an example makes at least one claim per scheduler"
    failed = [str(v) for v in r.verdicts if not v.ok]
    assert not failed, failed


def test_examples_headlines() -> None:
    """The comparisons the examples exist for, as numbers."""
    by = {p.stem: load_scenario(p) for p in EXAMPLES}
    iso = {s: run_scenario(by["isolation"], s).metrics for s in ("sedf", "sedf-cbs")}
    assert iso["sedf-cbs"].misses == 0 < iso["sedf"].misses
    spread = run_scenario(by["spreading"], "mpedf").metrics
    assert spread.misses == 0 and min(100 - p.idle_pct for p in spread.pcpus) > 40
    credit = run_scenario(by["credit-weights"]).metrics
    share = {v.domain: v.cpu_ns for v in credit.vcpus}
    assert share["big"] / share["small"] == pytest.approx(2.0, rel=0.15)
    clamp = run_scenario(by["powerclamp"]).metrics
    idle = sum(p.idle_pct for p in clamp.pcpus) / len(clamp.pcpus)
    assert abs(idle - 25) <= 2


def test_a_report_does_not_depend_on_the_working_directory(scenario_file: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    a = report_json(run_scenario(load_scenario(scenario_file)))
    monkeypatch.chdir(scenario_file.parent)
    b = report_json(run_scenario(load_scenario(scenario_file.name)))
    assert a == b
    raw = load_scenario(scenario_file).raw()
    assert report_json(run_scenario(scenario_from_dict(raw, source=str(scenario_file)))) == a
