"""rt-app task files in scenarios: :func:`inline_rtapp` reads them, :func:`read_rtapp` checks them.

A domain's ``rtapp = "file.json"`` is read (through the scenario's
:class:`~xenlab.sim.validate.Files`: bounded and counted) and put in place of
its name when the scenario file is read, so merged and swept scenarios carry
the tasks themselves; :func:`read_rtapp` then turns the tasks into one
:class:`~xenlab.sim.workspec.WorkloadSpec` per vCPU, every refusal a
ScenarioError at the rt-app file and its key (or, for tasks given inline as
a TOML table, at the scenario's ``domain.NAME.rtapp`` key).

The format is rt-app's (times in microseconds):
``{"tasks": {"name": {...}}, "global": {...}}``.  Supported task keys:
``instance`` (that many vCPUs), ``loop`` (-1 = forever, else that many
jobs), ``run`` (alias ``runtime``), ``timer`` (``{"ref", "period",
"mode": "absolute"}``: a job every period, deadline = period), ``sleep``
(no timer: run then sleep, repeated) and ``delay`` (first activation).
``run`` alone with ``loop = -1`` is a hog.  ``policy``, ``priority`` and
``cpus`` are the guest's own scheduling and are ignored (the hypervisor
cannot see them), as is ``global``.  Other keys (``phases``, ``lock``,
``barrier``, ...) and ``timer`` together with ``sleep`` are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xenlab.sim.engine import NS_PER_US
from xenlab.sim.validate import (
    MAX_DOMAIN_VCPUS,
    MAX_LOOPS,
    Checker,
    Files,
    check_plain,
    join,
    parse_json,
    show,
)
from xenlab.sim.workspec import WorkloadKind, WorkloadSpec

__all__ = ["inline_rtapp", "read_rtapp"]


def inline_rtapp(data: dict[str, Any], path: Path, shown: str, files: Files) -> None:
    """Replace each domain's ``rtapp = "file.json"`` by the file's content."""
    domains = data.get("domain")
    if not isinstance(domains, list):
        return
    for i, d in enumerate(domains):
        if not isinstance(d, dict) or not isinstance(d.get("rtapp"), str):
            continue
        target = path.parent / d["rtapp"]
        name = d.get("name")
        key = f"domain.{name if isinstance(name, str) else i}.rtapp"
        doc = parse_json(files.read(target, shown, key), str(target))
        check_plain(doc, str(target))
        d["rtapp"] = doc
        d["_rtapp_source"] = str(target)


_RTAPP_IGNORED = ("policy", "priority", "cpus")
_RTAPP_TASK = ("instance", "loop", "run", "runtime", "timer", "sleep", "delay", *_RTAPP_IGNORED)


def read_rtapp(value: Any, source: str, where: str, outer: Checker) -> tuple[WorkloadSpec, ...]:
    """rt-app tasks as workloads (see the module notes for what is supported)."""
    inline = source == outer.source
    ck = outer if inline else Checker(source)
    base = where if inline else ""
    doc = ck.table(value, base or "rt-app")
    ck.only(doc, base, ("tasks", "global"))
    tasks = ck.table(doc.get("tasks"), join(base, "tasks"))
    if not tasks:
        raise ck.fail(join(base, "tasks"), "no tasks")
    out: list[WorkloadSpec] = []
    for tname, task in tasks.items():
        w = join(base, f"tasks.{tname}")
        task = ck.table(task, w)
        for k in task:
            if k not in _RTAPP_TASK:
                raise ck.fail(f"{w}.{k}", "not supported here (supported: "
                              f"{', '.join(_RTAPP_TASK)})")
        instance = ck.integer(task, "instance", w, 1, minimum=1, maximum=MAX_DOMAIN_VCPUS)
        if len(out) + instance > MAX_DOMAIN_VCPUS:
            raise ck.fail(f"{w}.instance", f"the tasks make {len(out) + instance} vCPUs, at "
                          f"most {MAX_DOMAIN_VCPUS}")
        loop = ck.integer(task, "loop", w, -1, minimum=-1, maximum=MAX_LOOPS)
        if "run" in task and "runtime" in task:
            raise ck.fail(f"{w}.runtime", "give run or runtime, not both")
        run_key = "runtime" if "runtime" in task else "run"
        run = _us(ck, task, run_key, w, required=True)
        delay = _us(ck, task, "delay", w, positive=False) or 0
        if "timer" in task:
            if "sleep" in task:
                raise ck.fail(f"{w}.sleep", "timer and sleep together are not supported")
            timer = ck.table(task["timer"], f"{w}.timer")
            ck.only(timer, f"{w}.timer", ("ref", "period", "mode"))
            if timer.get("mode", "absolute") != "absolute":
                raise ck.fail(f"{w}.timer.mode", "only absolute timers are supported")
            period = _us(ck, timer, "period", f"{w}.timer", required=True)
            spec = WorkloadSpec(WorkloadKind.PERIODIC, run_ns=run, period_ns=period,
                                offset_ns=delay, loops=loop)
        elif "sleep" in task:
            sleep = _us(ck, task, "sleep", w, positive=False) or 0
            spec = WorkloadSpec(WorkloadKind.RUN_SLEEP, run_ns=run, period_ns=sleep,
                                offset_ns=delay, loops=loop)
        elif loop == -1:
            spec = WorkloadSpec(WorkloadKind.HOG, offset_ns=delay)
        else:
            spec = WorkloadSpec(WorkloadKind.RUN_SLEEP, run_ns=run, period_ns=0,
                                offset_ns=delay, loops=loop)
        out.extend([spec] * instance)
    return tuple(out)


def _us(ck: Checker, tbl: Mapping[str, Any], key: str, where: str, *,
        required: bool = False, positive: bool = True) -> int:
    """An rt-app time (integer microseconds) as ns."""
    if key not in tbl:
        if required:
            raise ck.fail(join(where, key), "missing (required, microseconds)")
        return 0
    v = tbl[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or v < 0 or (positive and v == 0):
        raise ck.fail(join(where, key), f"expected {'a positive' if positive else 'a'} "
                      f"number of microseconds, got {show(v)}")
    return ck.time(v, join(where, key), NS_PER_US, positive=positive)
