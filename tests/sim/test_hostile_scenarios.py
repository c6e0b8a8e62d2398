"""Hostile scenarios through ``xenlab sim check`` and ``xenlab sim run``, as a user runs them.

Each malformed scenario must end with exit 1 and one line ``file: key: reason``
naming the exact key, quickly (under :data:`SECONDS`) and in little memory
(under :data:`PEAK_BYTES` of Python allocations), with no traceback.  Some of
these used to run forever, fill memory, or end in TypeError, MemoryError or
RecursionError; others were accepted by ``check`` and refused by ``run``.

The Hypothesis tests mutate the examples in examples/sim/ and write random
TOML-ish text: ``check`` either accepts a file or refuses it in one line, and
``run`` refuses exactly what ``check`` refuses, with the same line.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.clirun import run_cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "sim"

SECONDS = 5.0
PEAK_BYTES = 64 << 20

BASE = """\
[sim]
duration_ms = 20
seed = 1
scheduler = "credit"
[host]
pcpus = 2
[[domain]]
name = "a"
vcpus = 1
workload = { kind = "periodic", run_us = 500, period_ms = 5 }
[[domain]]
name = "b"
workload = { kind = "hog" }
"""

RTAPP = {"tasks": {"t": {"instance": 1, "loop": -1, "run": 1000,
                         "timer": {"ref": "t", "period": 5000}}}}


@dataclass(frozen=True)
class Case:
    """A malformed scenario: what to write, and which file and key the error must name."""

    id: str
    text: str | bytes  # s.toml
    key: str  # the key the error names ("" for the file as a whole)
    reason: str  # a regular expression the reason must match
    extra: tuple[tuple[str, str | bytes], ...] = ()  # other files: (name, content)
    file: str = "s.toml"  # the file the error names


def base(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def rtapp_case(id: str, doc: Any, key: str, reason: str, *, raw: str | None = None) -> Case:
    text = base('vcpus = 1\nworkload = { kind = "periodic", run_us = 500, period_ms = 5 }',
                'rtapp = "rt.json"')
    body = raw if raw is not None else json.dumps(doc, allow_nan=True)
    return Case(id, text, key, reason, (("rt.json", body),), "rt.json")


def rtapp_task(**changes: Any) -> dict[str, Any]:
    task = {**RTAPP["tasks"]["t"], **changes}
    return {"tasks": {"t": {k: v for k, v in task.items() if v is not None}}}


PERIODIC = 'workload = { kind = "periodic", run_us = 500, period_ms = 5 }'
DOMAIN_A_SCHED = '[[domain]]\nname = "b"'


def with_sched(table: str, body: str, *, scheduler: str = "credit") -> str:
    """BASE with domain a's [domain.sched...] table and sim.scheduler set."""
    text = base(DOMAIN_A_SCHED, f"[{table}]\n{body}\n[[domain]]\nname = \"b\"")
    return text.replace('scheduler = "credit"', f'scheduler = "{scheduler}"', 1)


CASES = [
    # -- the reviewer's classes ------------------------------------------------------------
    Case("duration-1e30", base("duration_ms = 20", "duration_ms = 1e30"), "sim.duration_ms",
         "at most 3600000 ms"),
    Case("pcpus-1e12", base("pcpus = 2", "pcpus = 1000000000000"), "host.pcpus",
         "at most 1024"),
    Case("pcpus-1e8", base("pcpus = 2", "pcpus = 100000000"), "host.pcpus", "at most 1024"),
    Case("sockets-huge", base("pcpus = 2", "sockets = 1000000000000"), "host.sockets",
         "at most 1024"),
    Case("threads-huge", base("pcpus = 2", "threads = 1000000000000"), "host.threads",
         "at most 1024"),
    Case("vcpus-1e12", base("vcpus = 1", "vcpus = 1000000000000"), "domain.a.vcpus",
         "at most 1024"),
    rtapp_case("rtapp-instance-1e12", rtapp_task(instance=10**12), "tasks.t.instance",
               "at most 1024"),
    Case("kind-list", base(PERIODIC, "workload = { kind = [] }"), "domain.a.workload.kind",
         "expected one of periodic.*got list"),
    Case("expect-domain-list", BASE + '[[expect]]\ndomain = ["a"]\nmisses_max = 0\n',
         "expect[0].domain", "expected a domain name, got list"),
    Case("expect-vcpu-list", BASE + '[[expect]]\nvcpu = ["a.0"]\nmisses_max = 0\n',
         "expect[0].vcpu", "expected a vCPU name, got list"),
    Case("budget-string-sedf-cbs", with_sched("domain.sched", 'budget = "4000"',
                                              scheduler="sedf-cbs"),
         "domain.a.sched.budget", "sedf-cbs budget must be an integer number of microseconds"),
    Case("weight-1e30", with_sched("domain.sched", "weight = 1e30"), "domain.a.sched.weight",
         r"credit weight must be an integer in 1\.\.65535, not 1e\+30"),
    Case("rtds-period-1e30", with_sched("domain.sched.rtds", "period = 1e30\nbudget = 4000",
                                        scheduler="rtds"),
         "domain.a.sched.rtds.period", "rtds period must be an integer number of microseconds"),
    # -- sizes: hosts, vCPUs, affinities, pools ---------------------------------------------
    Case("cores-huge", base("pcpus = 2", "cores = 5000"), "host.cores", "at most 1024"),
    Case("topology-product", base("pcpus = 2", "sockets = 64\ncores = 64\nthreads = 2"),
         "host.cores", "64 sockets x 64 cores x 2 threads is 8192 pCPUs, at most 1024"),
    Case("host-cpus-list", base("pcpus = 2", "cpus = [" + "{}, " * 1100 + "]"),
         "host.cpus", "1100 pCPUs, at most 1024"),
    Case("host-cpus-id-type", base("pcpus = 2", "cpus = [{ core = [1] }]"),
         "host.cpus[0].core", "expected an integer >= 0"),
    Case("sysfs-not-bool", base("pcpus = 2", 'sysfs = "yes"'), "host.sysfs",
         "expected true or false"),
    Case("affinity-range-1e12", base("vcpus = 1", 'vcpus = 1\naffinity = "0-1000000000000"'),
         "domain.a.affinity", r"pCPU 2 is outside the host \(pCPUs 0-1\)"),
    Case("affinity-nodes-1e12",
         base("vcpus = 1", 'vcpus = 1\naffinity = "nodes:0-1000000000000"'),
         "domain.a.affinity", "node 1 is not on the host"),
    Case("affinity-list-huge-id", base("vcpus = 1", "vcpus = 1\naffinity = [10000000000]"),
         "domain.a.affinity", "pCPU 10000000000 is outside the host"),
    Case("pool-cpus-range-1e12",
         base("[[domain]]", '[[pool]]\nname = "p"\nscheduler = "rtds"\n'
                            'cpus = "1-999999999999"\n[[domain]]'),
         "pool.p.cpus", "pCPU 2 is outside the host"),
    Case("workloads-2000",
         base(PERIODIC, "workloads = [" + '{ kind = "hog" }, ' * 2000 + "]").replace(
             "vcpus = 1\n", ""),
         "domain.a.workloads", "2000 vCPUs, at most 1024"),
    Case("vcpus-total", base("[[domain]]\nname = \"b\"\nworkload = { kind = \"hog\" }",
                             "".join(f'[[domain]]\nname = "h{i}"\nvcpus = 1000\n'
                                     'workload = { kind = "hog" }\n' for i in range(5))),
         "domain.h4.vcpus", "5001 vCPUs in all, at most 4096"),
    Case("like-chain-1500",
         base('[[domain]]\nname = "b"\nworkload = { kind = "hog" }',
              "".join(f'[[domain]]\nname = "d{i}"\nlike = "d{i + 1}"\n' for i in range(1499))
              + '[[domain]]\nname = "d1499"\nworkload = { kind = "hog" }\n'),
         "domain.d0.like", "a chain of more than 32 like references"),
    Case("cstates-many", BASE + "[power]\ncstates = [" + ", ".join(
        f'{{ name = "C{i}", watts = 1, after_us = {i} }}' for i in range(100)) + "]\n",
         "power.cstates", "100 C-states, at most 16"),
    Case("expect-many", BASE + '[[expect]]\ndomain = "a"\nmisses_max = 0\n' * 300,
         "expect", "300 claims, at most 256"),
    Case("variants-many", BASE + "".join(f'[scheduler.variant.v{i}]\nbase = "credit"\n'
                                         for i in range(17)),
         "scheduler.variant", "17 variants, at most 16"),
    Case("compare-duplicates", base('scheduler = "credit"',
                                    'scheduler = "credit"\ncompare = ["credit", "credit"]'),
         "sim.compare[1]", "'credit' is named twice"),
    # -- time: durations, periods, event counts ---------------------------------------------
    Case("duration-inf", base("duration_ms = 20", "duration_s = inf"), "sim.duration_s",
         "expected a finite number, got inf"),
    Case("duration-nan", base("duration_ms = 20", "duration_ms = nan"), "sim.duration_ms",
         "expected a finite number, got nan"),
    Case("duration-hours", base("duration_ms = 20", "duration_s = 7200"), "sim.duration_s",
         "at most 3600000 ms"),
    Case("period-1ns-events", base("period_ms = 5", "period_ns = 1").replace(
         "run_us = 500", "run_ns = 1"), "sim.duration_ms",
         "about 20,000,000 events, at most 2,000,000 .*domain a"),
    Case("cyclictest-hour", base("duration_ms = 20", "duration_s = 3600").replace(
         PERIODIC, 'workload = { kind = "cyclictest", interval_us = 100 }'),
         "sim.duration_s", r"a run of 3600 s under \S+ makes about 3\d,000,000 events"),
    Case("trace-window-events",
         base("duration_ms = 20", "duration_s = 8\ntrace_s = [0, 8]").replace(
             "vcpus = 1", "vcpus = 8").replace("period_ms = 5", "period_us = 100").replace(
             "run_us = 500", "run_us = 10"),
         "sim.trace_s", "about 6[45]0,000 events in the trace window, at most 200,000"),
    Case("trace-nan", base("duration_ms = 20", "duration_ms = 20\ntrace_ms = [nan, 1]"),
         "sim.trace_ms[0]", "expected a finite number, got nan"),
    Case("period-1e30", base("period_ms = 5", "period_us = 1e30"),
         "domain.a.workload.period_us", "at most 3600000 ms"),
    Case("run-nan", base("run_us = 500", "run_us = nan"), "domain.a.workload.run_us",
         "expected a finite number, got nan"),
    Case("offset-huge", base(PERIODIC, 'workload = { kind = "hog", offset_s = 1e20 }'),
         "domain.a.workload.offset_s", "at most 3600000 ms"),
    Case("sporadic-gap-huge", base(PERIODIC, 'workload = { kind = "sporadic", run_us = 10, '
                                             'min_gap_us = 100, max_gap_s = 1e30 }'),
         "domain.a.workload.max_gap_s", "at most 3600000 ms"),
    Case("cstate-after-huge", BASE + '[power]\ncstates = [{ name = "C1", watts = 1 }, '
                                     '{ name = "C6", watts = 0.5, after_us = 1e30 }]\n',
         "power.cstates[1].after_us", "at most 3600000 ms"),
    # -- types -----------------------------------------------------------------------------
    Case("seed-float", base("seed = 1", "seed = 1e3"), "sim.seed", "expected an integer"),
    Case("seed-bool", base("seed = 1", "seed = true"), "sim.seed", "expected an integer"),
    Case("seed-date", base("seed = 1", "seed = 1979-05-27"), "sim.seed",
         "expected a number, string, boolean, list or table, got a date"),
    Case("vcpus-float", base("vcpus = 1", "vcpus = 2.0"), "domain.a.vcpus",
         "expected an integer, got 2.0"),
    Case("workload-string", base(PERIODIC, 'workload = "hog"'), "domain.a.workload",
         "expected a table, got 'hog'"),
    Case("workloads-list-of-lists", base(PERIODIC, "workloads = [[]]").replace(
         "vcpus = 1\n", ""), "domain.a.workloads[0]", "expected a table, got list"),
    Case("name-nul", base('name = "a"', 'name = "a\\u0000"'), "domain[0].name",
         "NUL character"),
    Case("sched-bool-slice", with_sched("domain.sched.sedf", "slice = true", scheduler="sedf"),
         "domain.a.sched.sedf.slice", "sedf slice must be an integer number of microseconds"),
    Case("sedf-slice0-noextra", with_sched("domain.sched.sedf", "slice = 0\nextratime = false",
                                           scheduler="sedf"),
         "domain.a.sched.sedf.slice", r"sedf slice 0 \(best effort\) needs extratime"),
    Case("rtds-extratime-float", with_sched("domain.sched.rtds", "extratime = 1.0",
                                            scheduler="rtds"),
         "domain.a.sched.rtds.extratime", "rtds extratime must be a boolean"),
    Case("mpedf-hard-string", with_sched("domain.sched.mpedf", 'hard = "yes"',
                                         scheduler="mpedf"),
         "domain.a.sched.mpedf.hard", "mpedf hard must be a boolean"),
    Case("cap-over", with_sched("domain.sched", "cap = 70000"), "domain.a.sched.cap",
         r"credit cap must be an integer percent in 0\.\.65535"),
    Case("common-weight-another-scheduler", with_sched("domain.sched", "weight = 0",
                                                       scheduler="rtds"),
         "domain.a.sched.weight", r"credit weight must be an integer in 1\.\.65535, not 0"),
    Case("budget-default-over-period", with_sched("domain.sched.rtds", "period = 1000",
                                                  scheduler="rtds"),
         "domain.a.sched.rtds.period", "rtds budget 4000 us is above the period 1000 us"),
    Case("option-tslice-1e30", BASE + "[scheduler.options]\ntslice_ms = 1e30\n",
         "scheduler.options.tslice_ms", r"option tslice_ms must be an integer in 1\.\.1000"),
    Case("variant-runqueue", BASE + '[scheduler.variant.v]\nbase = "mpedf"\n'
                                    'options = { runqueue = "rack" }\n',
         "scheduler.variant.v.options.runqueue", "runqueue 'rack' is not one of"),
    Case("powerclamp-duration-1e30", BASE + "[powerclamp]\ntarget = 20\nduration_ms = 1e30\n",
         "powerclamp.duration_ms", r"duration_ms must be an integer in 6\.\.25"),
    Case("powerclamp-cpus-strings", BASE + '[powerclamp]\ntarget = 20\ncpus = ["a"]\n',
         "powerclamp.cpus", "expected a list of pCPU ids"),
    Case("powerclamp-cpus-outside", BASE + "[powerclamp]\ntarget = 20\ncpus = [5]\n",
         "powerclamp.cpus", "pCPU 5 is outside the host"),
    Case("power-busy-nan", BASE + "[power]\nbusy_w = nan\n", "power.busy_w",
         "expected a finite number, got nan"),
    Case("expect-nan", BASE + '[[expect]]\ndomain = "a"\nmisses_max = nan\n',
         "expect[0].misses_max", "expected a finite number, got nan"),
    # -- the text itself -------------------------------------------------------------------
    Case("deep-inline-tables", BASE + "x = " + "{a=" * 600 + "1" + "}" * 600 + "\n", "",
         "nested too deeply"),
    Case("deep-arrays", BASE + "x = " + "[" * 3000 + "]" * 3000 + "\n", "",
         "nested too deeply"),
    Case("nested-40", "x = " + "[" * 40 + "]" * 40 + "\n" + BASE,
         "x" + "[0]" * 32, "nested more than 32 deep"),
    Case("dotted-key-100000", BASE + ".".join(["a"] * 100_000) + " = 1\n", "",
         rf"line {len(BASE.splitlines()) + 1}: a key of 100000 parts, at most 32"),
    Case("over-1-mib", BASE + ("# " + "x" * 1000 + "\n") * 1100, "",
         "file larger than 1 MiB: not read"),
    Case("invalid-utf8", BASE.encode() + b'x = "\xff"\n', "",
         rf"not UTF-8 text \(byte 0xff at offset {len(BASE) + 5}\)"),
    Case("nul-byte", BASE.encode() + b"x = 1\x00\n", "", "not valid TOML"),
    # -- files a scenario names ------------------------------------------------------------
    Case("include-dev-zero", 'include = "/dev/zero"\n' + BASE, "include",
         "/dev/zero: file larger than 1 MiB"),
    Case("include-directory", 'include = "d"\n' + BASE, "include", "is a directory",
         (("d/x", ""),)),
    Case("include-fan-out", 'include = [' + '"e.toml", ' * 100 + "]\n" + BASE, "include",
         "more than 64 files", (("e.toml", ""),)),
    Case("rtapp-dev-zero", base(PERIODIC, 'rtapp = "/dev/zero"').replace("vcpus = 1\n", ""),
         "domain.a.rtapp", "/dev/zero: file larger than 1 MiB"),
    Case("rtapp-nul-name", base(PERIODIC, 'rtapp = "a\\u0000b"').replace("vcpus = 1\n", ""),
         "domain.a.rtapp", "NUL character"),
    rtapp_case("rtapp-run-nan", rtapp_task(run=math.nan), "tasks.t.run",
               "expected a finite number, got nan"),
    rtapp_case("rtapp-loop-huge", rtapp_task(loop=10**12), "tasks.t.loop",
               "at most 2147483647"),
    rtapp_case("rtapp-loop-float", rtapp_task(loop=1.5), "tasks.t.loop", "expected an integer"),
    rtapp_case("rtapp-period-huge", rtapp_task(timer={"ref": "t", "period": 1e30}),
               "tasks.t.timer.period", "at most 3600000 ms"),
    rtapp_case("rtapp-surrogate", {"tasks": {"\ud800": RTAPP["tasks"]["t"]}},
               r"tasks.\ud800", "not Unicode text"),
    rtapp_case("rtapp-deep", None, "", "nested too deeply",
               raw='{"tasks": ' + "[" * 5000 + "]" * 5000 + "}"),
    rtapp_case("rtapp-huge-int", None, "", "not valid JSON",
               raw='{"tasks": {"t": {"run": ' + "9" * 5000 + "}}}"),
]


def write(tmp_path: Path, case: Case) -> Path:
    for name, content in (("s.toml", case.text), *case.extra):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return tmp_path / "s.toml"


def measured(fn: Callable[[], tuple[int, str, str]]) -> tuple[tuple[int, str, str], float, int]:
    """``fn()`` with its time (s) and peak of Python allocations (bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, elapsed, peak


def one_clear_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and not err.startswith(("Error", "Usage")), err
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_scenarios_fail_in_one_line(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, case: Case, command: str) -> None:
    path = write(tmp_path, case)
    (code, out, err), elapsed, peak = measured(
        lambda: run_cli(capsys, "sim", command, str(path)))
    line = one_clear_line(err)
    assert code == 1, (out, err)
    shown = str(path if case.file == "s.toml" else tmp_path / case.file)
    prefix = f"{shown}: {case.key}: " if case.key else f"{shown}: "
    assert line.startswith(prefix), line
    assert re.search(case.reason, line[len(prefix):]), line
    assert elapsed < SECONDS, f"{elapsed:.1f} s"
    assert peak < PEAK_BYTES, f"{peak >> 20} MiB"


def test_the_corpus_covers_each_class_once() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 29


# -- Hypothesis: mutations of the examples, and random TOML-ish text --------------------------

HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 10**12, 1e30, -1e30, 1e-30,
                     math.inf, -math.inf, math.nan, 0.5, True, False, "", "x", "0-3",
                     "nodes:0-99999999999", "credit", "rtds", [], {}, [[]], [1e30], {"a": []},
                     "\udcff", "a\x00b", "../" * 3 + "etc/passwd", "/dev/zero"]),
    st.integers(), st.floats(), st.text(max_size=8),
)


def toml_value(v: Any) -> str:
    """A value as TOML (inline tables for tables); what the parser takes back."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_doc(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


def mutate(doc: Any, path: tuple[Any, ...], action: str, value: Any) -> None:
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[f"{last}_x"] = value
    else:
        parent[last] = value


EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.toml"))


def check_and_run_agree(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    (code, _out, err), elapsed, _peak = measured(
        lambda: run_cli(capsys, "sim", "check", str(path)))
    assert elapsed < SECONDS, f"check took {elapsed:.1f} s"
    if code == 0:
        return
    line = one_clear_line(err)
    assert code == 1 and line.startswith(f"{path.parent}/"), err
    # What check refuses, run refuses with the same line before running anything.
    code2, _out2, err2 = run_cli(capsys, "sim", "run", str(path))
    assert (code2, err2) == (1, err)


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("examples")
    for p in EXAMPLES.iterdir():
        shutil.copy(p, d / p.name)
    return d


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                   HealthCheck.too_slow])
@given(name=st.sampled_from(EXAMPLE_NAMES), data=st.data(),
       action=st.sampled_from(["set", "set", "delete", "add"]), value=HOSTILE)
def test_mutated_examples_are_accepted_or_refused_in_one_line(
        capsys: pytest.CaptureFixture[str], examples_dir: Path, name: str, data: st.DataObject,
        action: str, value: Any) -> None:
    doc = tomllib.loads((EXAMPLES / name).read_text())
    path = data.draw(st.sampled_from(paths(doc)))
    mutate(doc, path, action, value)
    target = examples_dir / f"m-{name}"
    target.write_text(toml_doc(doc), encoding="utf-8", errors="surrogatepass")
    check_and_run_agree(capsys, target)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["set", "set", "delete"]), HOSTILE)
def test_mutated_rtapp_files_are_accepted_or_refused_in_one_line(
        capsys: pytest.CaptureFixture[str], examples_dir: Path, data: st.DataObject,
        action: str, value: Any) -> None:
    doc = json.loads((EXAMPLES / "rt-guest.json").read_text())
    mutate(doc, data.draw(st.sampled_from(paths(doc))), action, value)
    (examples_dir / "rt-guest.json").write_text(json.dumps(doc), encoding="utf-8",
                                                errors="surrogatepass")
    check_and_run_agree(capsys, examples_dir / "isolation.toml")


TOMLISH = st.lists(st.one_of(
    st.sampled_from(["[sim]", "[host]", "[[domain]]", "[[expect]]", "[[pool]]", "[power]",
                     "[powerclamp]", "[scheduler.options]", "[domain.sched]",
                     "[domain.sched.rtds]", "duration_ms = ", "pcpus = ", "name = ", "vcpus = ",
                     "scheduler = ", "workload = ", "kind = ", "period = ", "budget = ",
                     "weight = ", "affinity = ", "rtapp = ", "include = ", "misses_max = ",
                     '"rtds"', '"credit"', '"a"', '"hog"', "{", "}", "[", "]", ",", "=", ".",
                     "1", "0", "-1", "1e30", "nan", "inf", "true", "3000000000000", '"0-3"',
                     "\n", "\n", "\n", " ", "#"]),
    st.text(max_size=3)), max_size=60).map("".join)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TOMLISH)
def test_random_tomlish_text_is_accepted_or_refused_in_one_line(
        capsys: pytest.CaptureFixture[str], examples_dir: Path, text: str) -> None:
    target = examples_dir / "random.toml"
    target.write_text('[sim]\nduration_ms = 10\nscheduler = "credit"\n' + text,
                      encoding="utf-8", errors="surrogatepass")
    check_and_run_agree(capsys, target)
