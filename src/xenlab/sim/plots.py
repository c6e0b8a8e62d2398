"""PNG plots of simulator runs: :func:`gantt_png`, :func:`latency_cdf_png`, :func:`idle_png`,
:func:`compare_png`, :func:`sweep_png`.

Each function takes a report (or several) and returns PNG bytes; nothing is
written here.  Figures are made with matplotlib's object API on the Agg
canvas (no pyplot, no global state, no display), at a fixed size in pixels
(:data:`DPI` x the sizes below), so a plot is the same image wherever it is
drawn.  matplotlib is imported on first use: a run without plots never pays
for it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from xenlab.sim.report import RunReport

__all__ = ["DPI", "compare_png", "gantt_png", "gantt_size", "idle_png", "latency_cdf_png",
           "sweep_png"]

DPI = 100
#: Width of every plot, inches (1000 px at DPI 100).
WIDTH_IN = 10.0
#: Height of the line plots, inches.
HEIGHT_IN = 5.0
#: Samples in the idle plot's running mean (with report.IDLE_STEP_MIN_NS, >= 100 ms).
ROLLING = 5


def gantt_size(nr_pcpus: int) -> tuple[int, int]:
    """The Gantt chart's size in pixels for ``nr_pcpus`` rows."""
    return int(WIDTH_IN * DPI), int(_gantt_height(nr_pcpus) * DPI)


def _gantt_height(nr_pcpus: int) -> float:
    return 1.5 + 0.5 * min(nr_pcpus, 64)


def _figure(height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" chunk: the same figure gives the same bytes on every version.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _palette(names: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def gantt_png(r: RunReport) -> bytes:
    """Which vCPU ran on which pCPU during the trace window, coloured by domain."""
    n = min(r.nr_pcpus, 64)  # beyond 64 rows a chart is unreadable: the first 64 pCPUs
    fig = _figure(_gantt_height(r.nr_pcpus))
    ax = fig.add_axes((0.08, 0.8 / _gantt_height(r.nr_pcpus), 0.74,
                       1 - 1.2 / _gantt_height(r.nr_pcpus)))
    start, end = r.trace_ns
    domains = sorted({v.domain for v in r.metrics.vcpus})
    colors = _palette(domains)
    rows: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for pcpu, s, e, name in r.segments:
        if name is None or pcpu >= n:
            continue
        rows.setdefault((pcpu, name), []).append(((s - start) / 1e6, (e - s) / 1e6))
    for (pcpu, name), spans in sorted(rows.items()):
        dom = name.rsplit(".", 1)[0]
        ax.broken_barh(spans, (pcpu - 0.4, 0.8), facecolors=colors.get(dom, "grey"),
                       edgecolor="none")
    ax.set_xlim(0, (end - start) / 1e6)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"pCPU {i}" for i in range(n)])
    ax.set_xlabel(f"time (ms from {start / 1e6:g} ms)")
    ax.set_title(f"{r.scenario}: {r.choice.name}, seed {r.metrics.seed}")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colors[d], label=d) for d in domains],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="domain")
    return _png(fig)


def _cdf(ax: object, values: Sequence[int], label: str) -> None:
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step([x / 1000 for x in xs], ys, where="post", label=label)  # type: ignore[attr-defined]


def latency_cdf_png(r: RunReport) -> bytes:
    """The wake-up latency CDF of every vCPU that woke up."""
    fig = _figure(HEIGHT_IN)
    ax = fig.add_axes((0.08, 0.12, 0.7, 0.8))
    drawn = 0
    for name, lat in r.latencies:
        if lat:
            _cdf(ax, lat, name)
            drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no wake-ups", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("wake-up latency (us)")
    ax.set_ylabel("fraction of wake-ups")
    ax.set_title(f"{r.scenario}: wake-up latency, {r.choice.name}")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _png(fig)


def idle_png(r: RunReport) -> bytes:
    """Measured idle (mean over pCPUs) against PowerClamp's target, over the run."""
    fig = _figure(HEIGHT_IN)
    ax = fig.add_axes((0.08, 0.12, 0.88, 0.8))
    ts = [t / 1e6 for t, _ in r.idle_series]
    raw = [pct for _, pct in r.idle_series]
    # Injection comes in cycles of tens of ms: a single sample swings between 0
    # and 100 %, so the line to read is the mean over the last ROLLING samples.
    k = ROLLING
    smooth = [sum(raw[max(0, i - k + 1):i + 1]) / len(raw[max(0, i - k + 1):i + 1])
              for i in range(len(raw))]
    ax.plot(ts, raw, color="tab:blue", alpha=0.25, linewidth=0.8, label="idle per sample")
    ax.plot(ts, smooth, color="tab:blue", label=f"idle, mean of {k} samples")
    if r.idle_target is not None:
        ax.axhline(r.idle_target, color="red", linestyle="--", label="target")
    ax.set_ylim(0, 100)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("idle (% of pCPU time)")
    ax.set_title(f"{r.scenario}: idle vs target, {r.choice.name}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    return _png(fig)


def compare_png(reports: Sequence[RunReport]) -> bytes:
    """Per domain, under each scheduler: CPU share, deadline misses and p99 wake-up latency."""
    fig = _figure(HEIGHT_IN)
    axes = [fig.add_axes((0.06 + i * 0.32, 0.2, 0.26, 0.7)) for i in range(3)]
    domains = sorted({v.domain for r in reports for v in r.metrics.vcpus})
    width = 0.8 / max(1, len(reports))
    for k, r in enumerate(reports):
        dur = r.metrics.duration_ns or 1
        cpu: list[float] = []
        miss: list[float] = []
        p99: list[float] = []
        for d in domains:
            vs = [v for v in r.metrics.vcpus if v.domain == d]
            cpu.append(100.0 * sum(v.cpu_ns for v in vs) / dur)
            miss.append(sum(v.misses for v in vs))
            p99.append(max((v.wake_latency.p99_ns for v in vs), default=0) / 1000)
        xs = [i + k * width for i in range(len(domains))]
        for ax, ys in zip(axes, (cpu, miss, p99), strict=True):
            ax.bar(xs, ys, width, label=r.choice.name)
    for ax, title in zip(axes, ("CPU (% of one pCPU)", "deadline misses",
                                "p99 wake-up latency (us)"), strict=True):
        ax.set_title(title, fontsize="medium")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))])
        ax.set_xticklabels(domains, rotation=30, ha="right", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(reports[0].scenario if reports else "")
    return _png(fig)


def sweep_png(xs: Sequence[str], series: Mapping[str, Sequence[float]], *, xlabel: str,
              ylabel: str, title: str) -> bytes:
    """One line per scheduler over the sweep's points (``xs`` are the points' labels)."""
    fig = _figure(HEIGHT_IN)
    ax = fig.add_axes((0.08, 0.22, 0.88, 0.7))
    for name, ys in series.items():
        ax.plot(range(len(xs)), ys, marker="o", label=name)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs, rotation=30, ha="right", fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)
