"""The toolstack's verbs on domains: :class:`Toolstack` (create, list, destroy, shutdown, ...).

A domain is a QEMU process started from an xl config: the config is parsed
with ``xenlab.config`` into a DomainConfig, turned into a command line by
``vm.backends.qemu.qemu``, started daemonized (QEMU forks once its devices are up, so a
command line QEMU refuses is an error of ``create``, with QEMU's message), and
recorded in the state store.  Every verb that changes a domain holds the
domain's lock, so two commands on one domain never interleave; ``create``
holds the store's global lock while it picks the id and name.

Like xl, ``create`` takes ``key=value`` overrides appended to the config.

The rules that keep the store true (the domain's lock, a record read again
under it, ``Store.patch``, jobs that the next command finishes or undoes,
QEMU signalled only once its command line proved it ours, names and paths
checked at create) are in docs/architecture.md ("The toolstack").
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import shutil
import socket
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xenlab import faults, hotplug
from xenlab.config.model import DomainConfig
from xenlab.errors import BackendError, ConflictError, StateError, UsageError, XenlabError
from xenlab.files import read_text_bounded
from xenlab.vm.backend import (
    Backend,
    DomainHandle,
    ExitReason,
    NicPlan,
    Presence,
    StartSpec,
    Unsupported,
    check_backend,
)
from xenlab.vm.backends.qemu import QemuBackend
from xenlab.vm.backends.qemu.qemu import (
    Accel,
    RuntimePaths,
)
from xenlab.vm.backends.qemu.qmp import Qmp
from xenlab.vm.domconfig import (
    absolute_paths,
    check_domain_name,
    check_images,
    config_from_text,
    create_image,
    disk_line,
    host_vif,
    on_disk_specs,
    on_disks,
    on_disks_now,
    on_vif_specs,
    plan_nics,
    vif_line,
)
from xenlab.vm.jobs import RECOVERY, Job, job_of, new_job, orphan
from xenlab.vm.runtime import (
    DEFINED,
    DISK_SPECS,
    JOB,
    MEMORY_MIB,
    ONE_RUN,
    VIF_SPECS,
    VIFS,
    Runtime,
)
from xenlab.vm.store import DomainRecord, Store

# A domain whose QEMU has exited but which is kept because it has snapshots
# (like a defined, inactive libvirt domain); `create` starts it again.
SHUTOFF = "shutoff"

log = logging.getLogger(__name__)

__all__ = ["DISK_SPECS", "SHUTOFF", "VIFS", "VIF_SPECS", "DomainStatus", "Toolstack",
           "absolute_paths", "check_domain_name", "config_from_text", "create_image",
           "disk_line", "on_disks", "vif_line"]


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """A domain as ``list`` shows it: the record plus what QEMU says now."""

    record: DomainRecord
    state: str  # "running", "paused", "shutdown", "stale (QEMU gone)", ...
    memory_mib: int | None
    vcpus: int | None
    seconds: float


class Toolstack:
    """The verbs of ``xenlab vm``, over one state store."""

    def __init__(self, state_dir: Path | None = None, *, accel: Accel | None = None,
                 backend: Backend | None = None) -> None:
        self.store = Store(state_dir)
        self.state_dir = self.store.state_dir
        # The verbs not yet moved behind the Backend protocol (docs/backend.md) reach
        # QEMU through these helpers; the lifecycle goes through self.backend.
        self._qemu = QemuBackend(self.state_dir, accel=accel)
        self.backend: Backend = backend if backend is not None else self._qemu

    def handle(self, rec: DomainRecord) -> DomainHandle:
        """The backend's handle of domain ``rec``.

        :raise WrongBackend: ``rec`` is a domain of another backend.
        """
        check_backend(rec, self.backend.name)
        return self.backend.handle_of(rec)

    def require_qemu(self, what: str) -> None:
        """Refuse QEMU's own inspection hooks (:meth:`paths`, :meth:`qmp_execute`: tests,
        benchmarks) on a toolstack of another backend; every verb goes through
        :attr:`backend`."""
        if self.backend.name != self._qemu.name:
            raise Unsupported(self.backend.name, "qemu",
                              f"{what}: runs on the qemu backend only so far; this toolstack "
                              f"runs the {self.backend.name} backend")

    def alive(self, rec: DomainRecord) -> bool:
        """True when the backend has domain ``rec`` (its process or domain is there)."""
        return self.backend.probe(self.handle(rec)) is Presence.ALIVE

    @property
    def accel(self) -> Accel:
        """KVM when a real probe boot proves it works here, else TCG; probed once."""
        return self._qemu.accel

    # -- create ------------------------------------------------------------------

    def load_config(self, cfg: Path, overrides: Sequence[str] = ()) -> tuple[DomainConfig, str]:
        """Parse ``cfg`` with xl-style ``key=value`` overrides appended; (config, text).

        The file is read with a bound (``files.CONFIG_LIMIT``), the name
        checked (:func:`check_domain_name`) and relative paths made absolute
        against the file's directory (:func:`absolute_paths`).
        """
        text = read_text_bounded(cfg, what="config")
        dc, text = config_from_text(text, str(cfg), overrides)
        check_domain_name(dc.name)
        return absolute_paths(dc, text, Path(cfg).absolute().parent, str(cfg))

    async def check_disks(self, dc: DomainConfig, create_size: str | None) -> list[Path]:
        """Every disk file must exist, or be created when asked; returns the created ones."""
        created: list[Path] = []
        for disk in dc.disks:
            target = disk.pdev_path
            if not target or disk.is_cdrom:
                continue
            path = Path(target)
            if path.exists():
                continue
            if create_size is None or target.startswith("/dev/"):
                raise UsageError(
                    f"disk {target!r} ({disk.vdev}) does not exist; create it with qemu-img "
                    "or pass --create-disks SIZE"
                )
            fmt_name = disk.format.value
            if fmt_name not in ("qcow2", "raw"):
                raise UsageError(f"cannot create disk {target!r}: format {fmt_name!r}")
            try:
                await create_image(str(path), fmt_name, create_size)
            except XenlabError:
                for p in created:
                    p.unlink(missing_ok=True)
                raise
            created.append(path)
        return created

    async def create(
        self,
        cfg: Path,
        overrides: Sequence[str] = (),
        *,
        paused: bool = False,
        create_disks: str | None = None,
        image: object | None = None,
    ) -> DomainRecord:
        """Start the domain ``cfg`` describes; returns its record.

        Nothing is left behind on failure: no record, no run directory, no
        disks this call created.
        """
        dc, text = self.load_config(cfg, overrides)
        return await self.launch(dc, text, config_path=str(cfg.resolve()), paused=paused,
                           image=image, create_disks=create_disks)

    async def reusable(self, name: str) -> DomainRecord | None:
        """The shut-off domain called ``name`` to start again, or None when the name is free.

        XenlabError when a live domain has the name, or a stale one (QEMU
        gone) still holds it.  The caller holds the store's global lock.
        """
        old: DomainRecord | None = None
        for rec in self.store.list():
            if rec.name != name:
                continue
            if rec.state == SHUTOFF and not self.alive(rec):
                dead = job_of(rec)
                if dead is not None and not dead.owner_alive():
                    # What a killed command left (a shut-off mirror's copy) is
                    # settled first: it may change which files the domain runs on.
                    async with self.store.alock(rec.domid):
                        kept = await self.converge(self.store.get(rec.domid))
                    if kept is None:
                        continue
                    rec = kept
                old = rec  # a shut-off domain kept for its snapshots: start it again
                continue
            job = job_of(rec)
            if job is not None and job.owner_alive():
                raise ConflictError("domain", name,
                                    f"domain {name!r} (id {rec.domid}) is being worked on by "
                                    f"another command ({job.verb}, pid {job.pid}); try again "
                                    "when it is done")
            if self.alive(rec):
                raise ConflictError("domain", name,
                                    f"domain {name!r} already exists (id {rec.domid})")
            raise StateError(
                f"domain {name!r} has stale state (id {rec.domid}, QEMU gone): "
                f"`xenlab vm destroy {name}` clears it"
            )
        return old

    async def launch(
        self,
        dc: DomainConfig,
        text: str,
        *,
        config_path: str,
        uuid: str | None = None,
        paused: bool = False,
        incoming: str | None = None,
        image: object | None = None,
        create_disks: str | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> DomainRecord:
        """Start a QEMU for ``dc`` and record it: what create, restore, receive and revert share.

        Refuses a taken name; a shut-off domain of that name is started again
        under its id.  Without ``incoming`` (``create``) the disks are checked
        (made when ``create_disks`` gives a size), the memory balloon set, the
        vCPUs pinned, and the record says what QEMU runs as.  With ``incoming``
        (``-incoming`` value, e.g. ``"defer"``) QEMU waits paused for a
        migration stream and the record's state is "incoming".  ``prepare``
        runs under the domain's lock once the name is secured and before QEMU
        starts (restore reverts the disks there).  Nothing is left behind on
        failure: no record, no run directory, no disks this call made.

        Crash safety: the record (state "creating" or "incoming", a job of
        this process) exists before anything else, and names the run
        directory before QEMU starts; a killed ``launch`` is undone by the
        next command (:meth:`converge`).  The domain's lock is taken before
        the global lock is let go, so no other command sees the record half
        made.

        Why one function: the order of the record writes and the start (the job, the run
        directory recorded, the backend's start, the record of what runs) is the crash-safety
        argument of every verb that starts a domain, and it reads in one place.
        """
        check_domain_name(dc.name)
        fresh = incoming is None
        new_uuid = uuid or dc.uuid or str(uuidlib.uuid4())
        created: list[Path] = []
        async with contextlib.AsyncExitStack() as held:
            async with self.store.aglobal_lock():
                old = await self.reusable(dc.name)
                if old is not None and fresh:
                    # create starts a kept domain on the disks it last ran on, with
                    # the NICs it last had; restore, receive and revert bring the
                    # config to run as it is.
                    dc, text = on_vif_specs(dc, text, old)
                    dc, text = on_disk_specs(dc, text, old)
                    dc = on_disks_now(dc, old)
                created = await self.check_disks(dc, create_disks) if fresh else []
                try:
                    # Every file QEMU will open through the disks (backing
                    # files, data files) is checked before anything starts.
                    check_images(dc)
                except BaseException:
                    for p in created:
                        p.unlink(missing_ok=True)
                    raise
                state = "creating" if fresh else "incoming"
                # A verb that is restarting its own domain (a revert) keeps its job.
                running = job_of(old) if old is not None else None
                job = running if running is not None and running.mine() else new_job(
                    "create" if fresh else "incoming")
                try:
                    if old is not None:
                        check_backend(old, self.backend.name)
                        await held.enter_async_context(self.store.alock(old.domid))
                        drop = list(ONE_RUN) if fresh else []
                        rec = self.store.patch(
                            old.domid, expect_uuid=old.uuid, config_path=config_path,
                            config_text=text, pid=None, state=state, rundir="",
                            created=time.time(), accel="",
                            **({} if fresh else {"uuid": new_uuid}),
                            extra_set={JOB: job.to_json()}, extra_drop=drop)
                    else:
                        rec = self.store.add_domain(DomainRecord(
                            domid=0, name=dc.name, uuid=new_uuid, config_path=config_path,
                            config_text=text, rundir="", pid=None, state=state,
                            created=time.time(), accel="",
                            extra={JOB: job.to_json()}, backend=self.backend.name,
                        ))
                        await held.enter_async_context(self.store.alock(rec.domid))
                except BaseException:
                    for p in created:
                        p.unlink(missing_ok=True)
                    raise
            step = "create" if fresh else "incoming"
            try:
                faults.point(f"{step}.recorded")
                # Intent first: the record says where to find the domain (QEMU: the run
                # directory its pidfile will be in) before anything starts.
                rec = self.store.patch(rec.domid, **self.backend.prepare(rec))
                faults.point(f"{step}.rundir")
                dc = replace(dc, uuid=rec.uuid)
                rec, taps = await self._vifs_online(rec, dc, fresh=fresh)
                faults.point(f"{step}.vifs")
                if prepare is not None:
                    # A Ctrl-C during what ran before (it held the loop) ends the verb
                    # here, before the disks are changed for good.
                    await asyncio.sleep(0)
                    await prepare()
                # An incoming domain must not run before the stream has arrived.
                started = await (self.backend.start(self.handle(rec), StartSpec(
                    dc, paused=paused, incoming=not fresh, taps=taps, image=image)))
                faults.point(f"{step}.spawned")
                state = started.state
                # A restore or receive ends its own job once the stream is in.
                done = [JOB] if fresh and job.verb == "create" else []
                rec = self.store.patch(rec.domid, **started.fields, state=state,
                                       extra_drop=done)
                return rec
            except BaseException:
                await self._undo_start(rec.domid)
                for p in created:
                    p.unlink(missing_ok=True)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _undo_start(self, domid: int) -> None:
        """Stop whatever QEMU a failed start left and forget it (kept domains stay shut off)."""
        try:
            rec = self.store.get(domid)
        except XenlabError:
            return
        self.kill_domain(rec)
        await self.gone(rec)

    def host_vif(self, rec: DomainRecord, nic: NicPlan, *, name: str | None = None
                 ) -> hotplug.Vif:
        """The hotplug description of ``nic``'s host end in domain ``rec`` (``vifname=``,
        else ``vif<domid>.<devid>`` as Xen's backend)."""
        return host_vif(rec.domid, name or rec.name, nic.devid, nic.mac, nic.spec)

    async def _vifs_online(self, rec: DomainRecord, dc: DomainConfig, *, fresh: bool
                     ) -> tuple[DomainRecord, dict[int, str]]:
        """Bring ``dc``'s tapped vifs online and record them; (record, tap name by devid).

        A taken name is varied (``vif3.0-1``) unless the config chose it with
        ``vifname=`` for a fresh start: an incoming domain (local migration)
        runs beside its source, which holds the name.  All or nothing: a
        failure brings the ones already up offline again.
        """
        planned = plan_nics(self.backend, dc)
        wanted = [self.host_vif(rec, n, name=dc.name) for n in planned if n.tap]
        if not wanted:
            return rec, {}

        async def go() -> list[hotplug.Vif]:
            done: list[hotplug.Vif] = []
            try:
                for vif in wanted:
                    chosen = any(n.devid == vif.devid and n.spec.ifname for n in planned)
                    done.append(await hotplug.online(vif, rename_if_taken=not (chosen and fresh)))
            except BaseException:
                for vif in reversed(done):
                    with contextlib.suppress(hotplug.HotplugError):
                        await hotplug.offline(vif)
                raise
            return done

        up = await go()
        rec = self.store.patch(rec.domid, extra_set={
            VIFS: [hotplug.vif_to_json(v) for v in up]})
        return rec, {v.devid: v.vifname for v in up}

    async def _vifs_offline(self, rec: DomainRecord) -> dict[str, object]:
        """Bring every recorded vif of ``rec`` offline; its ``extra`` without them.

        The store's copy of the record is read too: callers may hold one from
        before the vifs came online.  Failures are logged, never raised: a
        domain that is going away must go.
        """
        try:
            stored = self.store.get(rec.domid).extra.get(VIFS) or []
        except XenlabError:
            stored = []
        seen: set[str] = set()
        vifs: list[hotplug.Vif] = []
        for obj in [*stored, *(rec.extra.get(VIFS) or [])]:
            try:
                vif = hotplug.vif_from_json(obj)
            except hotplug.HotplugError as err:
                log.warning("domain %s: %s", rec.name, err)
                continue
            if vif.vifname not in seen:
                seen.add(vif.vifname)
                vifs.append(vif)

        async def go() -> None:
            for vif in vifs:
                try:
                    await hotplug.offline(vif)
                except hotplug.HotplugError as err:
                    log.warning("%s", err)

        if vifs:
            await go()
        return {k: v for k, v in rec.extra.items() if k != VIFS}

    # -- looking ---------------------------------------------------------------

    def get(self, name_or_id: str) -> DomainRecord:
        """The record of a domain by id or name (ids first, as xl); XenlabError if none."""
        return self.store.get(name_or_id)

    @contextlib.asynccontextmanager
    async def locked(self, name_or_id: str | int, *, timeout: float | None = None,
                     strict: bool = True) -> AsyncIterator[DomainRecord]:
        """Hold the domain's lock for a ``with`` block; yields its record as of now.

        The record is read again under the lock, and a job that a killed
        command left is finished or undone first (:meth:`converge`); if that
        fails, the error is raised, or with ``strict=False`` (destroy, which
        must work whatever state the domain is in) logged.

        :raise XenlabError: no such domain (also when it went away while this
            command waited for the lock).
        :raise StateError: the domain was replaced meanwhile (another uuid or
            name under its id), or its lock stayed busy.
        :raise WrongBackend: the domain is another backend's (even when not strict).
        """
        rec = self.get(str(name_or_id))
        async with self.store.alock(rec.domid, timeout):
            try:
                now = self.store.get(rec.domid)
            except XenlabError:
                raise StateError(f"domain {rec.name!r} (id {rec.domid}) went away while "
                                 "this command waited for it") from None
            if now.uuid != rec.uuid or (now.name != rec.name and str(name_or_id) == rec.name):
                raise StateError(
                    f"domain {rec.name!r} (id {rec.domid}) was replaced by {now.name!r} "
                    "while this command waited for it; nothing was done")
            check_backend(now, self.backend.name)  # even for destroy: not ours to touch
            try:
                kept = await self.converge(now)
            except XenlabError as err:
                if strict:
                    raise
                log.warning("domain %s: could not finish what a killed command left: %s",
                            now.name, err)
                kept = self.store.get(now.domid)
            if kept is None:
                raise StateError(f"domain {rec.name!r} is gone: an interrupted "
                                 f"{(job_of(now) or Job('?', 0, 0)).verb} was undone")
            # One control session for everything the verb asks the backend meanwhile.
            async with self.backend.session(self.handle(kept)):
                yield kept

    async def converge(self, rec: DomainRecord) -> DomainRecord | None:
        """Finish or undo what a killed command left of ``rec``; the record then (None: gone).

        Called with the domain's lock held.  A job whose owner still runs, or
        one of this process, is left alone.  What was done is logged as a
        warning (the CLI prints it).

        :raise WrongBackend: ``rec`` is a domain of another backend.
        """
        check_backend(rec, self.backend.name)  # another backend's job is not ours to undo
        job = job_of(rec)
        if job is None or job.owner_alive():
            return rec
        if job.verb == "shutdown" and self.alive(rec):
            # The power button was pressed; the guest goes down on its own.
            log.warning("domain %s: a shutdown was killed while the guest shut down; "
                        "it was asked to power off", rec.name)
            return self.store.patch(rec.domid, extra_drop=[JOB])
        if job.verb in ("destroy", "shutdown"):
            # The QEMU was being stopped on purpose (or has stopped): finish that.
            self.kill_domain(rec)
            kept = await self.gone(rec)
            log.warning("domain %s: a %s killed half-way is finished", rec.name, job.verb)
            return kept
        if rec.state == "incoming" and job.verb == "incoming" and self.alive(rec) and \
                await self._resumed(rec):
            # The guest ran there already (a restore or receive resumed it and
            # was killed before it said so): it is the guest's only running
            # copy and may have written to its disks, so it is kept.
            log.warning("domain %s: a restore/receive killed just after the guest resumed "
                        "is finished: it runs", rec.name)
            return self.store.patch(rec.domid, state="running", extra_drop=[JOB])
        if rec.state in ("creating", "incoming") and job.verb in ("create", "incoming"):
            # QEMU may have started (its pid only in the pidfile): stop it,
            # bring the vifs down, forget the half-made domain.
            self.kill_domain(rec)
            kept = await self.gone(rec)
            log.warning("domain %s: a %s killed before it finished was undone%s",
                        rec.name, "create" if job.verb == "create" else "restore/receive",
                        "; it is shut off" if kept is not None else "")
            return kept
        module = RECOVERY.get(job.verb)
        if module is None:
            # A job of a verb that needs nothing finished (or from a newer
            # xenlab): its owner is gone, so is the job.
            return self.store.patch(rec.domid, extra_drop=[JOB])
        recover = vars(importlib.import_module(module)).get("recover_job")
        if recover is None:
            return self.store.patch(rec.domid, extra_drop=[JOB])
        kept = await recover(self, rec, job)
        assert kept is None or isinstance(kept, DomainRecord)
        if kept is not None and job_of(kept) is not None:
            kept = self.store.patch(rec.domid, extra_drop=[JOB])
        return kept

    @contextlib.contextmanager
    def job(self, rec: DomainRecord, verb: str, **detail: Any) -> Iterator[DomainRecord]:
        """Record a job of this process on ``rec`` for a ``with`` block (see ``vm.jobs``).

        The job goes when the block ends, whether it succeeded or raised; a
        killed process leaves it for :meth:`converge`.
        """
        job = new_job(verb, **detail)
        rec = self.store.patch(rec.domid, extra_set={JOB: job.to_json()})
        try:
            yield rec
        finally:
            with contextlib.suppress(XenlabError):
                now = self.store.get(rec.domid)
                mine = job_of(now)
                if mine is not None and mine.pid == job.pid and mine.since == job.since:
                    self.store.patch(rec.domid, extra_drop=[JOB])

    def hand_over_job(self, domid: int) -> None:
        """Give this process's job on domain ``domid`` to the next command, as if this one
        were killed (its owner becomes nobody): it is finished or undone by the next
        command's :meth:`converge`, and :meth:`job` no longer drops it."""
        job = job_of(self.store.get(domid))
        if job is not None and job.mine():
            self.store.patch(domid, extra_set={JOB: orphan(job).to_json()})

    def update_job(self, domid: int, **detail: Any) -> None:
        """Add ``detail`` to this process's job on domain ``domid`` (what a recovery reads).

        A verb marks its phases this way before each step a recovery must
        tell apart (a migration before and after the destination resumed).
        """
        job = job_of(self.store.get(domid))
        if job is None or not job.mine():
            return
        self.store.patch(domid, extra_set={
            JOB: replace(job, detail={**job.detail, **detail}).to_json()})

    async def _resumed(self, rec: DomainRecord) -> bool:
        """True when QEMU says the guest of ``rec`` runs (QMP asked briefly)."""
        try:
            return await self.backend.state(self.handle(rec), timeout=2.0) == "running"
        except XenlabError:
            return False

    async def status(self, rec: DomainRecord) -> DomainStatus:
        """What the domain is now, asking QEMU when it is alive."""
        dc, _ = self.config_of(rec)
        # mem-set and vcpu-set keep the current values in the record.
        mem = int(str(rec.extra.get(MEMORY_MIB, dc.memory_mib)))
        vcpus = int(str(rec.extra.get("vcpus", dc.vcpus)))
        if rec.state == SHUTOFF:
            return DomainStatus(rec, SHUTOFF, dc.memory_mib, dc.vcpus, 0.0)
        if not self.alive(rec):
            return DomainStatus(rec, "stale (QEMU gone)", mem, vcpus,
                                time.time() - rec.created)
        try:
            # QEMU serves one QMP client at a time: a domain another command
            # is working on answers once that command is done, so do not wait.
            state = await self.backend.state(self.handle(rec), timeout=1.0)
        except (BackendError, StateError) as err:
            state = "busy" if "no session within" in str(err) else "unresponsive"
        return DomainStatus(rec, state, mem, vcpus, time.time() - rec.created)

    async def list(self) -> list[DomainStatus]:
        """Every domain in the store, live, shut off or stale, by id.

        A domain whose guest powered itself off cleanly is gone, as with xl:
        its record is cleared here (kept as shut off if it has snapshots).
        A domain that a killed command left half-way is brought to a true
        state first (:meth:`converge`).  A domain another command holds
        locked is shown as the store has it.
        """
        out = []
        for rec in sorted(self.store.list(), key=lambda r: r.domid):
            if rec.backend != self.backend.name:
                # Another backend's domain: shown as recorded, never probed or cleared.
                dc, _ = self.config_of(rec)
                out.append(DomainStatus(rec, f"{rec.state} ({rec.backend})", dc.memory_mib,
                                        dc.vcpus, 0.0))
                continue
            job = job_of(rec)
            dead_job = job is not None and not job.owner_alive()
            off = rec.state != SHUTOFF and self._powered_off(rec)
            if dead_job or off:
                try:
                    now = await self._converged(rec)
                except StateError:
                    now = rec  # busy: another command is on it right now
                if now is None:
                    continue
                rec = now
            status = await self.status(rec)
            if {rec.state, status.state} == {"running", "paused"}:
                # QEMU is the truth (a pause or unpause killed after its QMP
                # command left the record behind): the record follows.
                with contextlib.suppress(StateError):
                    async with self.store.alock(rec.domid, 0.2):
                        rec = self.store.patch(rec.domid, expect_uuid=rec.uuid,
                                               state=status.state)
                        status = replace(status, record=rec)
            out.append(status)
        return out

    async def _converged(self, rec: DomainRecord) -> DomainRecord | None:
        """``rec`` brought to a true state under its lock (1 s at most); None when gone.

        A failure to converge is logged and the record shown as it is: a
        listing never hides a domain.
        """
        async with self.store.alock(rec.domid, timeout=1.0):
            try:
                now = self.store.get(rec.domid)
            except XenlabError:
                return None  # it went away meanwhile
            try:
                kept = await self.converge(now)
            except XenlabError as err:
                log.warning("domain %s: could not finish what a killed command left: %s",
                            rec.name, err)
                return self.store.get(rec.domid)
            if kept is not None and kept.state != SHUTOFF and self._powered_off(kept):
                kept = await self.gone(kept)
            return kept

    def _powered_off(self, rec: DomainRecord) -> bool:
        """True when the domain is gone because its guest powered itself off cleanly."""
        return self.backend.exit_reason(self.handle(rec)) is ExitReason.POWEROFF

    def paths(self, rec: DomainRecord) -> RuntimePaths:
        """The domain's QEMU run paths, in the run directory its record names.

        :raise StateError: the recorded run directory is not a private
            directory of this user (see ``vm.backends.qemu.rundir``): nothing in it is trusted.
        """
        self.require_qemu("this verb")
        check_backend(rec, self._qemu.name)
        return self._qemu.paths(self._qemu.handle_of(rec))

    def _paths_or_none(self, rec: DomainRecord) -> RuntimePaths | None:
        self.require_qemu("this verb")
        check_backend(rec, self._qemu.name)
        return self._qemu.paths_or_none(self._qemu.handle_of(rec))

    def config_of(self, rec: DomainRecord) -> tuple[DomainConfig, str]:
        return config_from_text(rec.config_text, rec.config_path)

    # -- changing ----------------------------------------------------------------

    async def define(self, cfg: Path, overrides: Sequence[str] = ()) -> DomainRecord:
        """Record the domain ``cfg`` describes as shut off, without starting it.

        Like ``virsh define``: a defined domain stays in the store when its
        QEMU exits, so it can be snapshotted while shut off (qemu-img) and
        started again with ``create``.
        """
        dc, text = self.load_config(cfg, overrides)
        async with self.store.aglobal_lock():
            for rec in self.store.list():
                if rec.name == dc.name:
                    raise ConflictError("domain", dc.name,
                                        f"domain {dc.name!r} already exists (id {rec.domid})")
            await self.check_disks(dc, None)
            check_images(dc)
            return self.store.add_domain(
                DomainRecord(
                    domid=0, name=dc.name, uuid=dc.uuid or str(uuidlib.uuid4()),
                    config_path=str(cfg.resolve()), config_text=text, rundir="", pid=None,
                    state=SHUTOFF, created=time.time(), accel=self.accel.value,
                    extra={DEFINED: True}, backend=self.backend.name,
                )
            )

    async def gone(self, rec: DomainRecord) -> DomainRecord | None:
        """QEMU has exited: keep the domain as shut off if it is defined, has snapshots, or
        runs on mirrored disks (only its record says where they are now).

        Returns the kept record, or None when the domain was forgotten.  The
        store's copy is read again, so fields other verbs wrote are kept.
        """
        try:
            rec = self.store.get(rec.domid)
        except XenlabError:
            return None
        self.backend.release(self.handle(rec))
        await self._vifs_offline(rec)
        job = job_of(rec)
        # A verb of this process that restarts the domain (a revert) keeps its
        # job: a kill later in that verb must still be recovered as that verb.
        drop = [VIFS] if job is not None and job.mine() else [VIFS, JOB]
        rt = Runtime.of(rec)
        if rt.defined or rt.moved or self.store.list_snapshots(rec.domid):
            return self.store.patch(rec.domid, pid=None, state=SHUTOFF, rundir="",
                                    extra_drop=drop)
        self.store.remove(rec.domid)
        return None

    async def undefine(self, name_or_id: str) -> DomainRecord:
        """Forget a shut-off domain and its snapshot records; the snapshot memory files in
        the state directory go too (disk images, overlays included, are left alone)."""
        async with self.locked(name_or_id) as rec:
            if rec.state != SHUTOFF:
                raise StateError(f"domain {rec.name!r} is not shut off; destroy it first")
            mine = (self.state_dir / "snapshots" / str(rec.domid)).absolute()
            memory = [Path(s.memory_path) for s in self.store.list_snapshots(rec.domid)
                      if s.memory_path and Path(s.memory_path).parent.absolute() == mine]
            self.store.remove(rec.domid)
            for f in memory:
                f.unlink(missing_ok=True)
            shutil.rmtree(mine, ignore_errors=True)
        return rec

    def _check_live(self, rec: DomainRecord) -> DomainRecord:
        if rec.state == SHUTOFF:
            raise StateError(
                f"domain {rec.name!r} (id {rec.domid}) is shut off; `xenlab vm create` starts it"
            )
        if not self.alive(rec):
            raise StateError(
                f"domain {rec.name!r} (id {rec.domid}) is not running: its QEMU is gone; "
                f"`xenlab vm destroy {rec.name}` clears it"
            )
        return rec

    def live_record(self, name_or_id: str) -> DomainRecord:
        return self._check_live(self.get(name_or_id))

    @contextlib.asynccontextmanager
    async def live(self, name_or_id: str, *, timeout: float | None = None
                   ) -> AsyncIterator[DomainRecord]:
        """:meth:`locked`, for a domain whose QEMU must run (StateError otherwise)."""
        async with self.locked(name_or_id, timeout=timeout) as rec:
            yield self._check_live(rec)

    async def qmp_execute(self, rec: DomainRecord, cmd: str, args: dict[str, object] | None = None
                   ) -> object:
        return await self.qmp_execute_at(self.paths(rec), cmd, args)

    async def qmp_execute_at(self, paths: RuntimePaths, cmd: str,
                         args: dict[str, object] | None = None) -> object:
        qmp = Qmp()
        await qmp.connect(paths.qmp, timeout=10)
        try:
            return await qmp.execute(cmd, args)
        finally:
            await qmp.close()

    async def pause(self, name_or_id: str) -> None:
        """Stop the domain's vCPUs (QMP stop)."""
        async with self.live(name_or_id) as rec:
            await self.backend.pause(self.handle(rec))
            self.store.patch(rec.domid, expect_uuid=rec.uuid, state="paused")

    async def unpause(self, name_or_id: str) -> None:
        """Resume the domain's vCPUs (QMP cont)."""
        async with self.live(name_or_id) as rec:
            await self.backend.resume(self.handle(rec))
            self.store.patch(rec.domid, expect_uuid=rec.uuid, state="running")

    async def destroy(self, name_or_id: str) -> DomainRecord:
        """Kill the domain's QEMU now and forget it (a stale record is cleared too).

        A domain kept for its snapshots (or defined) stays, shut off, with its
        snapshots, disks and disk records; ``undefine`` forgets it.  Destroy
        writes to the store only after QEMU is dead, so it works on a full disk
        as far as it can: the QEMU goes whatever the store can record.
        """
        async with self.locked(name_or_id, strict=False) as rec:
            if rec.state == SHUTOFF:
                raise StateError(
                    f"domain {rec.name!r} is shut off already; `xenlab vm undefine` forgets it"
                )
            with contextlib.suppress(StateError):  # a full disk: destroy goes on anyway
                rec = self.store.patch(rec.domid, extra_set={JOB: new_job("destroy").to_json()})
            self.kill_domain(rec)
            try:
                kept = await self.gone(rec)
                if kept is not None:
                    self.store.patch(rec.domid, extra_drop=[JOB])
            except StateError as err:
                raise StateError(f"domain {rec.name!r}: its QEMU is stopped, but {err}; "
                                 "destroy it again once there is room") from err
        return rec

    async def shutdown(self, name_or_id: str, *, timeout: float = 60.0, force: bool = False
                 ) -> str:
        """ACPI power button, wait up to ``timeout``; then destroy if ``force``.

        Returns how it ended: ``"shutdown"`` or ``"destroyed"``.
        """
        async with self.live(name_or_id) as rec:
            with self.job(rec, "shutdown") as rec:
                h = self.handle(rec)
                deadline = time.monotonic() + timeout
                while True:
                    # A guest still booting has no ACPI handler yet and drops the
                    # press: press again every few seconds until the deadline.
                    # The domain going away between presses is the goal, not an error.
                    with contextlib.suppress(BackendError):
                        await self.backend.shutdown(h)
                    left = deadline - time.monotonic()
                    if await self.until_gone(h, min(5.0, max(left, 0.0))):
                        await self.gone(rec)
                        return "shutdown"
                    if time.monotonic() >= deadline:
                        break
                if not force:
                    raise StateError(
                        f"domain {rec.name!r} did not shut down within {timeout:g} s "
                        "(add --force to destroy it then)"
                    )
                self.kill_domain(rec)
                await self.gone(rec)
                return "destroyed"

    async def reboot(self, name_or_id: str, *, force: bool = False) -> str:
        """Ask the guest to reboot through its agent; reset it when it cannot (or ``force``).

        Returns how: ``"guest reboot"`` or ``"reset"``.
        """
        async with self.live(name_or_id) as rec:
            h = self.handle(rec)
            if not force:
                try:
                    await self.backend.reboot(h)
                    return "guest reboot"
                except BackendError:
                    pass  # no agent answering: fall back to a hard reset, as xl -F does
            await self.backend.reset(h)
            return "reset"

    async def wait_ready(self, name_or_id: str, *, timeout: float = 60.0) -> float:
        """Wait until the guest agent answers; returns the seconds waited.

        The agent starts last in the project's image, so an answer means the
        guest is up; guests with their own qemu-ga work the same way.
        """
        rec = self.live_record(name_or_id)
        h = self.handle(rec)
        start = time.monotonic()

        async def go() -> None:
            while True:
                try:
                    await self.backend.agent_ping(h, timeout=2.0)
                    return
                except BackendError as err:
                    if time.monotonic() - start > timeout:
                        raise
                    if not self.alive(rec):
                        raise BackendError(
                            f"domain {rec.name!r}: QEMU exited while booting"
                        ) from err
                    await asyncio.sleep(0.2)

        await go()
        return time.monotonic() - start

    async def exec(self, name_or_id: str, argv: Sequence[str], *, timeout: float = 60.0
             ) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest through its agent: (exit code, stdout, stderr).

        :raise StateError: the guest is paused (its agent cannot answer).
        """
        rec = self.live_record(name_or_id)
        h = self.handle(rec)

        async def go() -> tuple[int, bytes, bytes]:
            try:
                # QEMU takes one QMP client at a time: when another command
                # holds it, go on to the agent rather than wait.
                state = await self.backend.state(h, timeout=2.0)
            except BackendError:
                state = "running"
            if state != "running":
                raise StateError(
                    f"domain {rec.name!r} is {state}: its guest agent cannot answer until "
                    f"it runs (`xenlab vm unpause {rec.name}`)")
            return await self.backend.agent_exec(h, argv, timeout)

        return await go()

    def open_console(self, name_or_id: str, *, timeout: float = 10.0) -> socket.socket:
        """A connected stream to the domain's serial console (``vm.console.attach`` bridges
        it with a terminal).

        :raise StateError: the domain does not run.
        :raise BackendError: no console answers within ``timeout`` seconds.
        """
        rec = self.live_record(name_or_id)
        return self.backend.open_console(self.handle(rec), timeout)

    async def until_gone(self, h: DomainHandle, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the domain of ``h`` to go; True when it did.

        The backend's wait blocks, so it is asked in slices of 0.1 s with the loop let
        run between them: a Ctrl-C (a cancel) ends the wait at once.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.backend.wait_gone(h, min(0.1, max(0.0, deadline - time.monotonic()))):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0)

    def kill_domain(self, rec: DomainRecord) -> None:
        """End domain ``rec`` now, if its backend has it (QEMU: SIGKILL, only if ours)."""
        self.backend.destroy(self.handle(rec))
