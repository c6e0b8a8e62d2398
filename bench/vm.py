"""Benchmark: the toolstack's overhead over raw QEMU and QMP, and its snapshots against libvirt.

Three parts, one run, all on the project's guest image under TCG
(examples/vm/tiny.cfg: 256 MiB, 2 vCPUs, one qcow2 disk, direct kernel boot):

1. ``create`` to guest-ready.  xenlab: ``Toolstack.create`` (parse the
   config, build the argv, take the locks, write the store, start QEMU
   daemonized, talk QMP) until the guest prints XENLAB-READY on its console.
   Raw QEMU: the very same argv (read back from the QEMU xenlab started) run
   by hand with ``-daemonize``, until the same marker.

2. Per operation, on that same guest: snapshot create (internal, with the
   VM state), revert, delete; save; restore; live migration to a second
   toolstack on this host.  Each against the same operation done with raw
   QMP commands (qemu.qmp, one connection per operation as a one-shot client
   would open) on a raw QEMU with the same argv: the ``snapshot-save`` /
   ``snapshot-load`` / ``snapshot-delete`` jobs; ``stop`` + ``migrate`` to a
   file descriptor + ``quit``; a QEMU started with ``-S -incoming defer``
   that takes the file with ``migrate-incoming`` and ``cont``; a second such
   QEMU that takes ``migrate tcp:`` from the first.  Raw QMP waits on events
   (JOB_STATUS_CHANGE, MIGRATION) and does nothing else: the difference is
   the toolstack's own work (store, locks, checks, the save image's header
   and fsync, polling).

3. Peer: libvirt (Debian's libvirt-daemon-system, installed when missing and
   running as root; libvirtd started in the background when it is not
   running).  A domain defined from XML with the same kernel, initrd,
   command line, memory, vCPUs, CPU model (``max``) and a fresh qcow2 disk
   of the same size; ``virsh snapshot-create-as`` (internal with memory: the
   default for a running domain on qcow2), ``snapshot-revert``,
   ``snapshot-delete`` against xenlab's on an equal guest, both as commands
   (``xenlab vm snapshot-*``, a Python process each time) and in process
   (the library calls).

Every figure is the best of ``--rounds``.  The last two lines are
``vm_create ratio=X`` (raw QEMU's time over xenlab's: the target is overhead
under 10 %, X > 0.91) and ``vm_snapshot ratio=X`` (virsh's total
create+revert+delete time over xenlab's library calls, timed in process as in
bench/ucode.py; X > 1: xenlab is faster; the ``xenlab vm`` commands' ratio is
printed in the table, Python's start-up included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from asyncio import run as sync
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qemu.qmp import QMPClient  # noqa: E402

from xenlab.vm.domain import Toolstack  # noqa: E402
from xenlab.vm.image import GuestImage, build_image  # noqa: E402
from xenlab.vm.migration.sender import migrate, restore, save  # noqa: E402
from xenlab.vm.snapshot import create_snapshot, delete_snapshot, revert_snapshot  # noqa: E402

MARKER = b"XENLAB-READY"
NAME = "tiny"
DISK_SIZE = "32M"
UNLIMITED = 1 << 40  # migrate max-bandwidth: QEMU's default (32 MiB/s) would dominate
TIMEOUT = 120.0
OPS = ("snapshot create", "snapshot revert", "snapshot delete", "save", "restore", "migrate")


def wait_marker(log: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if MARKER in log.read_bytes():
                return
        time.sleep(0.02)
    raise RuntimeError(f"no {MARKER!r} in {log}")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"QEMU {pid} did not exit")
        time.sleep(0.005)


def kill(pid: int | None) -> None:
    if pid is not None and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)


def snapshot_tags(disk: Path) -> set[str]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                         check=True, capture_output=True, text=True).stdout
    return {s["name"] for s in json.loads(out).get("snapshots", ())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_cfg(work: Path, disk: Path) -> Path:
    cfg = work / "tiny.cfg"
    text = (REPO / "examples/vm/tiny.cfg").read_text()
    cfg.write_text(text.replace("/tmp/xenlab-tiny.qcow2", str(disk)))
    return cfg


def destroy_all(*stacks: Toolstack) -> None:
    for ts in stacks:
        for rec in ts.store.list():
            with contextlib.suppress(Exception):
                sync(ts.destroy(rec.name))
            with contextlib.suppress(Exception):
                sync(ts.undefine(rec.name))


# --- 1 + 2: xenlab ------------------------------------------------------------------------


def xenlab_round(work: Path) -> tuple[dict[str, float], list[str], Path, Path]:
    """Create to ready, then every operation; (times, QEMU argv, its rundir, its disk)."""
    base = work / "xenlab"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    disk = base / "tiny.qcow2"
    cfg = tiny_cfg(base, disk)
    ts, ts2 = Toolstack(base / "state"), Toolstack(base / "state2")
    t: dict[str, float] = {}
    # The disk is made before the clock starts, as for raw QEMU.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), DISK_SIZE], check=True)
    try:
        start = time.perf_counter()
        rec = sync(ts.create(cfg))
        t["started"] = time.perf_counter() - start
        wait_marker(ts.paths(rec).console_log)
        t["create"] = time.perf_counter() - start
        argv = [a.decode() for a in
                Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")[:-1]]
        rundir = ts.paths(rec).rundir

        t["snapshot create"] = timed(lambda: sync(create_snapshot(ts, NAME, "s1")))
        assert "s1" in snapshot_tags(disk)
        t["snapshot revert"] = timed(lambda: sync(revert_snapshot(ts, NAME, "s1")))
        t["snapshot delete"] = timed(lambda: sync(delete_snapshot(ts, NAME, "s1")))
        assert "s1" not in snapshot_tags(disk)
        image = base / "tiny.save"
        t["save"] = timed(lambda: sync(save(ts, NAME, image)))
        t["restore"] = timed(lambda: sync(restore(ts, image)))
        assert ts.get(NAME).state == "running"
        t["migrate"] = timed(lambda: sync(migrate(ts, NAME, ts2)))
        assert ts2.get(NAME).state == "running"
        return t, argv, rundir, disk
    finally:
        destroy_all(ts, ts2)


# --- 1 + 2: raw QEMU and QMP ---------------------------------------------------------------


class RawQemu:
    """The xenlab argv pointed at another run directory and disk, driven by hand."""

    def __init__(self, argv: list[str], src_run: Path, src_disk: Path, run: Path,
                 disk: Path) -> None:
        self.run, self.disk = run, disk
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        self.argv = [a.replace(str(src_run), str(run)).replace(str(src_disk), str(disk))
                     for a in argv if a != "-daemonize"]
        # xenlab's QMP socket has the standard name in the run directory.
        self.qmp = run / "qmp.sock"
        self.pidfile = Path(self.argv[self.argv.index("-pidfile") + 1])
        self.console_log = run / "console.log"
        self.pid: int | None = None

    def qcow2_node(self) -> str:
        """The node name of the (first) qcow2 format node, as xenlab named it."""
        for a in self.argv:
            if a.startswith("{"):  # -blockdev in JSON
                opts = json.loads(a)
            else:
                opts = dict(kv.split("=", 1) for kv in a.split(",") if "=" in kv)
            if opts.get("driver") == "qcow2" and "node-name" in opts:
                return str(opts["node-name"])
        raise RuntimeError("no qcow2 -blockdev in the argv")

    def start(self, *extra: str) -> None:
        subprocess.run([*self.argv, *extra, "-daemonize"], check=True,
                       stdout=subprocess.DEVNULL)
        self.pid = int(self.pidfile.read_text())

    def kill(self) -> None:
        kill(self.pid)
        self.pid = None


async def _connect(path: Path) -> QMPClient:
    c = QMPClient("bench")
    await c.connect(str(path))
    return c


async def _close(c: QMPClient) -> None:
    # After `quit` QEMU closes the socket first: the library reports that as EOFError.
    with contextlib.suppress(Exception):
        await c.disconnect()


async def _events(lis: Any, want: Callable[[dict[str, Any]], bool]) -> None:
    while True:
        ev = await asyncio.wait_for(lis.get(), TIMEOUT)
        if want(dict(ev.get("data") or {})):
            return


def _migration_done(data: dict[str, Any]) -> bool:
    status = data.get("status")
    if status in ("failed", "cancelled"):
        raise RuntimeError(f"migration {status}")
    return bool(status == "completed")


async def qmp_job(path: Path, cmd: str, args: dict[str, Any]) -> None:
    c = await _connect(path)
    try:
        job = args["job-id"]
        with c.listener(("JOB_STATUS_CHANGE",)) as lis:
            await c.execute(cmd, args)
            await _events(lis, lambda d: d.get("id") == job and d.get("status") == "concluded")
    finally:
        await _close(c)


async def _migration_setup(c: QMPClient) -> None:
    await c.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]})
    await c.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED})


async def qmp_save(path: Path, fd: int) -> None:
    c = await _connect(path)
    try:
        await _migration_setup(c)
        with c.listener(("MIGRATION",)) as lis:
            await c.execute("stop")
            c.send_fd_scm(fd)
            await c.execute("getfd", {"fdname": "save"})
            await c.execute("migrate", {"uri": "fd:save"})
            await _events(lis, _migration_done)
        with contextlib.suppress(Exception):
            await c.execute("quit")
    finally:
        await _close(c)


async def qmp_incoming(path: Path, fd: int | None = None) -> QMPClient:
    """Connect to a ``-incoming defer`` QEMU, ask for MIGRATION events, pass ``fd``."""
    c = await _connect(path)
    await c.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]})
    if fd is not None:
        c.send_fd_scm(fd)
        await c.execute("getfd", {"fdname": "restore"})
    return c


async def qmp_restore(path: Path, fd: int) -> None:
    c = await qmp_incoming(path, fd)
    try:
        with c.listener(("MIGRATION",)) as lis:
            await c.execute("migrate-incoming", {"uri": "fd:restore"})
            await _events(lis, _migration_done)
        await c.execute("cont")
    finally:
        await _close(c)


async def qmp_migrate(src: Path, dst: Path, port: int) -> None:
    d = await qmp_incoming(dst)
    s = await _connect(src)
    try:
        with d.listener(("MIGRATION",)) as dlis:
            await d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
            await _migration_setup(s)
            with s.listener(("MIGRATION",)) as slis:
                await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
                await _events(slis, _migration_done)
            await _events(dlis, _migration_done)
        await d.execute("cont")
        with contextlib.suppress(Exception):
            await s.execute("quit")
    finally:
        await _close(s)
        await _close(d)


def raw_round(work: Path, argv: list[str], src_run: Path, src_disk: Path) -> dict[str, float]:
    base = work / "raw"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    disk = base / "raw.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), DISK_SIZE], check=True)
    vm = RawQemu(argv, src_run, src_disk, base / "run", disk)
    dest = RawQemu(argv, src_run, src_disk, base / "run2", disk)
    t: dict[str, float] = {}
    try:
        start = time.perf_counter()
        vm.start()
        t["started"] = time.perf_counter() - start
        wait_marker(vm.console_log)
        t["create"] = time.perf_counter() - start

        node = vm.qcow2_node()
        snap = {"tag": "s1", "devices": [node]}
        t["snapshot create"] = timed(lambda: asyncio.run(qmp_job(
            vm.qmp, "snapshot-save", {"job-id": "save", "vmstate": node, **snap})))
        assert "s1" in snapshot_tags(disk)
        t["snapshot revert"] = timed(lambda: asyncio.run(qmp_job(
            vm.qmp, "snapshot-load", {"job-id": "load", "vmstate": node, **snap})))
        t["snapshot delete"] = timed(lambda: asyncio.run(qmp_job(
            vm.qmp, "snapshot-delete", {"job-id": "delete", **snap})))
        assert "s1" not in snapshot_tags(disk)

        image = base / "raw.save"

        def do_save() -> None:
            with image.open("wb") as f:
                asyncio.run(qmp_save(vm.qmp, f.fileno()))
            assert vm.pid is not None
            wait_gone(vm.pid)

        t["save"] = timed(do_save)

        def do_restore() -> None:
            vm.start("-S", "-incoming", "defer")
            with image.open("rb") as f:
                asyncio.run(qmp_restore(vm.qmp, f.fileno()))

        t["restore"] = timed(do_restore)

        def do_migrate() -> None:
            dest.start("-S", "-incoming", "defer")
            asyncio.run(qmp_migrate(vm.qmp, dest.qmp, free_port()))
            assert vm.pid is not None
            wait_gone(vm.pid)

        t["migrate"] = timed(do_migrate)
        return t
    finally:
        vm.kill()
        dest.kill()


# --- 3: libvirt ------------------------------------------------------------------------------


LIBVIRT_PKGS = ("libvirt-daemon-system", "libvirt-clients")


def _installed(pkg: str) -> bool:
    proc = subprocess.run(["dpkg", "-s", pkg], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "Status: install ok installed" in proc.stdout


def ensure_libvirt_installed() -> str | None:
    """None when libvirt is there (installing it if need be), else why not."""
    missing = [p for p in LIBVIRT_PKGS if not _installed(p)]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} not installed and not running as root"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and there is no apt-get"
    print(f"installing {' '.join(missing)} (not timed) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *LIBVIRT_PKGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        # The package lists may be missing or stale.
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
        return f"apt-get install failed: {' '.join(tail)}"
    return None


class Libvirt:
    """A reachable libvirtd (started here if none runs) and the URI that works."""

    def __init__(self) -> None:
        self.uri = ""
        self.started: list[tuple[str, Path]] = []  # (what, pidfile) of daemons started here

    def _works(self, uri: str) -> bool:
        proc = subprocess.run(["virsh", "-c", uri, "-q", "version"], capture_output=True,
                              text=True, check=False, timeout=30)
        return proc.returncode == 0

    def connect(self) -> str | None:
        """None when connected (self.uri set), else why not."""
        uris = ["qemu:///system", "qemu:///session"] if os.geteuid() == 0 else [
            "qemu:///session"]
        for uri in uris:
            if self._works(uri):
                self.uri = uri
                return None
        if os.geteuid() != 0:
            return "libvirtd does not answer on qemu:///session"
        # No systemd here: start the daemons by hand, in the background.
        for what, daemon, pidfile in (
            ("virtlogd", "/usr/sbin/virtlogd", Path("/run/virtlogd.pid")),
            ("libvirtd", "/usr/sbin/libvirtd", Path("/run/libvirtd.pid")),
        ):
            if _pid_of(pidfile) is not None:
                continue
            proc = subprocess.run([daemon, "-d"], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                return f"{daemon} -d failed: {proc.stderr.strip()}"
            self.started.append((what, pidfile))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._works("qemu:///system"):
                self.uri = "qemu:///system"
                return None
            time.sleep(0.2)
        return "libvirtd started but qemu:///system does not answer"

    def virsh(self, *args: str) -> None:
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                              text=True, check=False, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")

    def stop_started(self) -> None:
        for what, pidfile in reversed(self.started):
            pid = _pid_of(pidfile)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                print(f"stopped {what} (pid {pid}), which this run started")


def _pid_of(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <cpu mode='maximum'/>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{qga}'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <video><model type='none'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


@contextlib.contextmanager
def libvirt_domain(lv: Libvirt, image: GuestImage) -> Iterator[tuple[str, Path]]:
    """A running libvirt domain of the guest image; (its name, its console log)."""
    # QEMU runs as libvirt-qemu: everything it opens must be reachable without root.
    d = Path(tempfile.mkdtemp(prefix="xenlab-bench-libvirt-"))
    d.chmod(0o777)
    name = f"xenlab-bench-{os.getpid()}"
    defined = False
    try:
        kernel, initrd = d / "vmlinux", d / "initrd.img"
        shutil.copyfile(image.kernel, kernel)
        shutil.copyfile(image.initrd, initrd)
        disk = d / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), DISK_SIZE],
                       check=True)
        for p in (kernel, initrd, disk):
            p.chmod(0o666)
        console = d / "console.log"
        xml = d / "domain.xml"
        emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
        xml.write_text(DOMAIN_XML.format(
            name=name, kernel=kernel, initrd=initrd, cmdline=image.cmdline, emulator=emulator,
            disk=disk, console=console, qga=d / "qga.sock",
        ))
        lv.virsh("define", str(xml))
        defined = True
        lv.virsh("start", name)
        wait_marker(console)
        yield name, disk
    finally:
        if defined:
            with contextlib.suppress(Exception):
                lv.virsh("destroy", name)
            with contextlib.suppress(Exception):
                lv.virsh("undefine", name, "--snapshots-metadata")
            if lv.uri == "qemu:///system":
                # libvirtd's own log of this domain: nothing else here remembers it
                Path(f"/var/log/libvirt/qemu/{name}.log").unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)


def xenlab_cli() -> list[str]:
    exe = REPO / ".venv/bin/xenlab"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("xenlab")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from xenlab.cli.main import main; sys.exit(main())"]


def peer_round(lv: Libvirt, dom: str, disk: Path) -> dict[str, float]:
    t = {
        "snapshot create": timed(lambda: lv.virsh("snapshot-create-as", dom, "s1")),
    }
    assert "s1" in snapshot_tags(disk)
    t["snapshot revert"] = timed(lambda: lv.virsh("snapshot-revert", dom, "s1"))
    t["snapshot delete"] = timed(lambda: lv.virsh("snapshot-delete", dom, "s1"))
    assert "s1" not in snapshot_tags(disk)
    return t


def xenlab_snap_rounds(work: Path, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best times of the snapshot verbs on one guest: (library calls, `xenlab vm` commands)."""
    base = work / "xenlab-peer"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir()
    disk = base / "tiny.qcow2"
    cfg = tiny_cfg(base, disk)
    ts = Toolstack(base / "state")
    cli = xenlab_cli()
    env = {**os.environ, "XENLAB_STATE_DIR": str(ts.state_dir)}

    def xl(*args: str) -> None:
        proc = subprocess.run([*cli, "vm", *args], capture_output=True, text=True, env=env,
                              check=False, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"xenlab vm {' '.join(args)}: {proc.stderr.strip()}")

    api: list[dict[str, float]] = []
    cmd: list[dict[str, float]] = []
    try:
        rec = sync(ts.create(cfg, create_disks=DISK_SIZE))
        wait_marker(ts.paths(rec).console_log)
        for _ in range(rounds):
            api.append({
                "snapshot create": timed(lambda: sync(create_snapshot(ts, NAME, "s1"))),
                "snapshot revert": timed(lambda: sync(revert_snapshot(ts, NAME, "s1"))),
                "snapshot delete": timed(lambda: sync(delete_snapshot(ts, NAME, "s1"))),
            })
            cmd.append({
                "snapshot create": timed(lambda: xl("snapshot-create", NAME, "s1")),
                "snapshot revert": timed(lambda: xl("snapshot-revert", NAME, "s1")),
                "snapshot delete": timed(lambda: xl("snapshot-delete", NAME, "s1")),
            })
            assert "s1" not in snapshot_tags(disk)
    finally:
        destroy_all(ts)
    return best(api), best(cmd)


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: min(r[k] for r in runs) for k in runs[0]}


def pct(x: float, ref: float) -> str:
    return f"{100 * (x - ref) / ref:+7.1f} %"


def peer_part(work: Path, image: GuestImage, rounds: int) -> float | None:
    """Part 3; virsh's total over xenlab's (in process), or None when libvirt is unavailable."""
    why = ensure_libvirt_installed()
    lv = Libvirt()
    if why is None:
        why = lv.connect()
    if why is not None:
        print(f"libvirt comparison skipped: {why}")
        return None
    try:
        virsh_runs = []
        with libvirt_domain(lv, image) as (dom, disk):
            for _ in range(rounds):
                virsh_runs.append(peer_round(lv, dom, disk))
        v = best(virsh_runs)
        api, cmd = xenlab_snap_rounds(work, rounds)
        snaps = OPS[:3]
        print(f"\nsnapshots against libvirt ({lv.uri}, virsh {_virsh_version()}), "
              f"best of {rounds}, internal with memory, running guest:")
        print(f"  {'operation':<18}{'virsh s':>9}{'xenlab s':>10}{'ratio':>7}"
              f"{'xenlab vm s':>13}{'ratio':>7}")
        for op in snaps:
            print(f"  {op:<18}{v[op]:9.3f}{api[op]:10.3f}{v[op] / api[op]:7.2f}"
                  f"{cmd[op]:13.3f}{v[op] / cmd[op]:7.2f}")
        tv, ta, tc = (sum(d[o] for o in snaps) for d in (v, api, cmd))
        print(f"  {'total':<18}{tv:9.3f}{ta:10.3f}{tv / ta:7.2f}{tc:13.3f}{tv / tc:7.2f}")
        print("  ratio = virsh / xenlab.  xenlab s: the library calls, in process (the "
              "headline,\n  as in bench/ucode.py); xenlab vm s: the CLI, a Python process "
              "per command.")
        return tv / ta
    finally:
        lv.stop_started()


def _virsh_version() -> str:
    proc = subprocess.run(["virsh", "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-libvirt", action="store_true", help="skip the libvirt comparison")
    args = ap.parse_args()
    image = build_image()  # cached; not timed
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xenlab-bench-") as d:
        work = Path(d)
        xs: list[dict[str, float]] = []
        raws: list[dict[str, float]] = []
        for _ in range(args.rounds):
            t, argv, run, disk = xenlab_round(work)
            xs.append(t)
            raws.append(raw_round(work, argv, run, disk))
        x, r = best(xs), best(raws)
        print(f"create to guest-ready, best of {args.rounds} (TCG):")
        print(f"  xenlab vm create  {x['create']:7.3f} s")
        print(f"  raw QEMU          {r['create']:7.3f} s")
        print(f"  overhead          {pct(x['create'], r['create'])}")
        print(f"  of which until QEMU runs (create returns / -daemonize returns): xenlab "
              f"{x['started']:.3f} s, raw {r['started']:.3f} s "
              f"(+{x['started'] - r['started']:.3f} s)")
        print(f"\noperations on the running guest, best of {args.rounds}:")
        print(f"  {'operation':<18}{'xenlab s':>9}{'raw QMP s':>11}{'overhead':>11}")
        for op in OPS:
            print(f"  {op:<18}{x[op]:9.3f}{r[op]:11.3f}{pct(x[op], r[op]):>11}")
        tx, tr = sum(x[o] for o in OPS), sum(r[o] for o in OPS)
        print(f"  {'total':<18}{tx:9.3f}{tr:11.3f}{pct(tx, tr):>11}")
        snap_ratio = None
        if not args.no_libvirt:
            snap_ratio = peer_part(work, image, args.rounds)
        print(f"\n(run took {time.monotonic() - began:.0f} s)")
        print(f"vm_create ratio={r['create'] / x['create']:.2f}")
        if snap_ratio is not None:
            print(f"vm_snapshot ratio={snap_ratio:.2f}")


if __name__ == "__main__":
    main()
