"""What a domain has beyond its config, typed: :class:`Runtime`, and :func:`disk_now`.

A record's ``extra`` holds these facts as JSON under the keys named here, and
this module is the one place that names them and their shapes: mirror pivots
(``disk_paths``, ``disk_nodes``), external-snapshot tops (``overlays``), the
current snapshot, block nodes awaiting clean-up, host NIC ends and the device
lists attach/detach left, hot-plugged vCPUs, the memory and vCPU figures a
verb set, and the job in progress.  :meth:`Runtime.of` reads them (a value of
the wrong shape reads as absent, as the code before this module did; unknown
keys are kept in ``other``), :meth:`Runtime.to_extra` writes them back, and the
two round-trip.  :func:`disk_now` alone answers "which file does disk X run on
now".  Pure: no store, no QEMU; writers still change the record key by key
through ``Store.patch`` under the domain's lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from xenlab.vm.store import DomainRecord

__all__ = [
    "CURRENT",
    "DEFINED",
    "DISK_NODES",
    "DISK_PATHS",
    "DISK_SPECS",
    "JOB",
    "MAXMEM_MIB",
    "MEMORY_MIB",
    "ONE_RUN",
    "OVERLAYS",
    "QEMU_NAME",
    "STALE_NODES",
    "VCPUS",
    "VCPUS_PLUGGED",
    "VIFS",
    "VIF_SPECS",
    "DiskFile",
    "DiskNow",
    "Overlay",
    "Runtime",
    "disk_now",
]

DISK_PATHS: Final = "disk_paths"  # vdev -> {"file", "format"}: where vm.mirror pivoted it
DISK_NODES: Final = "disk_nodes"  # vdev -> the format node QEMU runs it under after a pivot
OVERLAYS: Final = "overlays"  # vdev -> {"file", "node"}: the external-snapshot overlay on top
CURRENT: Final = "current_snapshot"  # the id of the snapshot the guest descends from
STALE_NODES: Final = "stale_nodes"  # vdev -> block nodes a detach left for clean-up
VIFS: Final = "vifs"  # host ends of the NICs (hotplug.Vif JSON)
VIF_SPECS: Final = "vif_specs"  # the vif list network-attach/-detach left
DISK_SPECS: Final = "disk_specs"  # the disk list block-attach/-detach left
VCPUS_PLUGGED: Final = "vcpus_plugged"  # vCPUs QEMU has (hot-plugged ones included)
VCPUS: Final = "vcpus"  # vcpu-set's count
MEMORY_MIB: Final = "memory_mib"  # mem-set's target
MAXMEM_MIB: Final = "maxmem_mib"  # mem-max's ceiling
QEMU_NAME: Final = "qemu_name"  # QEMU's -name when a rename left it different
DEFINED: Final = "defined"  # kept when shut off (vm define)
JOB: Final = "job"  # the verb in progress (vm.jobs.Job JSON)

# Facts of one QEMU's run that do not hold for a fresh start of the domain (a new QEMU
# has its config's figures, its own name and <vdev>-fmt nodes).
ONE_RUN: Final = (QEMU_NAME, VCPUS, MEMORY_MIB, MAXMEM_MIB, DISK_NODES)

_KNOWN = frozenset({DISK_PATHS, DISK_NODES, OVERLAYS, CURRENT, STALE_NODES, VIFS, VIF_SPECS,
                    DISK_SPECS, VCPUS_PLUGGED, VCPUS, MEMORY_MIB, MAXMEM_MIB, QEMU_NAME,
                    DEFINED, JOB})
# Snapshot overlays are always qcow2 (vm.snapshot makes them).
_OVERLAY_FORMAT = "qcow2"


@dataclass(frozen=True, slots=True)
class DiskFile:
    """An image and its format."""

    file: str
    format: str


@dataclass(frozen=True, slots=True)
class Overlay:
    """An external snapshot's overlay a disk runs on, and its QEMU node."""

    file: str
    node: str


@dataclass(frozen=True, slots=True)
class DiskNow:
    """Where a disk runs now: its top image and node, and the image under any overlay."""

    vdev: str
    file: str
    format: str
    node: str
    base: DiskFile  # the config's file, or where a mirror moved it
    overlay: bool  # ``file`` is an external snapshot's overlay on ``base``


@dataclass(frozen=True, slots=True)
class Runtime:
    """A record's run-time facts (its ``extra``), typed; see the module docstring."""

    moved: Mapping[str, DiskFile] = field(default_factory=dict)
    nodes: Mapping[str, str] = field(default_factory=dict)
    overlays: Mapping[str, Overlay] = field(default_factory=dict)
    current_snapshot: int | None = None
    stale_nodes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    vifs: tuple[Mapping[str, Any], ...] = ()
    vif_specs: tuple[str, ...] | None = None
    disk_specs: tuple[str, ...] | None = None
    vcpus_plugged: int | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    maxmem_mib: int | None = None
    qemu_name: str | None = None
    defined: bool = False
    job: Mapping[str, Any] | None = None
    other: Mapping[str, Any] = field(default_factory=dict)  # keys this module does not know

    @classmethod
    def of(cls, rec: DomainRecord) -> Runtime:
        """The run-time facts of ``rec``."""
        return cls.from_extra(rec.extra)

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> Runtime:
        """Read a record's ``extra`` (JSON values); a value of the wrong shape reads as absent."""
        return cls(
            moved={v: DiskFile(str(m["file"]), str(m.get("format") or _OVERLAY_FORMAT))
                   for v, m in _dict(extra.get(DISK_PATHS)).items()
                   if isinstance(m, dict) and m.get("file")},
            nodes={v: n for v, n in _dict(extra.get(DISK_NODES)).items() if isinstance(n, str)},
            overlays={v: Overlay(str(o["file"]), str(o.get("node") or ""))
                      for v, o in _dict(extra.get(OVERLAYS)).items()
                      if isinstance(o, dict) and o.get("file")},
            current_snapshot=_int(extra.get(CURRENT)),
            stale_nodes={v: tuple(str(n) for n in ns)
                         for v, ns in _dict(extra.get(STALE_NODES)).items()
                         if isinstance(ns, list)},
            vifs=tuple(v for v in _list(extra.get(VIFS)) if isinstance(v, dict)),
            vif_specs=_strings(extra.get(VIF_SPECS)),
            disk_specs=_strings(extra.get(DISK_SPECS)),
            vcpus_plugged=_int(extra.get(VCPUS_PLUGGED)),
            vcpus=_int(extra.get(VCPUS)),
            memory_mib=_int(extra.get(MEMORY_MIB)),
            maxmem_mib=_int(extra.get(MAXMEM_MIB)),
            qemu_name=q if isinstance(q := extra.get(QEMU_NAME), str) else None,
            defined=extra.get(DEFINED) is True,
            job=j if isinstance(j := extra.get(JOB), dict) else None,
            other={k: v for k, v in extra.items() if k not in _KNOWN},
        )

    def to_extra(self) -> dict[str, Any]:
        """The JSON ``extra`` that reads back as this (absent facts leave their key out)."""
        out: dict[str, Any] = dict(self.other)
        if self.moved:
            out[DISK_PATHS] = {v: {"file": m.file, "format": m.format}
                               for v, m in self.moved.items()}
        if self.nodes:
            out[DISK_NODES] = dict(self.nodes)
        if self.overlays:
            out[OVERLAYS] = {v: {"file": o.file, "node": o.node} for v, o in self.overlays.items()}
        if self.stale_nodes:
            out[STALE_NODES] = {v: list(ns) for v, ns in self.stale_nodes.items()}
        if self.vifs:
            out[VIFS] = [dict(v) for v in self.vifs]
        for key, specs in ((VIF_SPECS, self.vif_specs), (DISK_SPECS, self.disk_specs)):
            if specs is not None:
                out[key] = list(specs)
        for key, number in ((CURRENT, self.current_snapshot), (VCPUS_PLUGGED, self.vcpus_plugged),
                            (VCPUS, self.vcpus), (MEMORY_MIB, self.memory_mib),
                            (MAXMEM_MIB, self.maxmem_mib)):
            if number is not None:
                out[key] = number
        if self.qemu_name is not None:
            out[QEMU_NAME] = self.qemu_name
        if self.defined:
            out[DEFINED] = True
        if self.job is not None:
            out[JOB] = dict(self.job)
        return out


def disk_now(rt: Runtime, vdev: str, file: str, fmt: str) -> DiskNow:
    """Where disk ``vdev`` (``file`` in format ``fmt`` in its config) runs now.

    A mirror pivot moves the disk to another file (its base from then on); an
    external snapshot puts a qcow2 overlay on top of that base.  The node is
    QEMU's name for the top: the overlay's, the pivot's, or the one
    ``vm.backends.qemu.qemu`` gives a disk at start (``VDEV-fmt``).
    """
    base = rt.moved.get(vdev) or DiskFile(file, fmt)
    top = rt.overlays.get(vdev)
    if top is not None:
        return DiskNow(vdev, top.file, _OVERLAY_FORMAT, top.node, base, True)
    return DiskNow(vdev, base.file, base.format, rt.nodes.get(vdev, f"{vdev}-fmt"), base, False)


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _strings(value: object) -> tuple[str, ...] | None:
    return tuple(str(s) for s in value) if isinstance(value, list) else None
