"""Where a sweep's points run: this process, a pool of local processes, or a Dask cluster.

The simulator's one edge with processes: :mod:`xenlab.sim.sweep` makes and
checks the points and :func:`~xenlab.sim.sweep.run_point` runs one; this
module only sends them out and brings the results back as they finish.
Local workers start with ``spawn`` so none inherits the parent's threads (the
progress bar's); a worker that dies is an error naming the sweep, not a
traceback; a point's own error comes back whole (a ScenarioError pickles).
``cluster=ADDRESS`` submits to a Dask scheduler (``dask.distributed``), whose
workers need xenlab installed.  The import-linter contracts in pyproject.toml
keep processes out of every other sim module.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from xenlab.errors import XenlabError
from xenlab.sim.scenario import Scenario
from xenlab.sim.sweep import Point, PointResult, run_point

__all__ = ["run_sweep"]


def run_sweep(scenario: Scenario, points: Sequence[Point], *, jobs: int | None = None,
              cluster: str | None = None, connect_timeout: float = 30.0
              ) -> Iterator[PointResult]:
    """Run ``points``, yielding each result as it finishes (in any order).

    ``cluster``: the address of a Dask scheduler (``tcp://host:8786``),
    reached within ``connect_timeout`` seconds; otherwise ``jobs`` local
    processes (None: one per core; 1: in this process).
    """
    if cluster is not None:
        yield from _on_dask(scenario, points, cluster, connect_timeout)
        return
    workers = min(jobs or os.cpu_count() or 1, max(1, len(points)))
    if workers <= 1:
        for p in points:
            yield run_point(scenario.raw_json, scenario.source, p)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(run_point, scenario.raw_json, scenario.source, p) for p in points]
        try:
            for f in as_completed(futures):
                yield f.result()
        except BrokenProcessPool as err:
            raise XenlabError(f"sweep {scenario.name}: a worker process died ({err}); "
                              "run with --jobs 1 to see the point that kills it") from err
        finally:
            for f in futures:
                f.cancel()


def _on_dask(scenario: Scenario, points: Sequence[Point], address: str,
             timeout: float) -> Iterator[PointResult]:
    try:
        from dask.distributed import Client
        from dask.distributed import as_completed as dask_completed
    except ImportError as err:
        raise XenlabError("--cluster needs dask.distributed: pip install 'xenlab[cluster]'"
                          ) from err
    try:
        client = Client(address, timeout=timeout)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as err:
        raise XenlabError(f"--cluster {address}: cannot reach the Dask scheduler: {err}") from err
    try:
        futures = [client.submit(run_point, scenario.raw_json, scenario.source, p, pure=False,
                                 key=f"xenlab-sweep-{p.index}-{p.seed}-{p.scheduler}")
                   for p in points]
        for f in dask_completed(futures):  # type: ignore[no-untyped-call]
            result: PointResult = f.result()
            yield result
    finally:
        client.close()  # type: ignore[no-untyped-call]
