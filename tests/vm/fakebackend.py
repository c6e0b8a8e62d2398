"""An in-memory :class:`~xenlab.vm.backend.Backend` that records every call.

The second backend the issue asks for, to prove the protocol stands alone: the
Toolstack's verbs run their store, lock and convergence logic over it with no
process, socket or file of a hypervisor.  Its world is a dict by uuid (the
domains it "runs"); knobs make a domain vanish, power off or hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from xenlab import hotplug
from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat, DiskSpec
from xenlab.config.specs.vif import VifSpec
from xenlab.errors import BackendError, DeviceNotReleased, NotFoundError, Refused, UsageError
from xenlab.vm.backend import (
    BlockCopyFailed,
    BlockCopyRequest,
    Capabilities,
    DiskSnap,
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
    Unsupported,
    VcpuReport,
    VcpuState,
)
from xenlab.vm.domconfig import stable_mac
from xenlab.vm.migration import image as saveimage
from xenlab.vm.migration.image import DiskSnapshot
from xenlab.vm.store import DomainRecord


@dataclass
class FakeDomain:
    state: str = "running"
    alive: bool = True
    exit: ExitReason | None = None
    started_mib: int = 0  # the memory it was started with (the balloon's ceiling)
    memory_mib: int = 0
    maxvcpus: int = 1
    online: int = 1
    pins: dict[int, frozenset[int]] = field(default_factory=dict)
    disks: dict[str, str | None] = field(default_factory=dict)  # vdev -> file (cdrom: medium)
    parts: set[str] = field(default_factory=set)  # parts of disks that are not released
    nics: set[int] = field(default_factory=set)  # devids the guest has
    incoming_done: bool = False  # a migration stream arrived


@dataclass
class FakeBackend:
    name: str = "fake"
    caps: Capabilities = field(default_factory=lambda: Capabilities(pause=True))
    world: dict[str, FakeDomain] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    loops: set[int] = field(default_factory=set)  # the event loops its calls ran on
    sessions: int = 0
    slow: float = 0.0  # seconds pause/resume take (to hold a lock while another waits)
    aslow: float = 0.0  # seconds pause/resume take yielding to the loop (tasks of a process)
    inside: int = 0  # pause/resume calls in progress now, and at most
    peak: int = 0
    refuse: str | None = None  # a start fails with these words (a config it cannot run)
    stubborn: bool = False  # the guests ignore the power button
    agent: bool = True  # the guests' agents answer
    clingy: bool = False  # the guests never let a device go
    sticky: bool = False  # parts of removed disks are never released
    ends_up: set[str] = field(default_factory=set)  # host ends (NIC bridges) that are up
    tags: dict[str, set[str]] = field(default_factory=dict)  # image -> internal snapshot tags
    memories: dict[tuple[str, str], str] = field(default_factory=dict)  # (image, tag) -> state
    lose_answer: bool = False  # a snapshot is taken, and the answer saying so is lost
    drop_session: bool = False  # the snapshot session breaks while the memory streams
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def vanish(self, uuid: str, exit: ExitReason | None = None) -> None:
        """The domain ends behind the toolstack's back (a crash, or a clean power off)."""
        self.world[uuid].alive = False
        self.world[uuid].exit = exit

    def _dom(self, h: DomainHandle, call: str) -> FakeDomain:
        with self._lock:
            self.calls.append((call, str(h.ref["uuid"])))
            with contextlib.suppress(RuntimeError):  # a sync method: no loop runs
                self.loops.add(id(asyncio.get_running_loop()))
        dom = self.world.get(str(h.ref["uuid"]))
        if dom is None or not dom.alive:
            raise BackendError(f"fake: no domain {h.ref['uuid']}")
        return dom


    def prepare(self, rec: DomainRecord) -> Mapping[str, Any]:
        with self._lock:
            self.calls.append(("prepare", rec.uuid))
        return {"accel": "fake"}

    async def start(self, h: DomainHandle, spec: StartSpec) -> Started:
        with self._lock:
            self.calls.append(("start", str(h.ref["uuid"])))
        if self.refuse is not None:
            raise BackendError(f"fake refused the domain: {self.refuse}")
        state = "incoming" if spec.incoming else "paused" if spec.paused else "running"
        size = spec.config.maxmem_mib
        self.world[str(h.ref["uuid"])] = FakeDomain(
            state, started_mib=size, memory_mib=size, maxvcpus=spec.config.maxvcpus,
            online=spec.config.vcpus, disks={d.vdev: d.pdev_path for d in spec.config.disks},
            nics={v.devid if v.devid is not None else i for i, v in enumerate(spec.config.vifs)})
        return Started({}, state)

    def start_command(self, domid: int, spec: StartSpec) -> tuple[str, ...]:
        return ("fake-start", str(domid), spec.config.name, *(
            f"tap={d}:{t}" for d, t in sorted(spec.taps.items())))

    def handle_of(self, rec: DomainRecord) -> DomainHandle:
        return DomainHandle(self.name, {"uuid": rec.uuid})

    def probe(self, h: DomainHandle) -> Presence:
        dom = self.world.get(str(h.ref["uuid"]))
        return Presence.ALIVE if dom is not None and dom.alive else Presence.GONE

    async def state(self, h: DomainHandle, timeout: float = 10.0) -> str:
        return self._dom(h, "state").state

    async def _busy(self) -> None:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            time.sleep(self.slow)
            await asyncio.sleep(self.aslow)
        finally:
            self.inside -= 1

    async def pause(self, h: DomainHandle) -> None:
        dom = self._dom(h, "pause")
        await self._busy()
        dom.state = "paused"

    async def resume(self, h: DomainHandle) -> None:
        dom = self._dom(h, "resume")
        await self._busy()
        dom.state = "running"

    def destroy(self, h: DomainHandle) -> None:
        with self._lock:
            self.calls.append(("destroy", str(h.ref["uuid"])))
        dom = self.world.get(str(h.ref["uuid"]))
        if dom is not None and dom.alive:
            dom.alive = False
            dom.exit = None

    async def shutdown(self, h: DomainHandle) -> None:
        dom = self._dom(h, "shutdown")
        if not self.stubborn:
            dom.alive, dom.exit = False, ExitReason.POWEROFF

    def wait_gone(self, h: DomainHandle, timeout: float) -> bool:
        """Blocks up to ``timeout``, as a real backend's wait does."""
        deadline = time.monotonic() + timeout
        while self.probe(h) is not Presence.GONE:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    async def reboot(self, h: DomainHandle) -> None:
        self._dom(h, "reboot")
        if not self.agent:
            raise BackendError("fake: no guest agent")

    async def reset(self, h: DomainHandle) -> None:
        self._dom(h, "reset")

    async def agent_ping(self, h: DomainHandle, timeout: float) -> None:
        self._dom(h, "agent_ping")
        if not self.agent:
            raise BackendError("fake: no guest agent")

    async def agent_exec(self, h: DomainHandle, argv: Sequence[str], timeout: float
                         ) -> tuple[int, bytes, bytes]:
        self._dom(h, "agent_exec")
        if not self.agent:
            raise BackendError("fake: no guest agent")
        return 0, " ".join(argv).encode() + b"\n", b""

    async def set_memory(self, h: DomainHandle, mib: int, timeout: float) -> MemoryReport:
        dom = self._dom(h, "set_memory")
        dom.memory_mib = mib
        return MemoryReport(mib, mib, mib * 1024 if self.agent else None, True)

    async def set_max_memory(self, h: DomainHandle, mib: int) -> None:
        dom = self._dom(h, "set_max_memory")
        if mib > dom.started_mib:
            raise UsageError(f"fake: {mib} MiB is above the {dom.started_mib} MiB it started with")

    async def set_vcpus(self, h: DomainHandle, n: int, config: DomainConfig, timeout: float
                        ) -> VcpuReport:
        dom = self._dom(h, "set_vcpus")
        if not 1 <= n <= dom.maxvcpus:
            raise UsageError(f"fake: vcpu-set {n} is out of range (1 to {dom.maxvcpus})")
        dom.online = n
        return VcpuReport(n, n, f"0-{n - 1}" if n > 1 else "0")

    async def vcpus(self, h: DomainHandle, online: int | None) -> tuple[VcpuState, ...]:
        dom = self._dom(h, "vcpus")
        every = frozenset(range(8))
        return tuple(VcpuState(v, 0, "offline" if v >= dom.online else dom.state, 0.0,
                               dom.pins.get(v, every), 0) for v in range(dom.maxvcpus))

    async def pin_vcpus(self, h: DomainHandle, vcpu: int | None, cpus: frozenset[int]
                        ) -> dict[int, frozenset[int]]:
        dom = self._dom(h, "pin_vcpus")
        which = range(dom.maxvcpus) if vcpu is None else [vcpu]
        if vcpu is not None and not 0 <= vcpu < dom.maxvcpus:
            raise NotFoundError("vcpu", str(vcpu), f"fake: no vCPU {vcpu}")
        for v in which:
            dom.pins[v] = cpus
        return {v: cpus for v in which}

    async def info(self, h: DomainHandle) -> Mapping[str, Any]:
        dom = self._dom(h, "info")
        return {"state": dom.state, "memory_mib": dom.memory_mib, "vcpus": dom.online,
                "disks": dict(dom.disks), "nics": sorted(dom.nics)}

    async def rename(self, h: DomainHandle, new: str) -> Mapping[str, Any]:
        self._dom(h, "rename")
        return {}

    def check_disk(self, disk: DiskSpec) -> None:
        if disk.script is not None:
            raise UsageError(f"disk {disk.vdev}: fake: no disk scripts")

    def disk_slot(self, vdev: str) -> int | None:
        return None if vdev.startswith("xvdz") else 0x20 + ord(vdev[-1]) - ord("a")

    def plan_nic(self, config: DomainConfig, spec: VifSpec, devid: int) -> NicPlan:
        if spec.model not in (None, "virtio"):
            raise UsageError(f"vif {devid}: fake: model={spec.model!r}")
        mac = (":".join(f"{o:02x}" for o in spec.mac) if spec.mac is not None
               else stable_mac(config, devid))
        return NicPlan(devid, mac, "fake-nic", spec)

    def disk_parts(self, disk: DiskSpec) -> tuple[str, ...]:
        return (f"{disk.vdev}-part",)

    async def attach_disk(self, h: DomainHandle, disk: DiskSpec, leftovers: Sequence[str]
                          ) -> None:
        dom = self._dom(h, "attach_disk")
        if disk.vdev in dom.disks:
            raise BackendError(f"fake: a device {disk.vdev} is there already")
        if self.sticky and dom.parts & {*leftovers, *self.disk_parts(disk)}:
            raise BackendError(f"fake keeps parts of an earlier {disk.vdev}")
        dom.parts -= {*leftovers, *self.disk_parts(disk)}
        if self.refuse is not None:
            raise Refused("attach", self.refuse, f"fake refused the disk: {self.refuse}")
        dom.disks[disk.vdev] = disk.pdev_path

    async def detach_disk(self, h: DomainHandle, vdev: str, timeout: float) -> tuple[str, ...]:
        dom = self._dom(h, "detach_disk")
        if vdev in dom.disks:
            if self.clingy:
                raise DeviceNotReleased(vdev, timeout)
            del dom.disks[vdev]
            dom.parts.add(f"{vdev}-part")
        return (f"{vdev}-part",)

    async def release_parts(self, h: DomainHandle, parts: Sequence[str]) -> dict[str, str]:
        dom = self._dom(h, "release_parts")
        if self.sticky:
            return {p: "in use" for p in parts if p in dom.parts}
        dom.parts -= set(parts)
        return {}

    async def has_disk(self, h: DomainHandle, vdev: str) -> bool:
        return vdev in self._dom(h, "has_disk").disks

    async def discard_disk(self, h: DomainHandle, parts: Sequence[str]) -> None:
        self._dom(h, "discard_disk").parts -= set(parts)

    async def change_medium(self, h: DomainHandle, vdev: str, path: str | None,
                            fmt: DiskFormat) -> None:
        dom = self._dom(h, "change_medium")
        if vdev not in dom.disks:
            raise Refused("change_medium", "no drive", f"fake: no drive {vdev}")
        dom.disks[vdev] = path

    async def attach_nic(self, h: DomainHandle, config: DomainConfig, spec: VifSpec,
                         leftovers: Sequence[Mapping[str, Any]], note: Note) -> NicAttached:
        dom = self._dom(h, "attach_nic")
        assert spec.devid is not None and spec.mac is not None  # the verb pins them
        if spec.devid in dom.nics:
            raise BackendError(f"fake: a NIC {spec.devid} is there already")
        cleared = []
        for old in leftovers:
            self.ends_up.discard(str(old["vifname"]))
            cleared.append(old)
        end: dict[str, Any] | None = None
        if spec.bridge is not None:
            end = hotplug.vif_to_json(hotplug.Vif(0, spec.devid, f"fk{str(h.ref['uuid'])[:6]}."
                                                  f"{spec.devid}", bridge=spec.bridge))
            self.ends_up.add(str(end["vifname"]))
            note({"vif": end})
        if self.refuse is not None:
            if end is not None:
                self.ends_up.discard(str(end["vifname"]))
            raise Refused("attach", self.refuse, f"fake refused the NIC: {self.refuse}")
        dom.nics.add(spec.devid)
        return NicAttached(end, tuple(cleared))

    async def detach_nic(self, h: DomainHandle, devid: int, timeout: float) -> None:
        dom = self._dom(h, "detach_nic")
        if devid in dom.nics and self.clingy:
            raise DeviceNotReleased(f"vif{devid}", timeout)
        dom.nics.discard(devid)

    async def release_nic(self, h: DomainHandle, devid: int,
                          host_ends: Sequence[Mapping[str, Any]]) -> NicReleased:
        self._dom(h, "release_nic")
        if self.sticky:
            return NicReleased((), tuple(f"{e['vifname']} is busy" for e in host_ends))
        for end in host_ends:
            self.ends_up.discard(str(end["vifname"]))
        return NicReleased(tuple(host_ends), ())

    async def has_nic(self, h: DomainHandle, devid: int) -> bool:
        return devid in self._dom(h, "has_nic").nics

    async def discard_nic(self, h: DomainHandle, devid: int,
                          host_end: Mapping[str, Any] | None) -> None:
        self._dom(h, "discard_nic")
        if host_end is not None:
            self.ends_up.discard(str(host_end["vifname"]))

    async def block_copy(self, h: DomainHandle, req: BlockCopyRequest, note: Note
                         ) -> tuple[str, int]:
        dom = self._dom(h, "block_copy")
        source = dom.disks.get(req.vdev)
        if source is None:
            raise BlockCopyFailed(f"fake: no disk {req.vdev}")
        if self.refuse is not None:
            raise BlockCopyFailed(f"fake refused the copy: {self.refuse}")
        data = Path(source).read_bytes()
        fd = os.open(req.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        note({"phase": "completing"})
        if not req.pivot:
            return "", len(data)
        dom.disks[req.vdev] = str(req.target)
        return f"{req.vdev}-copy", len(data)

    async def end_block_copy(self, h: DomainHandle, vdev: str, source: str, target: str, *,
                             complete: bool) -> str | None:
        dom = self._dom(h, "end_block_copy")
        return f"{vdev}-copy" if dom.disks.get(vdev) == target else None

    # Fake destinations listening for a stream, by "host:port": (backend, uuid).
    listening: ClassVar[dict[str, tuple[FakeBackend, str]]] = {}
    _ports: ClassVar[itertools.count[int]] = itertools.count(47000)

    async def migrate_begin(self, h: DomainHandle, disks: Sequence[str]) -> MigrationCookie:
        dom = self._dom(h, "migrate_begin")
        return MigrationCookie(dom.state == "running", "fake-1", {d: 1 << 20 for d in disks})

    async def migrate_perform(self, h: DomainHandle, req: MigrateRequest) -> MigrateSent:
        dom = self._dom(h, "migrate_perform")
        dest = self.listening.pop(req.where, None)
        if dest is None or self.refuse is not None:
            raise BackendError(f"fake: nobody takes the stream at {req.where}")
        backend, uuid = dest
        there = backend.world[uuid]
        there.memory_mib, there.online, there.state = dom.memory_mib, dom.online, "paused"
        there.incoming_done = True
        was_running, dom.state = dom.state == "running", "paused"
        return MigrateSent({"total-time": 1, "downtime": 1, "ram": {"transferred": 1}},
                           was_running)

    async def migrate_take_back(self, h: DomainHandle, sent: MigrateSent) -> None:
        self._dom(h, "migrate_take_back").state = "running" if sent.was_running else "paused"

    async def migrate_abort(self, h: DomainHandle, *, resume: bool) -> str:
        dom = self._dom(h, "migrate_abort")
        if resume:
            dom.state = "running"
        return dom.state

    async def migrate_prepare(self, h: DomainHandle, host: str, port: int,
                              disks: Sequence[str], nbd_port: int | None,
                              vcpus_plugged: int | None) -> int:
        self._dom(h, "migrate_prepare")
        bound = port or next(self._ports)
        self.listening[f"{host}:{bound}"] = (self, str(h.ref["uuid"]))
        return bound

    async def migrate_wait_incoming(self, h: DomainHandle, what: str, timeout: float) -> None:
        dom = self._dom(h, "migrate_wait_incoming")
        if not dom.incoming_done:
            raise BackendError(f"{what}: fake: no stream came")

    async def migrate_finish(self, h: DomainHandle, exports: Sequence[str] | None,
                             paused: bool) -> None:
        self._dom(h, "migrate_finish").state = "paused" if paused else "running"

    async def disk_files(self, h: DomainHandle) -> dict[str, tuple[str, str]]:
        dom = self._dom(h, "disk_files")
        return {v: (f, f"{v}-fake") for v, f in dom.disks.items() if f is not None}

    async def settle_jobs(self, h: DomainHandle, ids: Sequence[str], prefixes: Sequence[str],
                          complete: Sequence[str], timeout: float
                          ) -> list[tuple[str, str, str | None]]:
        self._dom(h, "settle_jobs")
        return []  # the fake's operations finish before they return

    async def resume_stopped(self, h: DomainHandle) -> bool:
        dom = self._dom(h, "resume_stopped")
        if dom.state == "paused":
            dom.state = "running"
            return True
        return False

    def session(self, h: DomainHandle) -> AbstractAsyncContextManager[None]:
        return self._session_block(h)

    @asynccontextmanager
    async def _session_block(self, h: DomainHandle) -> AsyncIterator[None]:
        with self._lock:
            self.sessions += 1  # blocks entered (not calls: nothing is asked of the domain)
        yield

    def live_snapshots(self, h: DomainHandle) -> AbstractAsyncContextManager[LiveSnapshots]:
        return self._session(h)

    @asynccontextmanager
    async def _session(self, h: DomainHandle) -> AsyncIterator[LiveSnapshots]:
        self._dom(h, "live_snapshots")
        yield FakeLiveSnapshots(self, h)

    async def save(self, h: DomainHandle, req: SaveRequest) -> SaveFacts:
        """The fake's stream is its domain as one JSON line behind QEMU's magic (the image
        format knows QEMU's streams only, so far), checksummed as the verbs want."""
        dom = self._dom(h, "save")
        facts = SaveFacts(dom.state == "running", "fake-1")
        seed = req.header(facts)
        dom.state = "paused"
        start = os.lseek(req.fd, 0, os.SEEK_CUR)
        state = {"memory_mib": dom.memory_mib, "online": dom.online, "disks": dom.disks,
                 "nics": sorted(dom.nics)}
        os.write(req.fd, saveimage.QEMU_MAGIC + json.dumps(state).encode() + b"\n")
        saveimage.StreamHasher(req.fd, start, seed=seed).finish()
        req.commit()
        if req.keep_running:
            dom.state = "running" if facts.running else "paused"
        else:
            dom.alive, dom.exit = False, None
        return facts

    async def abort_save(self, h: DomainHandle, *, resume: bool,
                         snapshots: Sequence[DiskSnapshot]) -> tuple[str, tuple[str, ...]]:
        dom = self._dom(h, "abort_save")
        if resume:
            dom.state = "running"
        return dom.state, tuple(s.file for s in snapshots)

    async def load(self, h: DomainHandle, fd: int, offset: int, checked: tuple[int, ...],
                   source: str, timeout: float, *, run: bool,
                   vcpus_plugged: int | None = None) -> None:
        dom = self._dom(h, "load")
        line = os.pread(fd, 1 << 16, offset).split(b"\n", 1)[0]
        line = line.removeprefix(saveimage.QEMU_MAGIC)
        state = json.loads(line)
        dom.memory_mib, dom.online = state["memory_mib"], state["online"]
        dom.disks, dom.nics = state["disks"], set(state["nics"])
        dom.state = "running" if run else "paused"

    async def quit(self, h: DomainHandle) -> None:
        dom = self._dom(h, "quit")
        dom.alive, dom.exit = False, None

    def said(self, h: DomainHandle) -> str:
        return ""

    def firmware_log(self, h: DomainHandle) -> Path:
        raise Unsupported(self.name, "screen", "fake: no firmware")

    async def capture_screen(self, h: DomainHandle, *, resume: bool) -> ScreenCapture:
        raise Unsupported(self.name, "screen", "fake: no display")

    def open_console(self, h: DomainHandle, timeout: float) -> socket.socket:
        """One end of a socket pair; the guest's end echoes what it is sent, upper-cased."""
        self._dom(h, "open_console")
        ours, guests = socket.socketpair()

        def guest() -> None:
            with guests:
                guests.sendall(b"fake login: ")
                while data := guests.recv(4096):
                    guests.sendall(data.upper())

        threading.Thread(target=guest, daemon=True).start()
        return ours

    def exit_reason(self, h: DomainHandle) -> ExitReason | None:
        dom = self.world.get(str(h.ref["uuid"]))
        return None if dom is None or dom.alive else dom.exit

    def release(self, h: DomainHandle) -> None:
        with self._lock:
            self.calls.append(("release", str(h.ref["uuid"])))
        self.world.pop(str(h.ref["uuid"]), None)


def _state_of(dom: FakeDomain) -> str:
    # A VM state holds the guest, not the images its disks run on.
    return json.dumps({"memory_mib": dom.memory_mib, "online": dom.online,
                       "nics": sorted(dom.nics)})


def _set_state(dom: FakeDomain, text: str) -> None:
    state = json.loads(text)
    dom.memory_mib, dom.online, dom.nics = state["memory_mib"], state["online"], set(
        state["nics"])


class FakeLiveSnapshots:
    """The fake's snapshot session: internal tags and memories in dicts, overlays made and
    merged with the real qemu-img (a hypervisor's own image code), memory files checked
    VM state files holding the domain as JSON."""

    def __init__(self, backend: FakeBackend, h: DomainHandle) -> None:
        self._b, self._h = backend, h
        self._closed = False

    def _dom(self, call: str) -> FakeDomain:
        return self._b._dom(self._h, call)

    def _file(self, node: str) -> str:
        vdev = node.removeprefix("fake:")
        file = self._dom("node").disks.get(vdev)
        if file is None:
            raise Refused("take", "no such node", f"fake: no node {node}")
        return os.path.realpath(file)

    @property
    def connected(self) -> bool:
        dom = self._b.world.get(str(self._h.ref["uuid"]))
        return dom is not None and dom.alive and not self._closed

    async def node_and_tags(self, file: str, fallback: str) -> tuple[str, set[str] | None]:
        want = os.path.realpath(file)
        for vdev, f in self._dom("node_and_tags").disks.items():
            if f is not None and os.path.realpath(f) == want:
                return f"fake:{vdev}", set(self._b.tags.get(want, set()))
        return fallback, None

    async def take(self, snaps: Sequence[DiskSnap], timeout: float) -> None:
        dom = self._dom("take")
        if self._b.refuse is not None:
            raise Refused("take", self._b.refuse, f"fake refused the snapshot: {self._b.refuse}")
        files = [self._file(s.node) for s in snaps]  # all known, or nothing is taken
        for s, file in zip(snaps, files, strict=True):
            if s.overlay is not None:  # formatted first, switched only once all are
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", file, "-F",
                                "qcow2" if file.endswith(".qcow2") else "raw", s.overlay],
                               check=True, capture_output=True)
        for s, file in zip(snaps, files, strict=True):
            if s.overlay is None:
                self._b.tags.setdefault(file, set()).add(s.tag)
            else:
                dom.disks[s.node.removeprefix("fake:")] = s.overlay
        if self._b.lose_answer:
            raise BackendError("fake: the answer to take was lost (it was applied)")

    async def delete_internal(self, node: str, tag: str, job: str, timeout: float) -> None:
        self._dom("delete_internal")
        self._b.tags.get(self._file(node), set()).discard(tag)

    async def commit(self, top: str, top_node: str, base: str, base_node: str, job: str,
                     timeout: float) -> None:
        dom = self._dom("commit")
        subprocess.run(["qemu-img", "commit", "-q", top], check=True, capture_output=True)
        for vdev, f in dom.disks.items():
            if f is not None and os.path.realpath(f) == os.path.realpath(top):
                dom.disks[vdev] = base

    async def drop_nodes_on(self, file: str) -> list[str]:
        self._dom("drop_nodes_on")
        return []

    async def pause(self) -> None:
        self._dom("pause").state = "paused"

    async def resume(self, *, after_stream: bool = False) -> None:
        self._dom("resume").state = "running"

    async def run_state(self) -> str:
        return self._dom("run_state").state

    async def save_state(self, fd: int, timeout: float,
                         at_switchover: Callable[[], Awaitable[None]] | None = None) -> None:
        dom = self._dom("save_state")
        dom.state = "paused"
        if self._b.drop_session:
            self._closed = True
            raise BackendError("fake: the session broke while the memory streamed")
        if at_switchover is not None:
            await at_switchover()
        os.write(fd, saveimage.STREAM_MAGIC + saveimage.QEMU_MAGIC
                 + _state_of(dom).encode() + b"\n")
        saveimage.StreamHasher(fd, len(saveimage.STREAM_MAGIC)).finish()

    async def load_state(self, fd: int, timeout: float, source: str,
                         vcpus_plugged: int | None) -> None:
        dom = self._dom("load_state")
        saveimage.check_stream_open(fd, source)
        line = os.pread(fd, 1 << 16, len(saveimage.STREAM_MAGIC)).split(b"\n", 1)[0]
        _set_state(dom, line.removeprefix(saveimage.QEMU_MAGIC).decode())
        dom.state = "paused"

    async def save_internal(self, tag: str, nodes: Sequence[str], timeout: float) -> None:
        dom = self._dom("save_internal")
        files = [self._file(n) for n in nodes]
        for f in files:
            self._b.tags.setdefault(f, set()).add(tag)
        self._b.memories[(files[0], tag)] = _state_of(dom)

    async def load_internal(self, tag: str, nodes: Sequence[str], state_node: str,
                            timeout: float) -> None:
        dom = self._dom("load_internal")
        state = self._b.memories.get((self._file(state_node), tag))
        if state is None:
            raise Refused("snapshot-load", "no VM state",
                          f"fake: no VM state {tag!r} in {state_node}")
        _set_state(dom, state)
        dom.state = "paused"

    async def finish_state_save(self, timeout: float) -> str:
        self._dom("finish_state_save")
        return "none"

    async def cancel_state_save(self) -> None:
        self._dom("cancel_state_save")

    async def finish_state_load(self, timeout: float) -> str:
        return "completed" if self._dom("finish_state_load").incoming_done else "none"
