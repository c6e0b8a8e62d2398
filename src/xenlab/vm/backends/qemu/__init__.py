"""QEMU as the hypervisor: :class:`QemuBackend`, the first :class:`~xenlab.vm.backend.Backend`.

A domain is a daemonized ``qemu-system-x86_64`` of this user whose pidfile is
in the domain's private run directory; its handle carries the record's pid,
run directory, name and QEMU's ``-name`` (they find the process and prove it
ours: :func:`xenlab.vm.store.is_domain_qemu`, so a recycled or planted pid is
never signalled).  Run state comes from QMP's ``query-status``; a clean power
off is the guest kernel's last words on the console log.  The QEMU modules of
vm/ (qemu, qmp, rundir, vmstate, qemuimg...) move under this package in the
steps of docs/backend.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat, DiskSpec
from xenlab.config.specs.vif import VifSpec
from xenlab.errors import BackendError, StateError
from xenlab.vm.backend import (
    BlockCopyRequest,
    Capabilities,
    DomainHandle,
    ExitReason,
    LiveSnapshots,
    MemoryReport,
    MigrateRequest,
    MigrateSent,
    MigrationCookie,
    NicAttached,
    NicPlan,
    NicReleased,
    Note,
    Presence,
    SaveFacts,
    SaveRequest,
    ScreenCapture,
    Started,
    StartSpec,
    VcpuReport,
    VcpuState,
)
from xenlab.vm.backends.qemu import blockcopy, devices, memory, migration, nics, settle, vcpus
from xenlab.vm.backends.qemu import save as saving
from xenlab.vm.backends.qemu.accel import Accel, probe_accel
from xenlab.vm.backends.qemu.info import live_info
from xenlab.vm.backends.qemu.qemu import (
    RuntimePaths,
    balloon_target_mib,
    check_disk,
    disk_slot,
    needs_image,
    nic,
    nic_device_id,
    qemu_argv,
)
from xenlab.vm.backends.qemu.qmp import GuestAgent, Qmp, qdev_ids
from xenlab.vm.backends.qemu.rundir import (
    SOCKET_MAX,
    checked_rundir,
    default_rundir,
    make_rundir,
    qemu_said,
    read_pid,
    wait_gone,
)
from xenlab.vm.backends.qemu.screen import capture_screen
from xenlab.vm.backends.qemu.snapshots import open_live_snapshots
from xenlab.vm.image import CMDLINE
from xenlab.vm.migration.image import DiskSnapshot
from xenlab.vm.runtime import DISK_NODES, QEMU_NAME
from xenlab.vm.store import DomainRecord, is_domain_qemu

__all__ = ["QemuBackend"]

NAME = "qemu"
_POWER_DOWN = b"reboot: Power down"  # what Linux prints last on a clean power off
_GUEST_TIMEOUT = 5.0  # seconds the guest agent gets for a question asked in passing


@dataclass(frozen=True, slots=True)
class _Placeholder:
    """The guest image's files, named without building it (a dry run)."""

    kernel: Path
    initrd: Path
    cmdline: str


class QemuBackend:
    """Domains as QEMU processes under the state directory ``state_dir``."""

    name = NAME
    caps = Capabilities(pause=True, vcpu_hotplug=True, balloon=True, disk_hotplug=True,
                        nic_hotplug=True, cdrom_change=True, internal_snapshots=True,
                        live_disk_snapshots=True, memory_snapshots=True,
                        live_memory_snapshots=True, live_block_copy=True,
                        live_migration=True, storage_migration=True, guest_agent=True,
                        console=True, screen=True)

    def __init__(self, state_dir: Path, *, accel: Accel | None = None) -> None:
        self.state_dir = state_dir
        self._accel = accel

    @property
    def accel(self) -> Accel:
        """KVM when a real probe boot proves it works here, else TCG; probed once."""
        if self._accel is None:
            self._accel = probe_accel()
        return self._accel

    # -- the handle ------------------------------------------------------------------------

    def handle_of(self, rec: DomainRecord) -> DomainHandle:
        return DomainHandle(NAME, {"domid": rec.domid, "name": rec.name, "pid": rec.pid,
                                   "rundir": rec.rundir, QEMU_NAME: rec.extra.get(QEMU_NAME),
                                   DISK_NODES: dict(rec.extra.get(DISK_NODES) or {})})

    def _probe_record(self, h: DomainHandle) -> DomainRecord:
        # What is_domain_qemu reads: the pid, the run directory and the names.
        ref = h.ref
        extra: dict[str, Any] = {QEMU_NAME: ref[QEMU_NAME]} if ref.get(QEMU_NAME) else {}
        return DomainRecord(domid=int(ref["domid"]), name=str(ref["name"]), uuid="",
                            config_path="", config_text="", rundir=str(ref["rundir"] or ""),
                            pid=ref["pid"], state="", created=0.0, accel="", extra=extra)

    def paths_or_none(self, h: DomainHandle) -> RuntimePaths | None:
        """The run paths (None: the recorded run directory is not a private one of ours)."""
        rundir = str(h.ref.get("rundir") or "")
        if not rundir:
            return RuntimePaths.under(default_rundir(self.state_dir, int(h.ref["domid"])))
        return checked_rundir(rundir)

    def paths(self, h: DomainHandle) -> RuntimePaths:
        """The run paths; StateError when the run directory is not to be trusted."""
        paths = self.paths_or_none(h)
        if paths is None:
            raise StateError(
                f"domain {h.ref['name']!r}: its run directory {h.ref['rundir']} is missing, or "
                "is not a private directory of this user (0700, not a symlink); refusing to "
                "use it")
        return paths

    # -- lifecycle -------------------------------------------------------------------------

    def prepare(self, rec: DomainRecord) -> Mapping[str, Any]:
        """A fresh private run directory; recorded before QEMU starts (its pidfile goes there)."""
        return {"rundir": str(make_rundir(self.state_dir, rec.domid)),
                "accel": self.accel.value}

    def start_command(self, domid: int, spec: StartSpec) -> tuple[str, ...]:
        rundir = default_rundir(self.state_dir, domid)
        if len(str(rundir / "console.sock")) > SOCKET_MAX:
            rundir = Path("/tmp") / f"xenlab-{domid}-XXXXXXXX"  # make_rundir's fallback
        image = spec.image
        if image is None and needs_image(spec.config):
            image = _Placeholder(Path("<guest image>/vmlinux"),
                                 Path("<guest image>/initrd.img"), CMDLINE)
        argv = qemu_argv(spec.config, RuntimePaths.under(rundir), accel=self.accel,
                         image=image,  # type: ignore[arg-type]
                         paused=spec.paused or spec.incoming,
                         incoming="defer" if spec.incoming else None, taps=dict(spec.taps))
        return (*argv, "-daemonize")

    async def start(self, h: DomainHandle, spec: StartSpec) -> Started:
        """Spawn QEMU daemonized (``-incoming defer`` for a stream); set the balloon."""
        paths = self.paths(h)
        Qmp.forget(paths.qmp)  # a QEMU that ran at this path before is not this one
        image = spec.image
        if image is None and needs_image(spec.config):
            from xenlab.vm.image import build_image

            image = build_image()
        argv = qemu_argv(
            spec.config, paths, accel=self.accel,
            image=image,  # type: ignore[arg-type]
            paused=spec.paused or spec.incoming,
            incoming="defer" if spec.incoming else None, taps=dict(spec.taps),
        )
        _spawn(argv, paths)
        pid = read_pid(paths)
        if pid is None:
            raise BackendError(f"QEMU wrote no pid to {paths.pidfile}")
        target = balloon_target_mib(spec.config)
        async with Qmp.open(paths.qmp) as qmp:
            if spec.config.cpus is not None:
                # xl's cpus=: pin the vCPU threads (they exist already when QEMU
                # waits for an incoming stream).
                vcpus.apply_config_affinity(spec.config, await vcpus.vcpu_threads(qmp),
                                            spec.config.name)
            if spec.incoming:
                return Started({"pid": pid}, "incoming")
            if target is not None:
                # xl's memory < maxmem: the guest sees maxmem and the balloon takes
                # it down to memory once its driver is up.
                await qmp.execute("balloon", {"value": target << 20})
        return Started({"pid": pid}, await status_at(paths))

    def probe(self, h: DomainHandle) -> Presence:
        rec = self._probe_record(h)
        return Presence.ALIVE if is_domain_qemu(rec.pid, rec) else Presence.GONE

    async def state(self, h: DomainHandle, timeout: float = 10.0) -> str:
        return await status_at(self.paths(h), timeout)

    async def pause(self, h: DomainHandle) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await qmp.execute("stop")

    async def resume(self, h: DomainHandle) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await qmp.execute("cont")

    def destroy(self, h: DomainHandle) -> None:
        """SIGKILL the QEMU, found by the recorded pid or the pidfile, and wait for it."""
        rec = self._probe_record(h)
        pids = [rec.pid]
        paths = self.paths_or_none(h)
        if paths is not None:
            Qmp.forget(paths.qmp)
        if rec.rundir and paths is not None:
            pids.append(read_pid(paths))
        for pid in dict.fromkeys(pids):
            if pid is not None and is_domain_qemu(pid, rec):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                wait_gone(pid, 10)

    async def shutdown(self, h: DomainHandle) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await qmp.execute("system_powerdown")

    def wait_gone(self, h: DomainHandle, timeout: float) -> bool:
        pid = h.ref.get("pid")
        return wait_gone(pid if isinstance(pid, int) else None, timeout)

    async def reboot(self, h: DomainHandle) -> None:
        agent = GuestAgent(self.paths(h).qga)
        try:
            await agent.shutdown(mode="reboot", timeout=5)
        finally:
            await agent.close()

    async def reset(self, h: DomainHandle) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await qmp.execute("system_reset")

    async def agent_ping(self, h: DomainHandle, timeout: float) -> None:
        agent = GuestAgent(self.paths(h).qga)
        try:
            await agent.ping(timeout=timeout)
        finally:
            await agent.close()

    async def agent_exec(self, h: DomainHandle, argv: Sequence[str], timeout: float
                         ) -> tuple[int, bytes, bytes]:
        agent = GuestAgent(self.paths(h).qga)
        try:
            res = await agent.exec(list(argv), timeout=timeout)
        finally:
            await agent.close()
        return res.exitcode, res.stdout, res.stderr

    async def set_memory(self, h: DomainHandle, mib: int, timeout: float) -> MemoryReport:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            actual, reached = await memory.balloon_to(qmp, mib << 20, timeout)
        meminfo = None
        if reached:
            # What the guest sees; an agent that does not answer in time is not an error.
            try:
                code, out, _ = await self.agent_exec(h, ["cat", "/proc/meminfo"],
                                                     _GUEST_TIMEOUT)
                meminfo = out if code == 0 else None
            except BackendError:
                meminfo = None
        return MemoryReport(mib, actual >> 20, memory.memtotal_kib(meminfo), reached)

    async def set_max_memory(self, h: DomainHandle, mib: int) -> None:
        # The balloon gives back at most what QEMU was started with (-m is fixed).
        async with Qmp.open(self.paths(h).qmp) as qmp:
            memory.check_max(str(h.ref["name"]), mib, await memory.started_mib(qmp))

    async def set_vcpus(self, h: DomainHandle, n: int, config: DomainConfig, timeout: float
                        ) -> VcpuReport:
        paths = self.paths(h)
        async with Qmp.open(paths.qmp) as qmp:
            return await vcpus.set_vcpus(qmp, paths.qga, str(h.ref["name"]), n, config,
                                         timeout)

    async def vcpus(self, h: DomainHandle, online: int | None) -> tuple[VcpuState, ...]:
        pid = h.ref.get("pid")
        if not isinstance(pid, int):
            raise StateError(f"domain {h.ref['name']!r}: no QEMU recorded")
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await vcpus.vcpu_rows(qmp, pid, str(h.ref["name"]), online)

    async def pin_vcpus(self, h: DomainHandle, vcpu: int | None, cpus: frozenset[int]
                        ) -> dict[int, frozenset[int]]:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await vcpus.pin(qmp, str(h.ref["name"]), vcpu, cpus)

    async def info(self, h: DomainHandle) -> Mapping[str, Any]:
        """QEMU's facts (backends/qemu/info.py) and ``qemu_name``, the -name it runs under."""
        live = await live_info(self.paths(h).qmp)
        return {**live, "qemu_name": h.ref.get(QEMU_NAME) or h.ref["name"]}

    async def rename(self, h: DomainHandle, new: str) -> Mapping[str, Any]:
        """A running QEMU keeps its -name: the record remembers it while it differs."""
        running_as = str(h.ref.get(QEMU_NAME) or h.ref["name"])
        return {QEMU_NAME: None if running_as == new else running_as}

    # -- devices ---------------------------------------------------------------------------

    def check_disk(self, disk: DiskSpec) -> None:
        check_disk(disk)

    def disk_slot(self, vdev: str) -> int | None:
        return disk_slot(vdev)

    def plan_nic(self, config: DomainConfig, spec: VifSpec, devid: int) -> NicPlan:
        n = nic(config, spec, devid)
        return NicPlan(n.devid, n.mac, n.model, n.spec)

    def disk_parts(self, disk: DiskSpec) -> tuple[str, ...]:
        return devices.disk_parts(disk)

    async def attach_disk(self, h: DomainHandle, disk: DiskSpec, leftovers: Sequence[str]
                          ) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await devices.attach_disk(qmp, disk, leftovers)

    async def detach_disk(self, h: DomainHandle, vdev: str, timeout: float) -> tuple[str, ...]:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await devices.detach_disk(qmp, vdev, devices.pivot_node(h.ref, vdev), timeout)

    async def release_parts(self, h: DomainHandle, parts: Sequence[str]) -> dict[str, str]:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await devices.release_nodes(qmp, parts)

    async def has_disk(self, h: DomainHandle, vdev: str) -> bool:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return vdev in await qdev_ids(qmp)

    async def discard_disk(self, h: DomainHandle, parts: Sequence[str]) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            present = await devices.node_names(qmp)
            await devices.release_nodes(qmp, [n for n in parts if n in present])

    async def change_medium(self, h: DomainHandle, vdev: str, path: str | None,
                            fmt: DiskFormat) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await devices.change_medium(qmp, vdev, path, fmt)

    async def attach_nic(self, h: DomainHandle, config: DomainConfig, spec: VifSpec,
                         leftovers: Sequence[Mapping[str, Any]], note: Note) -> NicAttached:
        assert spec.devid is not None
        end, cleared = await nics.attach_nic(
            self.paths(h).qmp, int(h.ref["domid"]), str(h.ref["name"]),
            nic(config, spec, spec.devid), leftovers, note)
        return NicAttached(end, cleared)

    async def detach_nic(self, h: DomainHandle, devid: int, timeout: float) -> None:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            await nics.detach_nic(qmp, devid, timeout)

    async def release_nic(self, h: DomainHandle, devid: int,
                          host_ends: Sequence[Mapping[str, Any]]) -> NicReleased:
        offlined, problems = await nics.release_nic(self.paths(h).qmp, devid, host_ends)
        return NicReleased(offlined, problems)

    async def has_nic(self, h: DomainHandle, devid: int) -> bool:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return nic_device_id(devid) in await qdev_ids(qmp)

    async def discard_nic(self, h: DomainHandle, devid: int,
                          host_end: Mapping[str, Any] | None) -> None:
        await nics.discard_nic(self.paths(h).qmp, devid, host_end)

    # -- block jobs --------------------------------------------------------------------------

    async def block_copy(self, h: DomainHandle, req: BlockCopyRequest, note: Note
                         ) -> tuple[str, int]:
        return await blockcopy.block_copy(self.paths(h).qmp, req, note)

    async def end_block_copy(self, h: DomainHandle, vdev: str, source: str, target: str, *,
                             complete: bool) -> str | None:
        return await blockcopy.end_block_copy(self.paths(h).qmp, vdev, source, target,
                                              complete=complete)

    # -- migration ---------------------------------------------------------------------------

    async def migrate_begin(self, h: DomainHandle, disks: Sequence[str]) -> MigrationCookie:
        return await migration.begin(self.paths(h).qmp, h.ref, disks)

    async def migrate_perform(self, h: DomainHandle, req: MigrateRequest) -> MigrateSent:
        return await migration.perform(self.paths(h).qmp, h.ref, req)

    async def migrate_take_back(self, h: DomainHandle, sent: MigrateSent) -> None:
        await migration.take_back(self.paths(h).qmp, sent)

    async def migrate_abort(self, h: DomainHandle, *, resume: bool) -> str:
        return await migration.abort(self.paths(h).qmp, resume=resume)

    async def migrate_prepare(self, h: DomainHandle, host: str, port: int,
                              disks: Sequence[str], nbd_port: int | None,
                              vcpus_plugged: int | None) -> int:
        return await migration.prepare(self.paths(h).qmp, host, port, disks, nbd_port,
                                       vcpus_plugged)

    async def migrate_wait_incoming(self, h: DomainHandle, what: str, timeout: float) -> None:
        await migration.wait_incoming(self.paths(h).qmp, what, timeout)

    async def migrate_finish(self, h: DomainHandle, exports: Sequence[str] | None,
                             paused: bool) -> None:
        await migration.finish(self.paths(h).qmp, exports, paused)

    # -- what a killed verb left -------------------------------------------------------------

    async def disk_files(self, h: DomainHandle) -> dict[str, tuple[str, str]]:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await settle.disk_files(qmp)

    async def settle_jobs(self, h: DomainHandle, ids: Sequence[str], prefixes: Sequence[str],
                          complete: Sequence[str], timeout: float
                          ) -> list[tuple[str, str, str | None]]:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await settle.settle_jobs(qmp, ids, prefixes, complete, timeout)

    async def resume_stopped(self, h: DomainHandle) -> bool:
        async with Qmp.open(self.paths(h).qmp) as qmp:
            return await settle.resume_stopped(qmp)

    # -- state -----------------------------------------------------------------------------

    def session(self, h: DomainHandle) -> AbstractAsyncContextManager[None]:
        return Qmp.sharing()

    def live_snapshots(self, h: DomainHandle) -> AbstractAsyncContextManager[LiveSnapshots]:
        return open_live_snapshots(self.paths(h).qmp)

    async def save(self, h: DomainHandle, req: SaveRequest) -> SaveFacts:
        return await saving.save(self.paths(h).qmp, req)

    async def abort_save(self, h: DomainHandle, *, resume: bool,
                         snapshots: Sequence[DiskSnapshot]) -> tuple[str, tuple[str, ...]]:
        return await saving.abort_save(self.paths(h).qmp, resume=resume, snapshots=snapshots)

    async def load(self, h: DomainHandle, fd: int, offset: int, checked: tuple[int, ...],
                   source: str, timeout: float, *, run: bool,
                   vcpus_plugged: int | None = None) -> None:
        await saving.load(self.paths(h).qmp, fd, offset, checked, source, timeout, run=run,
                        vcpus_plugged=vcpus_plugged)

    async def quit(self, h: DomainHandle) -> None:
        path = self.paths(h).qmp
        async with Qmp.open(path) as qmp:
            await saving.quit_qemu(qmp)
        Qmp.forget(path)

    def said(self, h: DomainHandle) -> str:
        paths = self.paths_or_none(h)
        return qemu_said(paths) if paths is not None else ""

    def firmware_log(self, h: DomainHandle) -> Path:
        return self.paths(h).firmware_log

    async def capture_screen(self, h: DomainHandle, *, resume: bool) -> ScreenCapture:
        paths = self.paths(h)
        return await capture_screen(paths.qmp, Path(paths.rundir), resume=resume)

    def open_console(self, h: DomainHandle, timeout: float) -> socket.socket:
        """QEMU's serial port, a unix socket in the run directory (it may still be coming up)."""
        path = self.paths(h).console
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError as err:
                s.close()
                if time.monotonic() > deadline:
                    raise BackendError(f"{path}: cannot attach to the console: {err}") from err
                time.sleep(0.1)

    def exit_reason(self, h: DomainHandle) -> ExitReason | None:
        paths = self.paths_or_none(h)
        if paths is None or self.probe(h) is Presence.ALIVE:
            return None
        log = paths.console_log
        try:
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - 4096))
                tail = f.read()
        except OSError:
            return None
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        if lines and lines[-1].rstrip().endswith(_POWER_DOWN):
            return ExitReason.POWEROFF
        return None

    def release(self, h: DomainHandle) -> None:
        paths = self.paths_or_none(h)
        if paths is not None and h.ref.get("rundir"):
            shutil.rmtree(paths.rundir, ignore_errors=True)


def _spawn(argv: list[str], paths: RuntimePaths) -> None:
    """Start QEMU daemonized: it returns once its devices are up, or fails with why.

    QEMU runs with umask 077: its sockets, logs and the memory files it writes
    (snapshots, saves) are this user's alone.  A refusal quotes QEMU's own
    words, from its stderr or, once it has daemonized, from its ``-D`` log.
    """
    old = os.umask(0o077)
    try:
        with paths.log.open("ab") as log:
            proc = subprocess.run(
                [*argv, "-daemonize"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.PIPE, check=False, timeout=120,
            )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"QEMU could not be started: {err}") from err
    finally:
        os.umask(old)
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip() or qemu_said(paths)
        raise BackendError(f"QEMU refused the domain: {msg or f'exit {proc.returncode}'}")


async def status_at(paths: RuntimePaths, timeout: float = 10.0) -> str:
    """QEMU's run state over QMP, as the records spell it (prelaunch is paused)."""
    async with Qmp.open(paths.qmp, timeout=timeout) as qmp:
        st = await qmp.execute("query-status")
    status = str(st.get("status", "unknown")) if isinstance(st, dict) else "unknown"
    return {"prelaunch": "paused"}.get(status, status)
