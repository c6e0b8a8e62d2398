"""Benchmark: the toolstack's overhead over raw QEMU, from `create` to a ready guest.

xenlab: ``Toolstack.create`` on examples/vm/tiny.cfg (parse the config, build
the argv, take the locks, write the store, start QEMU daemonized, talk QMP)
until the guest prints XENLAB-READY on its console.  Raw QEMU: the very same
argv (taken from the domain xenlab started) run by hand with ``-daemonize``,
until the same marker.  Both boot the project's guest image under TCG.

The headline is raw QEMU's time divided by xenlab's (X > 1: xenlab adds
nothing measurable; the target is overhead under 10 %, i.e. X > 0.91).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xenlab.vm.domain import Toolstack  # noqa: E402
from xenlab.vm.image import build_image  # noqa: E402

MARKER = b"XENLAB-READY"


def wait_marker(log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and MARKER in log.read_bytes():
            return
        time.sleep(0.02)
    raise RuntimeError(f"no {MARKER!r} in {log}")


def xenlab_once(work: Path, cfg: Path) -> tuple[float, list[str]]:
    ts = Toolstack(work / "state")
    start = time.perf_counter()
    rec = ts.create(cfg, create_disks="32M")
    wait_marker(ts.paths(rec).console_log)
    took = time.perf_counter() - start
    argv = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    ts.destroy(rec.name)
    return took, [a.decode() for a in argv]


def raw_once(work: Path, argv: list[str]) -> float:
    run = work / "raw"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    # Point every socket and file of xenlab's argv at this run's directory.
    src_run = Path(argv[argv.index("-pidfile") + 1]).parent
    argv = [a.replace(str(src_run), str(run)) for a in argv]
    argv = [a for a in argv if a != "-daemonize"]
    start = time.perf_counter()
    subprocess.run([*argv, "-daemonize"], check=True, stdout=subprocess.DEVNULL)
    wait_marker(run / "console.log")
    took = time.perf_counter() - start
    pid = int((run / "qemu.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    build_image()  # cached; not timed
    with tempfile.TemporaryDirectory(prefix="xenlab-bench-") as d:
        work = Path(d)
        cfg = work / "tiny.cfg"
        text = (REPO / "examples/vm/tiny.cfg").read_text()
        cfg.write_text(text.replace("/tmp/xenlab-tiny.qcow2", str(work / "tiny.qcow2")))
        xs, raws = [], []
        argv: list[str] = []
        for _ in range(args.rounds):
            t, argv = xenlab_once(work, cfg)
            xs.append(t)
            raws.append(raw_once(work, argv))
        x, r = min(xs), min(raws)
        print(f"create to guest-ready, best of {args.rounds} (TCG):")
        print(f"  xenlab vm create  {x:7.3f} s")
        print(f"  raw QEMU          {r:7.3f} s")
        print(f"  overhead          {100 * (x - r) / r:+6.1f} %")
        print(f"vm_create ratio={r / x:.2f}")


if __name__ == "__main__":
    main()
