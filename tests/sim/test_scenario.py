"""sim.scenario: the TOML format, rt-app files, references, each rejection's file: key: reason."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from xenlab.sim.metrics import summarize
from xenlab.sim.scenario import (
    ScenarioError,
    WorkloadKind,
    build_host,
    load_scenario,
    parse_value,
    with_params,
)

MS = 1_000_000

BASE = """
[sim]
duration_ms = 100
seed = 4
scheduler = "rtds"
[host]
pcpus = 4
[[domain]]
name = "rt"
vcpus = 2
affinity = "0-3,^2"
workload = { kind = "periodic", run_us = 2000, period_ms = 10 }
[domain.sched.rtds]
period = 10000
budget = 3000
[[domain]]
name = "hog"
workload = { kind = "hog" }
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_scenario_reads_into_checked_values(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, BASE))
    assert sc.duration_ns == 100 * MS and sc.seed == 4 and sc.scheduler.kind == "rtds"
    rt = sc.domains[0]
    assert rt.affinity == frozenset({0, 1, 3})
    assert [w.kind for w in rt.workloads] == [WorkloadKind.PERIODIC] * 2
    assert rt.workloads[0].run_ns == 2 * MS and rt.workloads[0].period_ns == 10 * MS
    assert rt.params_for("rtds", ("period", "budget")) == {"period": 10000, "budget": 3000}
    host = build_host(sc)
    assert [d.params for d in host.domains] == [{"budget": 3000, "period": 10000}, {}]
    assert host.vcpus[1].affinity == frozenset({0, 1, 3})
    host.run(sc.duration_ns)
    host.finish()
    m = summarize(host)
    assert m.vcpu("rt.0").jobs == 10 and m.vcpu("rt.0").misses == 0


def test_rtapp_tasks_become_vcpus(tmp_path: Path) -> None:
    (tmp_path / "app.json").write_text(json.dumps({"tasks": {
        "ctl": {"instance": 2, "loop": -1, "run": 1000, "timer": {"ref": "t", "period": 4000},
                "priority": 10},
        "bg": {"loop": 3, "run": 500, "sleep": 2000, "delay": 1000},
        "spin": {"loop": -1, "run": 100},
    }, "global": {"duration": 5}}))
    text = BASE.replace('vcpus = 2\naffinity = "0-3,^2"\n'
                        'workload = { kind = "periodic", run_us = 2000, period_ms = 10 }',
                        'rtapp = "app.json"')
    sc = load_scenario(write(tmp_path, text))
    ws = sc.domains[0].workloads
    assert [w.kind for w in ws] == [WorkloadKind.PERIODIC, WorkloadKind.PERIODIC,
                                    WorkloadKind.RUN_SLEEP, WorkloadKind.HOG]
    assert ws[0].run_ns == 1 * MS and ws[0].period_ns == 4 * MS
    assert ws[2].offset_ns == 1 * MS and ws[2].loops == 3
    host = build_host(sc, "null")
    host.run(100 * MS)
    host.finish()
    m = summarize(host)
    assert m.vcpu("rt.0").jobs == 25  # one every 4 ms
    assert m.vcpu("rt.2").jobs == 3 and m.vcpu("rt.2").cpu_ns == 3 * 500_000  # loop = 3


def test_include_and_like_merge(tmp_path: Path) -> None:
    write(tmp_path, BASE, "base.toml")
    sc = load_scenario(write(tmp_path, """
include = "base.toml"
[sim]
seed = 9
[[domain]]
name = "hog"
vcpus = 3
[[domain]]
name = "copy"
like = "rt"
affinity = [2]
"""))
    assert sc.seed == 9 and sc.duration_ns == 100 * MS  # included, then overridden
    names = [d.name for d in sc.domains]
    assert names == ["rt", "hog", "copy"]
    assert len(sc.domains[1].workloads) == 3
    copy = sc.domains[2]
    assert copy.affinity == frozenset({2}) and len(copy.workloads) == 2
    assert copy.by_sched == sc.domains[0].by_sched


def test_with_params_sets_dotted_keys_and_rechecks(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, BASE))
    sc2 = with_params(sc, {"domain.rt.sched.rtds.budget": 5000, "host.pcpus": 2,
                           "domain.rt.affinity": "0", "sim.duration_us": 500,
                           "domain.rt.workload.run_ms": 1})
    assert sc2.topology.nr_cpus == 2 and sc2.duration_ns == 500_000
    assert dict(sc2.domains[0].by_sched)["rtds"] == (("budget", 5000), ("period", 10000))
    assert sc2.domains[0].workloads[0].run_ns == 1 * MS
    with pytest.raises(ScenarioError, match=r"s\.toml: domain\.rt\.sched\.rtds\.budget: "
                       r"budget 20000 is greater than period 10000"):
        with_params(sc, {"domain.rt.sched.rtds.budget": 20000})
    with pytest.raises(ScenarioError, match=r"domain\.nope\.x: no domain named 'nope'"):
        with_params(sc, {"domain.nope.x": 1})
    assert parse_value("3") == 3 and parse_value("2.5") == 2.5 and parse_value("true") is True
    assert parse_value("cpu") == "cpu" and parse_value('"a,b"') == "a,b"


BAD = [
    # (what is changed, key, reason)
    (("budget = 3000", "budget = -5"), "domain.rt.sched.rtds.budget", "must not be negative"),
    (("budget = 3000", "budget = 30000"), "domain.rt.sched.rtds.budget",
     "budget 30000 is greater than period 10000"),
    (('scheduler = "rtds"', 'scheduler = "bfs"'), "sim.scheduler", "unknown scheduler 'bfs'"),
    (("pcpus = 4", "pcpus = 0"), "host.pcpus", "expected a positive integer, got 0"),
    (('affinity = "0-3,^2"', 'affinity = "2-7"'), "domain.rt.affinity",
     r"pCPU 4 is outside the host \(pCPUs 0-3\)"),
    (('affinity = "0-3,^2"', 'affinity = "^0"'), "domain.rt.affinity", "names no pCPU"),
    (('affinity = "0-3,^2"', 'affinity = "x"'), "domain.rt.affinity", "bad term 'x'"),
    (("seed = 4", "seed = 4\nspeed = 2"), "sim.speed", "unknown key"),
    (("vcpus = 2", "vcpus = 2\ncolour = 1"), "domain.rt.colour", "unknown key"),
    (("[domain.sched.rtds]", "[domain.sched.rtsd]"), "domain.rt.sched.rtsd",
     "unknown scheduler 'rtsd'"),
    (("budget = 3000", "budget = 3000\nweight = 5"), "domain.rt.sched.rtds.weight",
     "unknown key: rtds takes"),
    (("duration_ms = 100", "duration_ms = -1"), "sim.duration_ms", "must be positive"),
    (("duration_ms = 100", "seed_x = 1"), "sim.seed_x", "unknown key"),
    (("period_ms = 10", "period_ms = 10, period_us = 5"), "domain.rt.workload.period_ms",
     "period is given twice"),
    (('kind = "periodic"', 'kind = "bursty"'), "domain.rt.workload.kind",
     "expected one of periodic"),
    (('name = "hog"', 'name = "rt"'), "domain.rt.name", "already defined"),
    (("vcpus = 2", "vcpus = 0"), "domain.rt.vcpus", "must be at least 1"),
]


@pytest.mark.parametrize(("change", "key", "reason"), BAD, ids=[b[1] + ":" + b[2][:20]
                                                                for b in BAD])
def test_bad_scenarios_name_file_key_reason(tmp_path: Path, change: tuple[str, str], key: str,
                                            reason: str) -> None:
    text = BASE.replace(*change, 1)
    assert text != BASE
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError, match=rf"^{path}: {key}: .*{reason}") as info:
        load_scenario(path)
    assert info.value.file == str(path) and info.value.key == key


def test_cyclic_references_are_errors(tmp_path: Path) -> None:
    write(tmp_path, 'include = "b.toml"\n' + BASE, "a.toml")
    write(tmp_path, 'include = "a.toml"\n', "b.toml")
    with pytest.raises(ScenarioError, match=r"b\.toml: include: cyclic include: "
                       r"a\.toml -> b\.toml -> a\.toml"):
        load_scenario(tmp_path / "a.toml")
    text = BASE + '[[domain]]\nname = "x"\nlike = "y"\n[[domain]]\nname = "y"\nlike = "x"\n'
    with pytest.raises(ScenarioError, match=r"s\.toml: domain\.\w\.like: cyclic reference: "
                       r"(x -> y -> x|y -> x -> y)"):
        load_scenario(write(tmp_path, text))


def test_files_and_rtapp_errors_name_their_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"s\.toml: not valid TOML"):
        load_scenario(write(tmp_path, "[sim\n"))
    (tmp_path / "bad.json").write_text(json.dumps(
        {"tasks": {"t": {"run": 100, "timer": {"period": 0}}}}))
    text = BASE.replace('workload = { kind = "periodic", run_us = 2000, period_ms = 10 }',
                        'rtapp = "bad.json"').replace("vcpus = 2\n", "")
    with pytest.raises(ScenarioError, match=r"bad\.json: tasks\.t\.timer\.period: expected a "
                       "positive number of microseconds"):
        load_scenario(write(tmp_path, text))
    (tmp_path / "bad.json").write_text(json.dumps({"tasks": {"t": {"run": 1, "phases": {}}}}))
    with pytest.raises(ScenarioError, match=r"bad\.json: tasks\.t\.phases: not supported"):
        load_scenario(tmp_path / "s.toml")


def test_scheduler_refusals_surface_with_file_and_domain(tmp_path: Path) -> None:
    # null takes no parameters: asking for it with rtds parameters only is fine
    # (they are rtds's), but common parameters are checked at build time.
    sc = load_scenario(write(tmp_path, BASE.replace("[domain.sched.rtds]\n", "[domain.sched]\n")
                             .replace("budget = 3000", "budget = 3000\n[domain.sched.null]")))
    host = build_host(sc, "null")
    assert host.domains[0].params == {}
    with pytest.raises(ScenarioError, match=r"s\.toml: scheduler: unknown scheduler 'nope'"):
        build_host(sc, "nope")


def test_scenario_errors_pickle_with_their_parts() -> None:
    # Sweeps carry them back from worker processes and Dask workers.
    for e in (ScenarioError("a.toml", "domain.x.sched.weight", "must be positive"),
              ScenarioError("b.toml", "", "not valid TOML")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is ScenarioError and str(back) == str(e)
        assert (back.file, back.key, back.reason) == (e.file, e.key, e.reason)
