"""sim.sweep: the grid, seeds per point, and the same results in-process, on a pool and on Dask."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from xenlab.errors import XenlabError
from xenlab.sim.runner import run_sweep
from xenlab.sim.scenario import ScenarioError, load_scenario
from xenlab.sim.sweep import (
    Point,
    grid,
    parse_param,
    point_seed,
    sweep_csv,
    sweep_json,
)

SCENARIO = """
[sim]
duration_ms = 200
seed = 5
scheduler = "credit"
[host]
pcpus = 2
[[domain]]
name = "io"
vcpus = 2
workload = { kind = "io", run_us = 400, block_us = 600 }
[[domain]]
name = "hog"
workload = { kind = "hog" }
sched = { weight = 256 }
"""


@pytest.fixture
def sc_path(tmp_path: Path) -> Path:
    p = tmp_path / "sw.toml"
    p.write_text(SCENARIO)
    return p


def test_grid_is_the_product_with_seeds_from_values(sc_path: Path) -> None:
    sc = load_scenario(sc_path)
    params = [parse_param("domain.hog.sched.weight=128,512"), parse_param("host.pcpus=1,2")]
    assert params[0] == ("domain.hog.sched.weight", (128, 512))
    pts = grid(sc, params, ["credit", "null"])
    assert len(pts) == 8 and [p.index for p in pts] == list(range(8))
    # The same values give the same seed under every scheduler ...
    assert pts[0].seed == pts[1].seed and pts[0].scheduler != pts[1].scheduler
    # ... and a seed depends on the values, not on the grid they are in.
    alone = grid(sc, [parse_param("domain.hog.sched.weight=512"),
                      parse_param("host.pcpus=2")], ["credit"])
    assert alone[0].seed == pts[6].seed == point_seed(5, pts[6].params)
    assert len({p.seed for p in pts}) == 4
    with pytest.raises(ScenarioError, match=r"sw\.toml: host\.pcpus: expected a positive "
                       "integer, got 0"):
        grid(sc, [parse_param("host.pcpus=2,0")], ["credit"])
    with pytest.raises(XenlabError, match="expected KEY=V1,V2"):
        parse_param("host.pcpus")
    with pytest.raises(ScenarioError, match="unknown scheduler 'bfs'"):
        grid(sc, [], ["bfs"])


def test_grid_checks_every_point_before_running(sc_path: Path) -> None:
    # weight 0 is refused by credit: the grid finds it before anything runs, at the
    # parameter's key.  A [domain.sched] parameter is checked for every scheduler that
    # takes it (--sched may choose any), so a null-only grid refuses it too.
    sc = load_scenario(sc_path)
    for scheds in (["null", "credit"], ["null"]):
        with pytest.raises(ScenarioError) as err:
            grid(sc, [parse_param("domain.hog.sched.weight=256,0")], scheds)
        assert str(err.value) == (f"{sc_path}: domain.hog.sched.weight: credit weight must "
                                  "be an integer in 1..65535, not 0")


def _unchecked(sc_path: Path) -> tuple[list[Point], str]:
    """A good point and one the grid would refuse, made by hand (as an old client might)."""
    good = grid(load_scenario(sc_path), [parse_param("domain.hog.sched.weight=512")],
                ["credit"])
    bad = Point(1, (("domain.hog.sched.weight", "abc"),), "credit", 7)
    return [*good, bad], (f"{sc_path}: domain.hog.sched.weight: credit weight must be an "
                          "integer in 1..65535, not 'abc'")


def test_a_point_failing_in_a_worker_process_reports_its_error(sc_path: Path) -> None:
    # A ScenarioError raised in a worker crosses back (it pickles with its three parts)
    # instead of breaking the pool.
    pts, message = _unchecked(sc_path)
    with pytest.raises(ScenarioError) as err:
        list(run_sweep(load_scenario(sc_path), pts, jobs=2))
    assert str(err.value) == message
    assert (err.value.key, err.value.reason) == ("domain.hog.sched.weight",
                                                 message.split(": ", 2)[2])


def test_pool_and_in_process_give_the_same_files(sc_path: Path) -> None:
    sc = load_scenario(sc_path)
    pts = grid(sc, [parse_param("domain.hog.sched.weight=128,1024"),
                    parse_param("domain.io.workload.run_us=200,800")], ["credit", "null"])
    here = list(run_sweep(sc, pts, jobs=1))
    pool = list(run_sweep(sc, pts, jobs=2))
    assert sweep_json(sc, here) == sweep_json(sc, pool)
    data = json.loads(sweep_json(sc, pool))
    assert [p["index"] for p in data["points"]] == list(range(8))
    # The parameters took effect: more I/O work per burst, more CPU for the io domain.
    cpu = {(p["scheduler"], p["params"]["domain.io.workload.run_us"],
            p["params"]["domain.hog.sched.weight"]): p["domains"]["io"]["cpu_pct"]
           for p in data["points"]}
    assert cpu[("credit", 800, 128)] > cpu[("credit", 200, 128)]
    rows = list(csv.DictReader(io.StringIO(sweep_csv(pool))))
    assert len(rows) == 8 and rows[3]["domain.io.workload.run_us"] == "800"
    assert int(rows[0]["io.jobs"]) == data["points"][0]["domains"]["io"]["jobs"]


def test_a_dask_local_cluster_runs_the_same_sweep(sc_path: Path) -> None:
    from dask.distributed import LocalCluster

    sc = load_scenario(sc_path)
    pts = grid(sc, [parse_param("domain.hog.sched.weight=64,256,1024")], ["credit"])
    here = sweep_json(sc, list(run_sweep(sc, pts, jobs=1)))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        got = list(run_sweep(sc, pts, cluster=cluster.scheduler_address))
        assert sweep_json(sc, got) == here
        # A point failing on a worker: its ScenarioError comes back whole.
        bad, message = _unchecked(sc_path)
        with pytest.raises(ScenarioError) as err:
            list(run_sweep(sc, bad, cluster=cluster.scheduler_address))
        assert str(err.value) == message
    with pytest.raises(XenlabError, match="cannot reach the Dask scheduler"):
        list(run_sweep(sc, pts, cluster="tcp://127.0.0.1:1", connect_timeout=1))


def test_a_grid_has_a_bounded_number_of_points(sc_path: Path) -> None:
    # 101 x 100 values x 1 scheduler: refused before a single point is built or checked.
    sc = load_scenario(sc_path)
    values = ",".join(str(w) for w in range(1, 102))
    params = [parse_param(f"domain.hog.sched.weight={values}"),
              parse_param("domain.io.workload.run_us=" + ",".join(map(str, range(1, 101))))]
    with pytest.raises(XenlabError, match=r"^--param: 101 x 100 values under 1 scheduler "
                       r"make 10100 points, at most 10000$"):
        grid(sc, params, ["credit"])
    with pytest.raises(XenlabError, match=r"^--param host\.pcpus: the value 2 is given twice$"):
        grid(sc, [parse_param("host.pcpus=2,1,2")], ["credit"])


def test_command_line_values_nested_beyond_sense_are_strings() -> None:
    deep = "[" * 5000 + "]" * 5000
    assert parse_param(f"sim.seed={deep}") == ("sim.seed", (deep,))


def test_command_line_values_are_checked_as_file_values_are(sc_path: Path) -> None:
    # A TOML literal from --param is a value like any in the file: a date or nan is named
    # at its key (a date once failed the whole scenario's JSON, with no key).
    sc = load_scenario(sc_path)
    with pytest.raises(ScenarioError) as err:
        grid(sc, [parse_param("sim.seed=1979-05-27")], ["credit"])
    assert str(err.value) == (f"{sc_path}: sim.seed: expected a number, string, boolean, "
                              "list or table, got a date")
    with pytest.raises(ScenarioError) as err:
        grid(sc, [parse_param("domain.io.workload.run_us=nan")], ["credit"])
    assert str(err.value) == (f"{sc_path}: domain.io.workload.run_us: expected a finite "
                              "number, got nan")
