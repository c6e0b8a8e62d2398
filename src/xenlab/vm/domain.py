"""The toolstack's verbs on domains: :class:`Toolstack` (create, list, destroy, shutdown, ...).

A domain is a QEMU process started from an xl config: the config is parsed
with ``xenlab.config`` into a DomainConfig, turned into a command line by
``vm.qemu``, started daemonized (QEMU forks once its devices are up, so a
command line QEMU refuses is an error of ``create``, with QEMU's message), and
recorded in the state store.  Every verb that changes a domain holds the
domain's lock, so two commands on one domain never interleave; ``create``
holds the store's global lock while it picks the id and name.

Like xl, ``create`` takes ``key=value`` overrides appended to the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from xenlab import hotplug
from xenlab.config import parse
from xenlab.config.model import DomainConfig, domain_config
from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, StateError, XenlabError
from xenlab.vm.qemu import (
    Accel,
    Nic,
    RuntimePaths,
    balloon_target_mib,
    needs_image,
    nics,
    probe_accel,
    qemu_argv,
)
from xenlab.vm.qmp import GuestAgent, Qmp
from xenlab.vm.qmp import run as _run_async
from xenlab.vm.store import DomainRecord, Store, is_alive

# A domain whose QEMU has exited but which is kept because it has snapshots
# (like a defined, inactive libvirt domain); `create` starts it again.
SHUTOFF = "shutoff"

# Unix socket paths must fit in sun_path (108 bytes with the NUL).
_SOCKET_MAX = 100
# DomainRecord.extra key: the host ends (hotplug.Vif as JSON) of the domain's
# tapped vifs while its QEMU may run; whoever sees QEMU gone brings them offline.
VIFS = "vifs"
# DomainRecord.extra key: the domain's vif list (xl vif specs) once
# network-attach/-detach changed it; a later start uses it over the file's.
VIF_SPECS = "vif_specs"
# The disk list block-attach/-detach left (xl disk specs), for a later create.
DISK_SPECS = "disk_specs"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """A domain as ``list`` shows it: the record plus what QEMU says now."""

    record: DomainRecord
    state: str  # "running", "paused", "shutdown", "stale (QEMU gone)", ...
    memory_mib: int | None
    vcpus: int | None
    seconds: float


def runtime_paths(state_dir: Path, domid: int) -> RuntimePaths:
    """Where domain ``domid``'s sockets live; short enough for unix sockets."""
    rundir = state_dir / "run" / str(domid)
    if len(str(rundir / "qmp.sock")) > _SOCKET_MAX:
        # Deep state directories (pytest's tmp_path) would overflow sun_path.
        import hashlib

        tag = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
        rundir = Path("/tmp") / f"xenlab-{os.getuid()}-{tag}" / str(domid)
    return RuntimePaths.under(rundir)


def config_from_text(text: str, source: str, overrides: Sequence[str] = ()
                     ) -> tuple[DomainConfig, str]:
    """Parse xl config ``text`` with ``key=value`` ``overrides`` appended, as xl does.

    Returns the config and the text it was parsed from (the record keeps it).
    """
    if overrides:
        text = text.rstrip("\n") + "\n" + "\n".join(overrides) + "\n"
    return domain_config(parse(text, source=source)), text


class Toolstack:
    """The verbs of ``xenlab vm``, over one state store."""

    def __init__(self, state_dir: Path | None = None, *, accel: Accel | None = None) -> None:
        self.store = Store(state_dir)
        self.state_dir = self.store.state_dir
        self._accel = accel

    @property
    def accel(self) -> Accel:
        """KVM when a real probe boot proves it works here, else TCG; probed once."""
        if self._accel is None:
            self._accel = probe_accel()
        return self._accel

    # -- create ------------------------------------------------------------------

    def load_config(self, cfg: Path, overrides: Sequence[str] = ()) -> tuple[DomainConfig, str]:
        """Parse ``cfg`` with xl-style ``key=value`` overrides appended; (config, text)."""
        try:
            text = cfg.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as err:
            raise XenlabError(f"{cfg}: cannot read: {err.strerror or err}") from err
        return config_from_text(text, str(cfg), overrides)

    def _check_disks(self, dc: DomainConfig, create_size: str | None) -> list[Path]:
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
                raise XenlabError(
                    f"disk {target!r} ({disk.vdev}) does not exist; create it with qemu-img "
                    "or pass --create-disks SIZE"
                )
            fmt_name = disk.format.value
            if fmt_name not in ("qcow2", "raw"):
                raise XenlabError(f"cannot create disk {target!r}: format {fmt_name!r}")
            try:
                create_image(str(path), fmt_name, create_size)
            except XenlabError:
                for p in created:
                    p.unlink(missing_ok=True)
                raise
            created.append(path)
        return created

    def create(
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
        return self._start(dc, text, config_path=str(cfg.resolve()), paused=paused,
                           image=image, create_disks=create_disks)

    def _reusable(self, name: str) -> DomainRecord | None:
        """The shut-off domain called ``name`` to start again, or None when the name is free.

        XenlabError when a live domain has the name, or a stale one (QEMU
        gone) still holds it.  The caller holds the store's global lock.
        """
        old: DomainRecord | None = None
        for rec in self.store.list():
            if rec.name != name:
                continue
            if rec.state == SHUTOFF and not is_alive(rec):
                old = rec  # a shut-off domain kept for its snapshots: start it again
                continue
            if is_alive(rec):
                raise XenlabError(f"domain {name!r} already exists (id {rec.domid})")
            raise XenlabError(
                f"domain {name!r} has stale state (id {rec.domid}, QEMU gone): "
                f"`xenlab vm destroy {name}` clears it"
            )
        return old

    def _start(
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
        prepare: Callable[[], None] | None = None,
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
        """
        fresh = incoming is None
        new_uuid = uuid or dc.uuid or str(uuidlib.uuid4())
        with self.store.global_lock():
            old = self._reusable(dc.name)
            if old is not None and fresh:
                # create starts a kept domain on the disks it last ran on, with
                # the NICs it last had; restore, receive and revert bring the
                # config to run as it is.
                dc, text = _on_vif_specs(dc, text, old)
                dc, text = _on_disk_specs(dc, text, old)
                dc = _on_overlays(_on_mirrors(dc, old), old)
            created = self._check_disks(dc, create_disks) if fresh else []
            state = "creating" if fresh else "incoming"
            if old is not None:
                # The facts of the old QEMU's run do not hold for a fresh start;
                # disk_nodes name the old QEMU's nodes, a new one has <vdev>-fmt.
                extra = old.extra if not fresh else {
                    k: v for k, v in old.extra.items()
                    if k not in ("qemu_name", "vcpus", "memory_mib", "maxmem_mib", "disk_nodes")}
                rec = self.store.update(replace(
                    old, config_path=config_path, config_text=text, pid=None, state=state,
                    created=time.time(), accel=self.accel.value,
                    uuid=old.uuid if fresh else new_uuid, extra=extra,
                ))
            else:
                rec = self.store.add_domain(DomainRecord(
                    domid=0, name=dc.name, uuid=new_uuid, config_path=config_path,
                    config_text=text, rundir="", pid=None, state=state, created=time.time(),
                    accel=self.accel.value,
                ))
        paths = runtime_paths(self.state_dir, rec.domid)
        try:
            with self.store.lock(rec.domid):
                if paths.rundir.exists():
                    shutil.rmtree(paths.rundir)
                paths.rundir.mkdir(parents=True)
                if image is None and needs_image(dc):
                    from xenlab.vm.image import build_image

                    image = build_image()
                dc = replace(dc, uuid=rec.uuid)
                rec, taps = self._vifs_online(rec, dc, fresh=fresh)
                argv = qemu_argv(
                    dc, paths, accel=self.accel,
                    image=image,  # type: ignore[arg-type]
                    # An incoming QEMU must not run before the stream has arrived.
                    paused=paused or not fresh, incoming=incoming, taps=taps,
                )
                if prepare is not None:
                    prepare()
                self._spawn(argv, paths)
                pid = int(paths.pidfile.read_text().strip())
                if fresh:
                    target = balloon_target_mib(dc)
                    if target is not None:
                        # xl's memory < maxmem: the guest sees maxmem and the balloon
                        # takes it down to memory once its driver is up.
                        _run_async(self._qmp_paths(paths, "balloon", {"value": target << 20}))
                    state = _run_async(self._status(paths))
                rec = self.store.update(replace(rec, rundir=str(paths.rundir), pid=pid,
                                                state=state))
                if dc.cpus is not None:
                    from xenlab.vm.resources import apply_affinity

                    # xl's cpus=: pin the vCPU threads (their threads exist
                    # already when QEMU waits for an incoming stream).
                    apply_affinity(self, rec)
                return rec
        except BaseException:
            self._kill(paths)
            self._gone(rec)
            for p in created:
                p.unlink(missing_ok=True)
            raise

    def host_vif(self, rec: DomainRecord, nic: Nic, *, name: str | None = None) -> hotplug.Vif:
        """The hotplug description of ``nic``'s host end in domain ``rec``.

        The tap is named ``vifname=`` when the config gives one, else like
        Xen's backend, ``vif<domid>.<devid>``; a vif with a bridge and no
        script gets Xen's default script, vif-bridge.
        """
        spec = nic.spec
        return hotplug.Vif(
            domid=rec.domid, devid=nic.devid,
            vifname=spec.ifname or hotplug.default_vifname(rec.domid, nic.devid),
            script=spec.script or hotplug.DEFAULT_VIF_SCRIPT, bridge=spec.bridge,
            mac=nic.mac, mtu=spec.mtu, ip=spec.ip, gatewaydev=spec.gatewaydev,
            domname=name or rec.name,
        )

    def _vifs_online(self, rec: DomainRecord, dc: DomainConfig, *, fresh: bool
                     ) -> tuple[DomainRecord, dict[int, str]]:
        """Bring ``dc``'s tapped vifs online and record them; (record, tap name by devid).

        A taken name is varied (``vif3.0-1``) unless the config chose it with
        ``vifname=`` for a fresh start: an incoming domain (local migration)
        runs beside its source, which holds the name.  All or nothing: a
        failure brings the ones already up offline again.
        """
        wanted = [self.host_vif(rec, n, name=dc.name) for n in nics(dc) if n.tap]
        if not wanted:
            return rec, {}

        async def go() -> list[hotplug.Vif]:
            done: list[hotplug.Vif] = []
            try:
                for vif in wanted:
                    chosen = any(n.devid == vif.devid and n.spec.ifname for n in nics(dc))
                    done.append(await hotplug.online(vif, rename_if_taken=not (chosen and fresh)))
            except BaseException:
                for vif in reversed(done):
                    with contextlib.suppress(hotplug.HotplugError):
                        await hotplug.offline(vif)
                raise
            return done

        up = _run_async(go())
        extra = dict(rec.extra)
        extra[VIFS] = [hotplug.vif_to_json(v) for v in up]
        rec = self.store.update(replace(rec, extra=extra))
        return rec, {v.devid: v.vifname for v in up}

    def _vifs_offline(self, rec: DomainRecord) -> dict[str, object]:
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
            _run_async(go())
        return {k: v for k, v in rec.extra.items() if k != VIFS}

    def _spawn(self, argv: list[str], paths: RuntimePaths) -> None:
        """Start QEMU daemonized: it returns once its devices are up, or fails with why."""
        with paths.log.open("ab") as log:
            proc = subprocess.run(
                [*argv, "-daemonize"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.PIPE, check=False, timeout=120,
            )
        if proc.returncode != 0:
            msg = proc.stderr.decode("utf-8", "replace").strip()
            raise BackendError(f"QEMU refused the domain: {msg or f'exit {proc.returncode}'}")

    async def _status(self, paths: RuntimePaths) -> str:
        qmp = Qmp()
        await qmp.connect(paths.qmp, timeout=10)
        try:
            st = await qmp.execute("query-status")
        finally:
            await qmp.close()
        assert isinstance(st, dict)
        status = str(st.get("status", "unknown"))
        return {"prelaunch": "paused"}.get(status, status)

    # -- looking ---------------------------------------------------------------

    def get(self, name_or_id: str) -> DomainRecord:
        """The record of a domain by name or id; XenlabError if there is none."""
        return self.store.get(name_or_id)

    def status(self, rec: DomainRecord) -> DomainStatus:
        """What the domain is now, asking QEMU when it is alive."""
        dc, _ = self._config_of(rec)
        # mem-set and vcpu-set keep the current values in the record.
        mem = int(str(rec.extra.get("memory_mib", dc.memory_mib)))
        vcpus = int(str(rec.extra.get("vcpus", dc.vcpus)))
        if rec.state == SHUTOFF:
            return DomainStatus(rec, SHUTOFF, dc.memory_mib, dc.vcpus, 0.0)
        if not is_alive(rec):
            return DomainStatus(rec, "stale (QEMU gone)", mem, vcpus,
                                time.time() - rec.created)
        try:
            state = _run_async(self._status(self.paths(rec)))
        except BackendError:
            state = "unresponsive"
        return DomainStatus(rec, state, mem, vcpus, time.time() - rec.created)

    def list(self) -> list[DomainStatus]:
        """Every domain in the store, live, shut off or stale, by id.

        A domain whose guest powered itself off cleanly is gone, as with xl:
        its record is cleared here (kept as shut off if it has snapshots).
        """
        out = []
        for rec in sorted(self.store.list(), key=lambda r: r.domid):
            if rec.state != SHUTOFF and not is_alive(rec) and self._powered_off(rec):
                with self.store.lock(rec.domid):
                    kept = self._gone(rec)
                if kept is None:
                    continue
                rec = kept
            out.append(self.status(rec))
        return out

    def _powered_off(self, rec: DomainRecord) -> bool:
        """True when the console shows the guest kernel's clean power-off as its last words."""
        log = self.paths(rec).console_log
        try:
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - 4096))
                tail = f.read()
        except OSError:
            return False
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        return bool(lines) and lines[-1].rstrip().endswith(b"reboot: Power down")

    def paths(self, rec: DomainRecord) -> RuntimePaths:
        """The domain's runtime paths."""
        return runtime_paths(self.state_dir, rec.domid)

    def _config_of(self, rec: DomainRecord) -> tuple[DomainConfig, str]:
        return config_from_text(rec.config_text, rec.config_path)

    # -- changing ----------------------------------------------------------------

    def define(self, cfg: Path, overrides: Sequence[str] = ()) -> DomainRecord:
        """Record the domain ``cfg`` describes as shut off, without starting it.

        Like ``virsh define``: a defined domain stays in the store when its
        QEMU exits, so it can be snapshotted while shut off (qemu-img) and
        started again with ``create``.
        """
        dc, text = self.load_config(cfg, overrides)
        with self.store.global_lock():
            for rec in self.store.list():
                if rec.name == dc.name:
                    raise XenlabError(f"domain {dc.name!r} already exists (id {rec.domid})")
            self._check_disks(dc, None)
            return self.store.add_domain(
                DomainRecord(
                    domid=0, name=dc.name, uuid=dc.uuid or str(uuidlib.uuid4()),
                    config_path=str(cfg.resolve()), config_text=text, rundir="", pid=None,
                    state=SHUTOFF, created=time.time(), accel=self.accel.value,
                    extra={"defined": True},
                )
            )

    def _gone(self, rec: DomainRecord) -> DomainRecord | None:
        """QEMU has exited: keep the domain as shut off if it is defined, has snapshots, or
        runs on mirrored disks (only its record says where they are now).

        Returns the kept record, or None when the domain was forgotten.
        """
        shutil.rmtree(self.paths(rec).rundir, ignore_errors=True)
        extra = self._vifs_offline(rec)
        if (rec.extra.get("defined") or rec.extra.get("disk_paths")
                or self.store.list_snapshots(rec.domid)):
            return self.store.update(replace(rec, pid=None, state=SHUTOFF, extra=extra))
        self.store.remove(rec.domid)
        return None

    def undefine(self, name_or_id: str) -> DomainRecord:
        """Forget a shut-off domain and its snapshot records (disk files are left alone)."""
        rec = self.get(name_or_id)
        with self.store.lock(rec.domid):
            if rec.state != SHUTOFF:
                raise StateError(f"domain {rec.name!r} is not shut off; destroy it first")
            self.store.remove(rec.domid)
        return rec

    def _live(self, name_or_id: str) -> DomainRecord:
        rec = self.get(name_or_id)
        if rec.state == SHUTOFF:
            raise StateError(
                f"domain {rec.name!r} (id {rec.domid}) is shut off; `xenlab vm create` starts it"
            )
        if not is_alive(rec):
            raise StateError(
                f"domain {rec.name!r} (id {rec.domid}) is not running: its QEMU is gone; "
                f"`xenlab vm destroy {rec.name}` clears it"
            )
        return rec

    async def _qmp(self, rec: DomainRecord, cmd: str, args: dict[str, object] | None = None
                   ) -> object:
        return await self._qmp_paths(self.paths(rec), cmd, args)

    async def _qmp_paths(self, paths: RuntimePaths, cmd: str,
                         args: dict[str, object] | None = None) -> object:
        qmp = Qmp()
        await qmp.connect(paths.qmp, timeout=10)
        try:
            return await qmp.execute(cmd, args)
        finally:
            await qmp.close()

    def pause(self, name_or_id: str) -> None:
        """Stop the domain's vCPUs (QMP stop)."""
        rec = self._live(name_or_id)
        with self.store.lock(rec.domid):
            _run_async(self._qmp(rec, "stop"))
            self.store.update(replace(rec, state="paused"))

    def unpause(self, name_or_id: str) -> None:
        """Resume the domain's vCPUs (QMP cont)."""
        rec = self._live(name_or_id)
        with self.store.lock(rec.domid):
            _run_async(self._qmp(rec, "cont"))
            self.store.update(replace(rec, state="running"))

    def destroy(self, name_or_id: str) -> DomainRecord:
        """Kill the domain's QEMU now and forget it (a stale record is cleared too)."""
        rec = self.get(name_or_id)
        with self.store.lock(rec.domid):
            if rec.state == SHUTOFF:
                raise StateError(
                    f"domain {rec.name!r} is shut off already; `xenlab vm undefine` forgets it"
                )
            paths = self.paths(rec)
            if is_alive(rec):
                self._kill(paths, rec.pid)
            self._gone(rec)
        return rec

    def shutdown(self, name_or_id: str, *, timeout: float = 60.0, force: bool = False
                 ) -> str:
        """ACPI power button, wait up to ``timeout``; then destroy if ``force``.

        Returns how it ended: ``"shutdown"`` or ``"destroyed"``.
        """
        rec = self._live(name_or_id)
        with self.store.lock(rec.domid):
            deadline = time.monotonic() + timeout
            while True:
                # A guest still booting has no ACPI handler yet and drops the
                # press: press again every few seconds until the deadline.
                # QEMU going away between presses is the goal, not an error.
                with contextlib.suppress(BackendError):
                    _run_async(self._qmp(rec, "system_powerdown"))
                left = deadline - time.monotonic()
                if _wait_gone(rec.pid, min(5.0, max(left, 0.0))):
                    self._gone(rec)
                    return "shutdown"
                if time.monotonic() >= deadline:
                    break
            if not force:
                raise StateError(
                    f"domain {rec.name!r} did not shut down within {timeout:g} s "
                    "(add --force to destroy it then)"
                )
            self._kill(self.paths(rec), rec.pid)
            self._gone(rec)
            return "destroyed"

    def reboot(self, name_or_id: str, *, force: bool = False) -> str:
        """Ask the guest to reboot through its agent; reset it when it cannot (or ``force``).

        Returns how: ``"guest reboot"`` or ``"reset"``.
        """
        rec = self._live(name_or_id)
        with self.store.lock(rec.domid):
            if not force:
                async def ask() -> None:
                    agent = GuestAgent(self.paths(rec).qga)
                    try:
                        await agent.shutdown(mode="reboot", timeout=5)
                    finally:
                        await agent.close()

                try:
                    _run_async(ask())
                    return "guest reboot"
                except BackendError:
                    pass  # no agent answering: fall back to a hard reset, as xl -F does
            _run_async(self._qmp(rec, "system_reset"))
            return "reset"

    def wait_ready(self, name_or_id: str, *, timeout: float = 60.0) -> float:
        """Wait until the guest agent answers; returns the seconds waited.

        The agent starts last in the project's image, so an answer means the
        guest is up; guests with their own qemu-ga work the same way.
        """
        rec = self._live(name_or_id)
        start = time.monotonic()

        async def go() -> None:
            while True:
                agent = GuestAgent(self.paths(rec).qga)
                try:
                    await agent.ping(timeout=2.0)
                    return
                except BackendError as err:
                    if time.monotonic() - start > timeout:
                        raise
                    if not is_alive(rec):
                        raise BackendError(
                            f"domain {rec.name!r}: QEMU exited while booting"
                        ) from err
                    await asyncio.sleep(0.2)
                finally:
                    await agent.close()

        _run_async(go())
        return time.monotonic() - start

    def exec(self, name_or_id: str, argv: Sequence[str], *, timeout: float = 60.0
             ) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest through its agent: (exit code, stdout, stderr)."""
        rec = self._live(name_or_id)

        async def go() -> tuple[int, bytes, bytes]:
            agent = GuestAgent(self.paths(rec).qga)
            res = await agent.exec(list(argv), timeout=timeout)
            return res.exitcode, res.stdout, res.stderr

        return _run_async(go())

    def _kill(self, paths: RuntimePaths, pid: int | None = None) -> None:
        if pid is None:
            try:
                pid = int(paths.pidfile.read_text().strip())
            except (OSError, ValueError):
                return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_gone(pid, 10)


def create_image(path: str, fmt: str, size: str) -> None:
    """Make a blank disk image ``path`` of ``size`` (qemu-img syntax) in format ``fmt``.

    :raise XenlabError: qemu-img refused, with its message.
    """
    proc = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise XenlabError(f"qemu-img create {path}: {proc.stderr.strip()}")


def _on_disks(dc: DomainConfig, moves: dict[str, tuple[str, DiskFormat]]) -> DomainConfig:
    """``dc`` with each disk named in ``moves`` (vdev: (file, format)) on that file."""
    if not moves:
        return dc
    return replace(dc, disks=tuple(
        replace(d, pdev_path=moves[d.vdev][0], format=moves[d.vdev][1]) if d.vdev in moves
        else d
        for d in dc.disks
    ))


def _on_mirrors(dc: DomainConfig, rec: DomainRecord) -> DomainConfig:
    """``dc`` with each disk that ``vm.mirror`` pivoted on the file it moved to.

    After a pivot the guest's writes go to the mirror's target; starting the
    domain on the config's file would silently go back in time.
    """
    moved = rec.extra.get("disk_paths") or {}
    if not isinstance(moved, dict):
        return dc
    return _on_disks(dc, {v: (str(m["file"]), DiskFormat(str(m["format"])))
                          for v, m in moved.items() if isinstance(m, dict) and m.get("file")})


def _on_overlays(dc: DomainConfig, rec: DomainRecord) -> DomainConfig:
    """``dc`` with each disk that has an external-snapshot overlay running on the overlay.

    After an external snapshot the guest's writes go to the overlay; starting
    the domain on the config's original files would silently drop them.
    """
    overlays = rec.extra.get("overlays") or {}
    if not isinstance(overlays, dict):
        return dc
    return _on_disks(dc, {v: (str(ov["file"]), DiskFormat.QCOW2)
                          for v, ov in overlays.items() if isinstance(ov, dict) and ov.get("file")})


def _on_vif_specs(dc: DomainConfig, text: str, rec: DomainRecord) -> tuple[DomainConfig, str]:
    """``dc`` (and its text) with the vif list network-attach/-detach left in ``rec``.

    A NIC attached at run time stays across a restart, as with xl; the list
    is appended to the text as a ``vif =`` line (later settings win).
    """
    specs = rec.extra.get(VIF_SPECS)
    if not isinstance(specs, list):
        return dc, text
    return config_from_text(text, rec.config_path, [vif_line([str(s) for s in specs])])


def _on_disk_specs(dc: DomainConfig, text: str, rec: DomainRecord) -> tuple[DomainConfig, str]:
    """``dc`` (and its text) with the disk list block-attach/-detach left in ``rec``."""
    specs = rec.extra.get(DISK_SPECS)
    if not isinstance(specs, list):
        return dc, text
    return config_from_text(text, rec.config_path, [disk_line([str(s) for s in specs])])


def disk_line(specs: Sequence[str]) -> str:
    """An xl ``disk = [ ... ]`` setting listing ``specs``."""
    from xenlab.config.writer import quote

    return "disk = [ " + ", ".join(quote(s) for s in specs) + " ]"


def vif_line(specs: Sequence[str]) -> str:
    """An xl ``vif = [ ... ]`` setting listing ``specs``."""
    from xenlab.config.writer import quote

    return "vif = [ " + ", ".join(quote(s) for s in specs) + " ]"


def _wait_gone(pid: int | None, timeout: float) -> bool:
    """Wait until process ``pid`` no longer exists; True if it went in time."""
    if pid is None:
        return True
    begin = time.monotonic()
    while time.monotonic() < begin + timeout:
        if not _exists(pid):
            return True
        # A daemonized QEMU is not our child: nothing to reap, just poll,
        # often at first (QEMU usually exits within milliseconds of quit).
        time.sleep(min(0.05, max(0.002, (time.monotonic() - begin) / 8)))
    return False


def _exists(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state is the field after the parenthesised command name.
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
