"""``xenlab sim``: run, compare and sweep scheduler scenarios on the simulated host.

Scenario files are read and checked by :mod:`xenlab.sim.scenario` (bounded:
see :mod:`xenlab.sim.validate`); ``--out`` files are written through
:func:`xenlab.atomic.atomic_write_bytes`: atomically, through a symlink to its
target (the link stays), never over a device, a FIFO or a dangling or planted
symlink.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from xenlab.atomic import atomic_write_bytes, make_output_dir
from xenlab.cli.output import printable, stderr, stdout
from xenlab.errors import XenlabError
from xenlab.sim.report import (
    RunReport,
    compare_json,
    pcpus_csv,
    report_json,
    run_scenario,
    vcpus_csv,
)
from xenlab.sim.scenario import Scenario, check_builds, load_scenario

_SCENARIO = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT = click.Path(file_okay=False, path_type=Path)


@click.group("sim")
def sim() -> None:
    """The hypervisor simulator: scheduler scenarios, reports and sweeps."""


def _write(out: Path, files: dict[str, bytes]) -> None:
    make_output_dir(out, name=printable(str(out)))
    for name, data in files.items():
        atomic_write_bytes(out / name, data, name=printable(str(out / name)))


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("expected scheduler names separated by commas",
                                 param_hint="--sched")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # each name is a whole run (or a run per sweep point)
        raise click.BadParameter(f"{twice!r} is named twice", param_hint="--sched")
    return names


def _us(ns: int) -> str:
    us = ns / 1000
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def _vcpu_table(reports: Sequence[RunReport]) -> Table:
    many = len(reports) > 1
    t = Table(title=f"{escape(reports[0].scenario)}: {reports[0].metrics.duration_ns / 1e6:g} ms"
              + ("" if many else f", {escape(reports[0].choice.name)}, seed "
                 f"{reports[0].metrics.seed}") + " (times in us)", box=box.SIMPLE_HEAD,
              pad_edge=False)
    if many:
        t.add_column("sched", no_wrap=True)
    for col in ("vCPU", "CPU%", "jobs", "miss", "resp\np99", "resp\nmax", "wake\np99",
                "wake\nmax", "migr"):
        t.add_column(col, justify="left" if col == "vCPU" else "right", no_wrap=True)
    for r in reports:
        dur = r.metrics.duration_ns or 1
        for v in r.metrics.vcpus:
            row = [escape(v.name), f"{100 * v.cpu_ns / dur:.1f}", str(v.jobs),
                   f"[red]{v.misses}[/]" if v.misses else "0",
                   _us(v.response.p99_ns), _us(v.response.max_ns),
                   _us(v.wake_latency.p99_ns), _us(v.wake_latency.max_ns), str(v.migrations)]
            t.add_row(*([escape(r.choice.name)] if many else []), *row)
        if many and r is not reports[-1]:
            t.add_section()
    return t


def _host_line(r: RunReport) -> str:
    m = r.metrics
    idle = sum(p.idle_pct for p in m.pcpus) / len(m.pcpus)
    inj = sum(p.injected_ns for p in m.pcpus) / max(1, m.duration_ns * len(m.pcpus)) * 100
    sw = sum(p.switches for p in m.pcpus)
    energy = dict(r.extra).get("energy", {})
    watts = f", {energy['joules']:.2f} J ({energy['avg_w']:.1f} W)" if energy else ""
    return (f"{escape(r.choice.name)}: {len(m.pcpus)} pCPUs, idle {idle:.1f} % "
            f"(forced {inj:.1f} %), {sw} switches, {m.events} events{watts}")


def _verdicts(reports: Sequence[RunReport]) -> bool:
    ok = True
    for r in reports:
        for v in r.verdicts:
            style = "green" if v.ok else "red"
            stdout.print(f"[{style}]{escape(r.choice.name)}: {escape(str(v))}[/]",
                         soft_wrap=True)
            ok = ok and v.ok
    return ok


def _plots(r: RunReport, suffix: str = "") -> dict[str, bytes]:
    from xenlab.sim import plots

    files = {f"gantt{suffix}.png": plots.gantt_png(r),
             f"latency{suffix}.png": plots.latency_cdf_png(r)}
    if r.idle_target is not None:
        files[f"idle{suffix}.png"] = plots.idle_png(r)
    return files


@sim.command("run")
@click.argument("scenario", type=_SCENARIO)
@click.option("--sched", "sched", metavar="NAME",
              help="Scheduler (or the scenario's variant) instead of sim.scheduler.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed instead of sim.seed.")
@click.option("--out", type=_OUT, help="Write results.json, vcpus.csv, pcpus.csv and plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a table.")
@click.option("--check", is_flag=True, help="Exit 1 when one of the scenario's [[expect]] "
              "claims fails.")
@click.option("--no-plots", is_flag=True, help="With --out, skip the PNG plots.")
def run(scenario: Path, sched: str | None, seed: int | None, out: Path | None, as_json: bool,
        check: bool, no_plots: bool) -> None:
    """Run SCENARIO (a TOML file) and report per vCPU and pCPU.

    The same scenario, scheduler and seed give byte-identical results.json.
    """
    sc = load_scenario(scenario)
    r = run_scenario(sc, sched, seed)
    data = report_json(r)
    if out is not None:
        files = {"results.json": data, "vcpus.csv": vcpus_csv([r]).encode(),
                 "pcpus.csv": pcpus_csv([r]).encode()}
        if not no_plots:
            files.update(_plots(r))
        _write(out, files)
    if as_json:
        click.echo(data.decode(), nl=False)
    else:
        stdout.print(_vcpu_table([r]))
        stdout.print(_host_line(r), soft_wrap=True)
        _verdicts([r])
        if out is not None:
            stdout.print(f"wrote {escape(str(out))}/")
    if check and not r.ok:
        raise XenlabError(f"{scenario}: {sum(not v.ok for v in r.verdicts)} claim(s) failed "
                          f"under {r.choice.name}")


@sim.command("compare")
@click.argument("scenario", type=_SCENARIO)
@click.option("--sched", "sched", metavar="A,B,...",
              help="Schedulers to compare (default: the scenario's sim.compare).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed instead of sim.seed.")
@click.option("--out", type=_OUT, help="Write compare.json, CSVs and plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json instead of a table.")
@click.option("--check", is_flag=True, help="Exit 1 when a claim fails under any scheduler.")
@click.option("--no-plots", is_flag=True, help="With --out, skip the PNG plots.")
def compare(scenario: Path, sched: str | None, seed: int | None, out: Path | None,
            as_json: bool, check: bool, no_plots: bool) -> None:
    """Run SCENARIO under several schedulers, same seed, one table."""
    sc = load_scenario(scenario)
    names = _names(sched) or [c.name for c in sc.compare]
    for n in names:
        sc.choice(n)  # all names checked before the first run
    reports = [run_scenario(sc, n, seed) for n in names]
    data = compare_json(reports)
    if out is not None:
        files = {"compare.json": data, "vcpus.csv": vcpus_csv(reports).encode(),
                 "pcpus.csv": pcpus_csv(reports).encode()}
        if not no_plots:
            from xenlab.sim import plots

            files["compare.png"] = plots.compare_png(reports)
            for r in reports:
                files.update(_plots(r, f"-{r.choice.name}"))
        _write(out, files)
    if as_json:
        click.echo(data.decode(), nl=False)
    else:
        stdout.print(_vcpu_table(reports))
        for r in reports:
            stdout.print(_host_line(r), soft_wrap=True)
        _verdicts(reports)
    if check and not all(r.ok for r in reports):
        bad = ", ".join(r.choice.name for r in reports if not r.ok)
        raise XenlabError(f"{scenario}: claims failed under {bad}")


@sim.command("sweep")
@click.argument("scenario", type=_SCENARIO)
@click.option("--param", "params", multiple=True, metavar="KEY=V1,V2,...",
              help="A scenario key (dotted, e.g. domain.rt.sched.rtds.budget) and its values; "
                   "repeat for a grid.")
@click.option("--sched", "sched", metavar="A,B,...",
              help="Schedulers at every point (default: sim.scheduler).")
@click.option("--jobs", "-j", type=click.IntRange(min=1),
              help="Local worker processes (default: one per core).")
@click.option("--cluster", metavar="ADDRESS",
              help="Run the points on a Dask scheduler (tcp://host:8786) instead.")
@click.option("--out", type=_OUT, help="Write sweep.json, sweep.csv and sweep.png here.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json instead of a table.")
def sweep(scenario: Path, params: tuple[str, ...], sched: str | None, jobs: int | None,
          cluster: str | None, out: Path | None, as_json: bool) -> None:
    """Run SCENARIO over a grid of parameter values and schedulers.

    Each point's seed comes from sim.seed and the point's values, so every
    scheduler sees the same workload at a point and results do not depend
    on where or in which order points ran.
    """
    from xenlab.sim.runner import run_sweep
    from xenlab.sim.sweep import grid, parse_param, sweep_csv, sweep_json

    sc = load_scenario(scenario)
    grid_params = [parse_param(p) for p in params]
    names = _names(sched) or [sc.scheduler.name]
    points = grid(sc, grid_params, names)
    results = []
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=stderr,
                  disable=as_json and not stderr.is_terminal) as bar:
        task = bar.add_task(f"sweep {escape(sc.name)}", total=len(points))
        for res in run_sweep(sc, points, jobs=jobs, cluster=cluster):
            results.append(res)
            bar.advance(task)
    data = sweep_json(sc, results)
    if out is not None:
        files = {"sweep.json": data, "sweep.csv": sweep_csv(results).encode()}
        files["sweep.png"] = _sweep_plot(sc, results, names)
        _write(out, files)
    if as_json:
        click.echo(data.decode(), nl=False)
        return
    t = Table(title=f"{escape(sc.name)}: {len(points)} points")
    for col in ("point", "scheduler", "jobs", "misses", "idle %", "migr", "claims"):
        t.add_column(col, justify="left" if col in ("point", "scheduler") else "right")
    for r in sorted(results, key=lambda r: r.point.index):
        t.add_row(escape(r.point.label), escape(r.point.scheduler), str(r.jobs),
                  f"[red]{r.misses}[/]" if r.misses else "0", f"{r.idle_pct:.1f}",
                  str(r.migrations), "ok" if r.ok else "[red]FAILED[/]")
    stdout.print(t)


def _sweep_plot(sc: Scenario, results: Sequence[object], names: Sequence[str]) -> bytes:
    from xenlab.sim import plots
    from xenlab.sim.sweep import PointResult

    rs = sorted((r for r in results if isinstance(r, PointResult)), key=lambda r: r.point.index)
    labels = list(dict.fromkeys(r.point.label for r in rs))
    series = {n: [float(next((r.misses for r in rs if r.point.scheduler == n
                             and r.point.label == lb), 0)) for lb in labels] for n in names}
    return plots.sweep_png(labels, series, xlabel="point", ylabel="deadline misses",
                           title=f"{sc.name}: deadline misses per point")


@sim.command("check")
@click.argument("scenarios", nargs=-1, required=True, type=_SCENARIO)
def check_cmd(scenarios: tuple[Path, ...]) -> None:
    """Check scenario files without running them.

    Everything a run checks: the file, its includes and rt-app files, the
    parameters under every scheduler --sched could choose, and each host
    built (not run).
    """
    for path in scenarios:
        sc = load_scenario(path)
        check_builds(sc)
        vcpus = sum(len(d.workloads) for d in sc.domains)
        stdout.print(f"{escape(str(path))}: ok: {len(sc.domains)} domains, {vcpus} vCPUs on "
                     f"{sc.topology.nr_cpus} pCPUs, {sc.duration_ns / 1e6:g} ms, schedulers "
                     f"{escape(', '.join(c.name for c in sc.compare))}", soft_wrap=True)


@sim.command("schedulers")
def schedulers() -> None:
    """List the scheduler models and the per-domain parameters each takes."""
    from xenlab.sim.schedulers import SCHEDULERS

    t = Table(title="schedulers")
    t.add_column("name")
    t.add_column("domain parameters (defaults)")
    for name, cls in sorted(SCHEDULERS.items()):
        params = getattr(cls, "PARAMS", {}) or {}
        t.add_row(escape(name), escape(", ".join(f"{k}={v}" for k, v in params.items()) or "-"))
    stdout.print(t)
