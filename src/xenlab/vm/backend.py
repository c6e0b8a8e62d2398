"""The typed interface under the toolstack's verbs: :class:`Backend`, its values and errors.

The verbs (vm.domain's Toolstack and the verb modules) keep the records, locks,
jobs and convergence rules; a backend is what runs domains: today QEMU
(:mod:`xenlab.vm.backends.qemu`), next real Xen through xl, and in the tests an
in-memory fake.  A verb finds a domain again through the :class:`DomainHandle`
its backend makes from the record, asks the backend whether it is there
(:meth:`Backend.probe`, cheap, no control channel) and what it is doing, and
never reaches a process or socket itself.  The protocol grows in the order of
docs/backend.md (lifecycle first; devices, state and migration follow); this
module imports no backend.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from xenlab.config.model import DomainConfig
from xenlab.config.specs.disk import DiskFormat, DiskSpec
from xenlab.config.specs.vif import VifSpec
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm.migration.image import DiskSnapshot
from xenlab.vm.store import DomainRecord

__all__ = [
    "Backend",
    "BlockCopyFailed",
    "BlockCopyRequest",
    "Capabilities",
    "CopyProgress",
    "DiskSnap",
    "DomainHandle",
    "ExitReason",
    "LiveSnapshots",
    "MemoryReport",
    "MigrateRequest",
    "MigrateSent",
    "MigrationCookie",
    "MigrationProgress",
    "MirrorProgress",
    "NicAttached",
    "NicPlan",
    "NicReleased",
    "Note",
    "Presence",
    "Progress",
    "SaveFacts",
    "SaveRequest",
    "ScreenCapture",
    "StartSpec",
    "Started",
    "Unsupported",
    "VcpuReport",
    "VcpuState",
    "WrongBackend",
    "check_backend",
]


T = TypeVar("T")


class Presence(Enum):
    """Whether a domain's process or hypervisor domain is there."""

    ALIVE = "alive"
    GONE = "gone"


class ExitReason(Enum):
    """Why a domain that is gone went (as far as the backend can tell)."""

    POWEROFF = "poweroff"  # the guest powered itself off cleanly (xl forgets it)


@dataclass(frozen=True, slots=True)
class DomainHandle:
    """What finds a domain again: the backend's name and its own JSON facts about it."""

    backend: str
    ref: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StartSpec:
    """What to start: the config (its uuid set), paused or not, and whether it waits
    for an incoming stream (restore, receive, a revert with memory) instead of booting.
    ``taps`` are the host ends the verbs made for its NICs (vif devid: name);
    ``image`` a guest kernel and initrd for a config that names none."""

    config: DomainConfig
    paused: bool = False
    incoming: bool = False
    taps: Mapping[int, str] = field(default_factory=dict)
    image: object | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """What a start left: the record fields the backend keeps (QEMU: ``pid``) and the run
    state (running, paused, or incoming while a stream is awaited)."""

    fields: Mapping[str, Any]
    state: str


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """What a memory change achieved: the target, the hypervisor's view and the guest's.

    ``actual_mib`` is what the balloon holds the guest to now; ``guest_total_kib``
    the guest's own ``MemTotal`` (None when it could not be asked); ``reached``
    whether ``actual`` got to the target within the timeout.
    """

    target_mib: int
    actual_mib: int
    guest_total_kib: int | None
    reached: bool


@dataclass(frozen=True, slots=True)
class VcpuReport:
    """What a vCPU change achieved: vCPUs asked for, and what the guest sees.

    ``guest_online`` is the guest's ``nproc`` and ``guest_cpus`` its online CPU
    list (None when it could not be asked).
    """

    vcpus: int
    guest_online: int | None
    guest_cpus: str | None


@dataclass(frozen=True, slots=True)
class VcpuState:
    """One vCPU as the host sees it: ``state`` running, blocked (the guest idles),
    paused or offline; ``time_s`` its CPU time; ``cpu`` the host CPU it last ran
    on; ``affinity`` its hard affinity; ``thread_id`` (0 where there is none)."""

    vcpu: int
    cpu: int
    state: str
    time_s: float
    affinity: frozenset[int]
    thread_id: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; a verb checks (:meth:`require`) before it changes anything."""

    pause: bool = True
    vcpu_hotplug: bool = False
    vcpu_hot_unplug: bool = False
    balloon: bool = False
    disk_hotplug: bool = False
    nic_hotplug: bool = False
    cdrom_change: bool = False
    internal_snapshots: bool = False
    live_disk_snapshots: bool = False
    memory_snapshots: bool = False
    live_memory_snapshots: bool = False  # the memory copied while the guest runs (--live)
    live_block_copy: bool = False
    live_migration: bool = False
    storage_migration: bool = False
    guest_agent: bool = False
    console: bool = False
    screen: bool = False  # the display's text and a screenshot, the firmware's debug log

    def require(self, flag: str, what: str, backend: str) -> None:
        """Refuse ``what`` (a verb and its object) unless capability ``flag`` is there."""
        if flag not in {f.name for f in fields(self)}:
            raise ValueError(f"no capability {flag!r}")
        if not getattr(self, flag):
            raise Unsupported(backend, flag, f"{what}: the {backend} backend cannot do it "
                                             f"({flag.replace('_', ' ')})")


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One progress report of a stream: ``phase`` is "storage" (disk mirrors) or "memory".

    Byte counts are the hypervisor's: for memory, RAM transferred and remaining
    of ``total``; for storage, the mirrors' offsets summed over all disks.
    """

    phase: str
    status: str
    transferred: int
    remaining: int
    total: int
    elapsed: float


Progress = Callable[[MigrationProgress], None]


@dataclass(frozen=True, slots=True)
class MirrorProgress:
    """One progress report of a block copy: bytes ``done`` of ``total`` (QEMU's offset/len)."""

    vdev: str
    status: str
    done: int
    total: int
    ready: bool
    elapsed: float


CopyProgress = Callable[[MirrorProgress], None]


@dataclass(frozen=True, slots=True)
class BlockCopyRequest:
    """Copy running disk ``vdev`` to the new image ``target`` (format ``format``), and with
    ``pivot`` switch the guest to it (libvirt's blockcopy --pivot; without: a copy of the
    disk as it was when the copy converged).  ``bandwidth`` caps it (bytes/s, None: no
    cap); ``timeout`` bounds it; ``started`` is when the verb began (for progress)."""

    vdev: str
    target: Path
    format: str
    pivot: bool
    timeout: float
    started: float
    bandwidth: int | None = None
    progress: CopyProgress | None = None


class BlockCopyFailed(BackendError):
    """A block copy failed; how far it got: ``created`` (the target file was made),
    ``pivot_asked``, ``pivoted`` (the guest writes to the target now, on ``node``),
    ``length`` (bytes copied), ``lost`` (the control channel broke: the hypervisor may
    have died)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.node = ""
        self.pivot_asked = False
        self.pivoted = False
        self.length = 0
        self.lost = False
        self.created = False


@dataclass(frozen=True, slots=True)
class MigrationCookie:
    """What the source tells the destination before it sends (libvirt's Begin3 cookie)."""

    running: bool  # the guest runs
    version: str  # the hypervisor's version
    disk_sizes: Mapping[str, int]  # vdev -> bytes, of the disks a storage migration copies


@dataclass(frozen=True, slots=True)
class MigrateRequest:
    """Send domain ``name``'s state to a destination listening at ``where`` (HOST:PORT);
    with ``disks``, first copy them into its NBD exports on ``host``:``nbd_port``.
    ``live=False`` pauses the guest first; ``max_bandwidth`` in bytes/s (None: no cap)."""

    name: str
    where: str
    host: str
    nbd_port: int | None
    disks: tuple[str, ...]
    live: bool
    max_bandwidth: int | None
    timeout: float
    started: float
    progress: Progress | None = None


@dataclass(frozen=True, slots=True)
class MigrateSent:
    """A completed stream: the hypervisor's final figures (``info``: QEMU's query-migrate),
    whether the guest ran before, and what the backend must restore to take it back."""

    info: Mapping[str, Any]
    was_running: bool
    backend_state: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SaveFacts:
    """What the backend knows as a save begins; it goes into the verb's image header."""

    running: bool  # the guest ran (the save pauses it)
    version: str  # the hypervisor's version (QEMU's), kept for the restore's error messages


@dataclass(frozen=True, slots=True)
class SaveRequest:
    """A save of a running domain's memory and device state to ``fd``.

    ``header`` writes the verb's image header at ``fd`` (given the backend's
    facts) and returns the seed of the stream's checksums; the backend then
    pauses the guest, takes ``snapshots`` (internal disk snapshots: all at one
    instant, or none), writes its checked stream, and calls ``commit`` once
    the stream is whole on ``fd``, before the domain goes (or, with
    ``keep_running``, runs on as it was).
    """

    fd: int
    header: Callable[[SaveFacts], int]
    commit: Callable[[], None]
    keep_running: bool
    timeout: float
    max_bandwidth: int | None = None
    progress: Progress | None = None
    snapshots: tuple[DiskSnapshot, ...] = ()
    tick: Callable[[], None] | None = None
    what: str = "save"


# How a backend puts a recovery fact into the verb's job before a step a kill must not
# lose (the host end of a NIC it brought up): Toolstack.update_job.
Note = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class NicAttached:
    """What a NIC attach made: its host end (``xenlab.hotplug.vif_to_json``, what Xen's vif
    scripts are given; None when it has none) and the host ends of earlier, gone NICs it
    took down on the way.  The verbs keep host ends in the record (``runtime.VIFS``)."""

    host_end: Mapping[str, Any] | None
    cleared: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class NicPlan:
    """One vif as the backend runs it: xl's devid, its MAC (the config's, else a stable
    one under Xen's OUI), the backend's model for it, and the spec."""

    devid: int
    mac: str
    model: str  # QEMU: the device (virtio-net-pci, e1000...)
    spec: VifSpec

    @property
    def tap(self) -> bool:
        """True when the vif names a bridge or a script: a host end, not user mode."""
        return self.spec.bridge is not None or self.spec.script is not None


@dataclass(frozen=True, slots=True)
class NicReleased:
    """What the clean-up after a NIC detach did: host ends taken down, and what failed."""

    offlined: tuple[Mapping[str, Any], ...] = ()
    problems: tuple[str, ...] = ()


class Unsupported(XenlabError):
    """Backend ``backend`` lacks capability ``capability``; nothing was changed."""

    def __init__(self, backend: str, capability: str, message: str) -> None:
        self.backend = backend
        self.capability = capability
        super().__init__(message)


class WrongBackend(StateError):
    """Domain ``domain`` belongs to backend ``recorded``, not to ``running``; nothing was done.

    One state directory may hold domains of several backends; a toolstack
    never probes, converges or clears a domain of another one (a QEMU
    toolstack would see a Xen domain's missing QEMU as "gone").
    """

    def __init__(self, domain: str, recorded: str, running: str) -> None:
        self.domain = domain
        self.recorded = recorded
        self.running = running
        super().__init__(f"domain {domain!r} belongs to the {recorded} backend; this "
                         f"command runs the {running} backend, so nothing was done")


@dataclass(frozen=True, slots=True)
class DiskSnap:
    """One disk's part of a live snapshot taken at one instant (:meth:`LiveSnapshots.take`).

    ``node`` is the backend's name for the image the disk runs on (QEMU: its format
    node).  Without ``overlay`` the snapshot ``tag`` goes inside that image (qcow2's
    internal snapshots); with it, the disk switches to a new qcow2 ``overlay`` (a
    file the verb has claimed, empty) named ``overlay_node``, and the image freezes.
    """

    node: str
    tag: str
    overlay: str | None = None
    overlay_node: str | None = None


class LiveSnapshots(Protocol):
    """One session on a running domain's disks and memory, for the snapshot verbs.

    What libvirt's snapshot driver calls and xl leaves to the disks: find the image a
    disk runs on, take every disk's snapshot at one instant, merge an overlay back,
    and stream the guest's memory to and from a checked file.  The verbs and the
    per-disk plugins (vm.snapbackends) keep the plan, the files and the records;
    a session is opened once per verb (:meth:`Backend.live_snapshots`).
    """

    @property
    def connected(self) -> bool:
        """True while the session can still talk to the domain."""
        ...

    async def node_and_tags(self, file: str, fallback: str) -> tuple[str, set[str] | None]:
        """The backend's name for image ``file`` and the internal snapshot tags it sees
        there; (``fallback``, None) when the domain has no such image open."""
        ...

    async def take(self, snaps: Sequence[DiskSnap], timeout: float) -> None:
        """Take every snapshot of ``snaps`` at one instant, all or none."""
        ...

    async def delete_internal(self, node: str, tag: str, job: str, timeout: float) -> None:
        """Delete internal snapshot ``tag`` in image ``node`` (it may sit below an overlay)."""
        ...

    async def commit(self, top: str, top_node: str, base: str, base_node: str, job: str,
                     timeout: float) -> None:
        """Merge image ``top`` (the disk's top) into ``base`` right below it; the disk
        runs on ``base`` after, and nothing holds ``top`` any more."""
        ...

    async def drop_nodes_on(self, file: str) -> list[str]:
        """Forget the images on ``file`` no device uses any more; their names."""
        ...

    async def pause(self) -> None:
        """Stop the guest's vCPUs."""
        ...

    async def resume(self, *, after_stream: bool = False) -> None:
        """Run the guest again (``after_stream``: a memory stream has just ended)."""
        ...

    async def run_state(self) -> str:
        """The backend's word for what the guest is doing ("running", "paused"...)."""
        ...

    async def save_state(self, fd: int, timeout: float,
                         at_switchover: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stream the guest's memory to ``fd`` as a checked VM state file; with
        ``at_switchover`` the guest runs while it copies and the callback runs once it
        has stopped, before the last pages are sent."""
        ...

    async def load_state(self, fd: int, timeout: float, source: str,
                         vcpus_plugged: int | None) -> None:
        """Load the checked VM state file at ``fd`` into a domain started to wait for
        one (``vcpus_plugged`` vCPUs made present first); the guest stays paused."""
        ...

    async def save_internal(self, tag: str, nodes: Sequence[str], timeout: float) -> None:
        """Snapshot ``tag`` of every image in ``nodes`` with the memory in the first."""
        ...

    async def load_internal(self, tag: str, nodes: Sequence[str], state_node: str,
                            timeout: float) -> None:
        """Load snapshot ``tag`` of ``nodes``, the memory from ``state_node``."""
        ...

    async def finish_state_save(self, timeout: float) -> str:
        """Let a memory save a killed verb left end (cancelled if it cannot); its status."""
        ...

    async def cancel_state_save(self) -> None:
        """Stop a memory save a killed verb left, before its disks are touched."""
        ...

    async def finish_state_load(self, timeout: float) -> str:
        """Wait for a memory load a killed verb left; "completed", "failed", or the
        status it had ended in."""
        ...


@dataclass(frozen=True, slots=True)
class ScreenCapture:
    """What the guest's display showed (libvirt's domainScreenshot, and the text below it).

    ``text`` is the VGA text buffer as the card holds it (80x25 cells of character and
    attribute bytes; whatever it holds in a graphics mode), ``png`` a screenshot.
    """

    text: bytes
    png: bytes


def check_backend(rec: DomainRecord, backend: str) -> None:
    """Raise :class:`WrongBackend` unless ``rec`` is a domain of ``backend``."""
    if rec.backend != backend:
        raise WrongBackend(rec.name, rec.backend, backend)


class Backend(Protocol):
    """A hypervisor as the verbs see it (so far: lifecycle, memory, vCPUs, the agent).

    ``probe`` and ``exit_reason`` are cheap and never block on the domain's
    control channel; the others may (``timeout`` bounds them).  Errors are
    :class:`~xenlab.errors.BackendError` and its subclasses, or
    :class:`Unsupported`.
    """

    name: str
    caps: Capabilities

    def handle_of(self, rec: DomainRecord) -> DomainHandle:
        """The handle of the domain ``rec`` records (records of older releases too)."""
        ...

    def prepare(self, rec: DomainRecord) -> Mapping[str, Any]:
        """Make the domain's workspace before anything runs; the record fields that say
        where to look for it (recorded before :meth:`start`, so a start killed half-way
        is found and undone)."""
        ...

    def start_command(self, domid: int, spec: StartSpec) -> tuple[str, ...]:
        """What :meth:`start` would run for a new domain ``domid`` (xl's ``create -n``):
        the command line, with the paths it would get now and placeholders for what is
        made only when it runs (a guest image).  Nothing is made."""
        ...

    async def start(self, h: DomainHandle, spec: StartSpec) -> Started:
        """Start the domain; fails with the hypervisor's own words (nothing left running)."""
        ...

    def probe(self, h: DomainHandle) -> Presence:
        """Whether the domain is there; a process that is not this domain's is GONE."""
        ...

    async def state(self, h: DomainHandle, timeout: float = 10.0) -> str:
        """Its run state as the records spell it: running, paused, incoming, ..."""
        ...

    async def pause(self, h: DomainHandle) -> None:
        """Stop its vCPUs."""
        ...

    async def resume(self, h: DomainHandle) -> None:
        """Run its vCPUs again."""
        ...

    def destroy(self, h: DomainHandle) -> None:
        """End it now, if it is there (only what :meth:`probe` calls ALIVE is touched)."""
        ...

    async def shutdown(self, h: DomainHandle) -> None:
        """Ask the guest to power off (the power button); it may ignore or miss it."""
        ...

    def wait_gone(self, h: DomainHandle, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the domain to end; True when it has."""
        ...

    async def reboot(self, h: DomainHandle) -> None:
        """Ask the guest to reboot itself (its agent); BackendError when it cannot."""
        ...

    async def reset(self, h: DomainHandle) -> None:
        """Reset the machine (no guest cooperation)."""
        ...

    async def agent_ping(self, h: DomainHandle, timeout: float) -> None:
        """Return once the guest agent answers; BackendError after ``timeout`` seconds."""
        ...

    async def agent_exec(self, h: DomainHandle, argv: Sequence[str], timeout: float
                         ) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest: (exit code, stdout, stderr)."""
        ...

    async def set_memory(self, h: DomainHandle, mib: int, timeout: float) -> MemoryReport:
        """Balloon the guest to ``mib`` MiB; wait up to ``timeout`` s for it to get there."""
        ...

    async def set_max_memory(self, h: DomainHandle, mib: int) -> None:
        """Allow the guest up to ``mib`` MiB (UsageError for what this backend cannot give)."""
        ...

    async def set_vcpus(self, h: DomainHandle, n: int, config: DomainConfig, timeout: float
                        ) -> VcpuReport:
        """Make ``n`` vCPUs online (UsageError beyond maxvcpus); the config's ``cpus=``
        applies to vCPUs that appear."""
        ...

    async def vcpus(self, h: DomainHandle, online: int | None) -> tuple[VcpuState, ...]:
        """Every vCPU (``online``: how many a vcpu-set left online, None: all)."""
        ...

    async def pin_vcpus(self, h: DomainHandle, vcpu: int | None, cpus: frozenset[int]
                        ) -> dict[int, frozenset[int]]:
        """Hard-pin vCPU ``vcpu`` (None: all); NotFoundError for a vCPU it lacks."""
        ...

    async def info(self, h: DomainHandle) -> Mapping[str, Any]:
        """What the hypervisor says about the running domain, JSON-ready (``vm info``'s
        ``live``); its keys are the backend's own."""
        ...

    async def rename(self, h: DomainHandle, new: str) -> Mapping[str, Any]:
        """Rename the running domain to ``new`` as far as the hypervisor can; the record
        facts (``extra`` keys) to set, or to drop where the value is None."""
        ...

    # -- devices (xl block-*/cd-*, libvirt's domainAttachDevice, DetachDevice, UpdateDevice)

    def check_disk(self, disk: DiskSpec) -> None:
        """XenlabError (``disk VDEV: ...``) when this backend cannot run ``disk``."""
        ...

    def disk_slot(self, vdev: str) -> int | None:
        """The fixed bus slot of disk ``vdev``; None when it has none (then it cannot be
        hot-plugged: a restart, restore or migration must find it where it was)."""
        ...

    def plan_nic(self, config: DomainConfig, spec: VifSpec, devid: int) -> NicPlan:
        """vif ``devid`` of ``config`` as this backend runs it; XenlabError (``vif N:
        ...``) when it cannot."""
        ...

    def disk_parts(self, disk: DiskSpec) -> tuple[str, ...]:
        """What attaching ``disk`` makes in the backend (recorded in the verb's job first,
        so a killed attach is undone: QEMU's block node names)."""
        ...

    async def attach_disk(self, h: DomainHandle, disk: DiskSpec, leftovers: Sequence[str]
                          ) -> None:
        """Plug ``disk`` (its target exists, checked) into the running guest; ``leftovers``
        are parts an earlier detach of its vdev left, released first.  On failure nothing
        of the attach is kept (:class:`~xenlab.errors.Refused` with the hypervisor's words)."""
        ...

    async def detach_disk(self, h: DomainHandle, vdev: str, timeout: float) -> tuple[str, ...]:
        """Have the guest let disk ``vdev`` go (a device already gone is fine); the parts
        left for :meth:`release_parts`.  :raise DeviceNotReleased: after ``timeout`` s."""
        ...

    async def release_parts(self, h: DomainHandle, parts: Sequence[str]) -> dict[str, str]:
        """Free the parts of removed disks; those the backend still keeps, with why."""
        ...

    async def has_disk(self, h: DomainHandle, vdev: str) -> bool:
        """True while the guest has disk device ``vdev`` (the truth a recovery reads)."""
        ...

    async def discard_disk(self, h: DomainHandle, parts: Sequence[str]) -> None:
        """Undo what a killed attach made of ``parts`` (the guest has no device)."""
        ...

    async def change_medium(self, h: DomainHandle, vdev: str, path: str | None,
                            fmt: DiskFormat) -> None:
        """Put ``path`` (format ``fmt``) in cdrom drive ``vdev``; None ejects (forced)."""
        ...

    async def attach_nic(self, h: DomainHandle, config: DomainConfig, spec: VifSpec,
                         leftovers: Sequence[Mapping[str, Any]], note: Note) -> NicAttached:
        """Plug the NIC ``spec`` describes (its devid and MAC set) into the running guest
        of ``config``; ``leftovers`` are host ends of gone NICs to take down first.  A host
        end it brings up is given to ``note`` at once; on failure nothing is kept."""
        ...

    async def detach_nic(self, h: DomainHandle, devid: int, timeout: float) -> None:
        """Have the guest let NIC ``devid`` go (gone already is fine).
        :raise DeviceNotReleased: after ``timeout`` s."""
        ...

    async def release_nic(self, h: DomainHandle, devid: int,
                          host_ends: Sequence[Mapping[str, Any]]) -> NicReleased:
        """After a detach: free what NIC ``devid`` used and take ``host_ends`` down."""
        ...

    async def has_nic(self, h: DomainHandle, devid: int) -> bool:
        """True while the guest has NIC ``devid`` (the truth a recovery reads)."""
        ...

    async def discard_nic(self, h: DomainHandle, devid: int,
                          host_end: Mapping[str, Any] | None) -> None:
        """Undo what a killed attach of NIC ``devid`` made (the guest has no such NIC)."""
        ...

    # -- block jobs (libvirt's domainBlockCopy, domainBlockJobAbort)

    async def block_copy(self, h: DomainHandle, req: BlockCopyRequest, note: Note
                         ) -> tuple[str, int]:
        """Copy a running disk as ``req`` says (the target is made here, new and private);
        (the backend's name for the disk after a pivot, "" without; bytes copied).
        ``note`` gets ``{"phase": "completing"}`` once the switch may happen at any moment.
        :raise BlockCopyFailed: saying how far it got (undone where it could be)."""
        ...

    async def end_block_copy(self, h: DomainHandle, vdev: str, source: str, target: str, *,
                             complete: bool) -> str | None:
        """End a copy a killed verb left (let a pivot already asked for finish when
        ``complete``, else cancel); the disk's new name when it runs on ``target`` now."""
        ...

    # -- migration (libvirt's Begin3, Prepare3, Perform3, Finish3, Confirm3)

    async def migrate_begin(self, h: DomainHandle, disks: Sequence[str]) -> MigrationCookie:
        """The source's facts before it sends (``disks``: those a storage migration copies)."""
        ...

    async def migrate_perform(self, h: DomainHandle, req: MigrateRequest) -> MigrateSent:
        """Send the state (and disks) as ``req`` says; the source is left stopped.  On
        failure everything is undone and the guest runs as before."""
        ...

    async def migrate_take_back(self, h: DomainHandle, sent: MigrateSent) -> None:
        """The destination did not take the guest: the source goes on as it was (BackendError
        when it cannot: another holds its disks)."""
        ...

    async def migrate_abort(self, h: DomainHandle, *, resume: bool) -> str:
        """Undo what a killed sender left (the stream, disk copies), run the guest again if
        ``resume``; its run state after."""
        ...

    async def migrate_prepare(self, h: DomainHandle, host: str, port: int,
                              disks: Sequence[str], nbd_port: int | None,
                              vcpus_plugged: int | None) -> int:
        """Make a domain started with ``incoming`` listen on ``host:port`` (0: any), with
        ``disks`` exported on ``nbd_port`` for a storage migration; the port bound."""
        ...

    async def migrate_wait_incoming(self, h: DomainHandle, what: str, timeout: float) -> None:
        """Wait until the incoming stream is complete and the guest is held, paused."""
        ...

    async def migrate_finish(self, h: DomainHandle, exports: Sequence[str] | None,
                             paused: bool) -> None:
        """End the disk exports (None: there were none) and run the guest unless ``paused``."""
        ...

    # -- what a killed verb left (the truths a recovery reads)

    async def disk_files(self, h: DomainHandle) -> dict[str, tuple[str, str]]:
        """``{vdev: (file, ref)}``: the image each guest disk runs on now, and the backend's
        name for it (QEMU: the block node)."""
        ...

    async def settle_jobs(self, h: DomainHandle, ids: Sequence[str], prefixes: Sequence[str],
                          complete: Sequence[str], timeout: float
                          ) -> list[tuple[str, str, str | None]]:
        """Let the backend's jobs a killed verb started end and forget them (those whose id
        starts with ``complete`` completed when ready); (id, status found, error)."""
        ...

    async def resume_stopped(self, h: DomainHandle) -> bool:
        """Run the guest again if a killed verb left it stopped; True when it did."""
        ...

    def session(self, h: DomainHandle) -> AbstractAsyncContextManager[None]:
        """A block whose calls on the domain share one control session (QEMU: one QMP
        connection), opened at the first call and closed when the block ends; the verbs
        hold one for as long as they hold the domain's lock."""
        ...

    # -- snapshots (libvirt's domainSnapshot*; xl has none: the images do it)

    def live_snapshots(self, h: DomainHandle) -> AbstractAsyncContextManager[LiveSnapshots]:
        """A session on the running domain's disks and memory (:class:`LiveSnapshots`)."""
        ...

    # -- state (xl save/restore; libvirt's domainSave, domainRestore)

    async def save(self, h: DomainHandle, req: SaveRequest) -> SaveFacts:
        """Write the domain's state as :class:`SaveRequest` says; what it knew at the start.
        On failure the guest runs (or stays paused) as before and its snapshots are gone
        again (BackendError names any it could not delete)."""
        ...

    async def abort_save(self, h: DomainHandle, *, resume: bool,
                         snapshots: Sequence[DiskSnapshot]) -> tuple[str, tuple[str, ...]]:
        """Undo a save a killed verb left: stop its stream, run the guest again if
        ``resume``, delete ``snapshots`` where it can; (the run state, files still holding
        the snapshot)."""
        ...

    async def load(self, h: DomainHandle, fd: int, offset: int, checked: tuple[int, ...],
                   source: str, timeout: float, *, run: bool,
                   vcpus_plugged: int | None = None) -> None:
        """Load a domain started with ``incoming`` from the checked stream at ``fd``'s
        ``offset`` (``checked``: the file's identity when it was checked; a file changed
        since is refused); ``vcpus_plugged`` vCPUs are made present first; run it if
        ``run``."""
        ...

    async def quit(self, h: DomainHandle) -> None:
        """Ask the hypervisor to end the domain now (QEMU: ``quit``); the verbs then
        :meth:`wait_gone` and :meth:`destroy` what lingers."""
        ...

    def said(self, h: DomainHandle) -> str:
        """The hypervisor's last words about the domain (QEMU's log tail), or ""."""
        ...

    def firmware_log(self, h: DomainHandle) -> Path:
        """The file the guest firmware's debug port writes to (SeaBIOS's log)."""
        ...

    async def capture_screen(self, h: DomainHandle, *, resume: bool) -> ScreenCapture:
        """Stop the guest and take its screen (:class:`ScreenCapture`); run it again if
        ``resume``.  Bounded: a screenshot larger than a display's shows is refused."""
        ...

    def open_console(self, h: DomainHandle, timeout: float) -> socket.socket:
        """A connected stream to the domain's serial console (xl console); BackendError
        when none answers within ``timeout`` seconds."""
        ...

    def exit_reason(self, h: DomainHandle) -> ExitReason | None:
        """Why it went, for a domain that is gone; None when unknown or still there."""
        ...

    def release(self, h: DomainHandle) -> None:
        """Free what the backend kept for a domain that is gone (its run directory)."""
        ...
