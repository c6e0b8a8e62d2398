"""What ``create`` would do, without doing it: :func:`plan_create` (xl's ``create -n``).

The config is read, checked and turned into QEMU's command line exactly as
``Toolstack.create`` does (the same name rule, absolute paths, image checks
and, for a kept domain of that name, the same redirections to its moved
disks, overlays and hot-plugged devices), and the host actions are listed:
disks that would be made, vifs that would be brought online by which
script.  Nothing is started, written or recorded; the guest image is not
built (its files are named by placeholders).  Paths that exist only once
the domain runs (its id, its run directory) are the ones it would get now.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xenlab import hotplug
from xenlab.vm.backend import StartSpec
from xenlab.vm.domain import Toolstack
from xenlab.vm.domconfig import on_disk_specs, on_disks_now, on_vif_specs, plan_nics
from xenlab.vm.store import DomainRecord

__all__ = ["CreatePlan", "plan_create"]


@dataclass(frozen=True, slots=True)
class CreatePlan:
    """What ``create`` would do: the domain, its QEMU command line and the host actions."""

    name: str
    domid: int
    kept: bool  # a shut-off domain of that name would be started again
    argv: tuple[str, ...]
    disks_to_create: tuple[tuple[str, str, str], ...]  # (path, format, size)
    vifs: tuple[hotplug.Vif, ...]

    def shell(self) -> str:
        """The command line as a shell would take it, one option per line."""
        out: list[str] = [shlex.quote(self.argv[0])]
        for arg in self.argv[1:]:
            if arg.startswith("-") and not arg.lstrip("-").isdigit():
                out.append(" \\\n  " + shlex.quote(arg))
            else:
                out.append(" " + shlex.quote(arg))
        return "".join(out)

    def actions(self) -> list[str]:
        """The host actions, one line each (what xl -n leaves to hotplug)."""
        lines = [f"create disk {p} (format {fmt}, size {size})"
                 for p, fmt, size in self.disks_to_create]
        for v in self.vifs:
            where = f"bridge {v.bridge}" if v.bridge else "no bridge"
            lines.append(f"{v.script} online {v.vifname} (vif {v.domid}.{v.devid}, mac {v.mac}, "
                         f"{where})")
        return lines

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON: name, domid, kept, argv, disks_to_create, vifs."""
        return {"name": self.name, "domid": self.domid, "kept": self.kept,
                "argv": list(self.argv),
                "disks_to_create": [{"path": p, "format": f, "size": s}
                                    for p, f, s in self.disks_to_create],
                "vifs": [hotplug.vif_to_json(v) for v in self.vifs]}


async def plan_create(ts: Toolstack, cfg: Path, overrides: Sequence[str] = (), *,
                paused: bool = False, create_disks: str | None = None) -> CreatePlan:
    """What ``ts.create(cfg, overrides, ...)`` would do now; nothing is changed.

    :raise XenlabError: whatever ``create`` would refuse before starting QEMU
        (a bad config or name, a taken name, a missing disk, an unsafe image).
    """
    from xenlab.vm.domconfig import check_images

    dc, text = ts.load_config(cfg, overrides)
    old = await ts.reusable(dc.name)
    if old is not None:
        dc, text = on_vif_specs(dc, text, old)
        dc, text = on_disk_specs(dc, text, old)
        dc = on_disks_now(dc, old)
        domid = old.domid
    else:
        used = {r.domid for r in ts.store.list()}
        domid = next(i for i in range(1, len(used) + 2) if i not in used)
    missing = [d for d in dc.disks if d.pdev_path and not d.is_cdrom
               and not Path(d.pdev_path).exists()]
    if missing and create_disks is None:
        await ts.check_disks(dc, None)  # raises the error create would
    check_images(replace(dc, disks=tuple(d for d in dc.disks if d not in missing)))
    probe = DomainRecord(domid=domid, name=dc.name, uuid="", config_path=str(cfg),
                         config_text=text, rundir="", pid=None, state="", created=0.0,
                         accel="", backend=ts.backend.name)
    vifs = tuple(ts.host_vif(probe, n, name=dc.name) for n in plan_nics(ts.backend, dc) if n.tap)
    argv = ts.backend.start_command(domid, StartSpec(
        replace(dc, uuid=dc.uuid or "<new uuid>"), paused=paused,
        taps={v.devid: v.vifname for v in vifs}))
    return CreatePlan(
        name=dc.name, domid=domid, kept=old is not None, argv=argv,
        disks_to_create=tuple((str(d.pdev_path), d.format.value, str(create_disks))
                              for d in missing),
        vifs=vifs,
    )
