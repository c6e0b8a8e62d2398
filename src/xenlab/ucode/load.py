"""Late-load microcode on a running Linux host, only when asked: :func:`plan_load`.

Linux late loading reads the firmware file for the CPU
(``/lib/firmware/intel-ucode/FF-MM-SS`` or
``/lib/firmware/amd-ucode/microcode_amd[_famXXh].bin``) when ``1`` is written
to ``/sys/devices/system/cpu/microcode/reload``.  :func:`plan_load` says what
would be written and changes nothing; :func:`apply_load` carries a plan out
(root only), and is reached from the CLI only behind ``--apply``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from xenlab.errors import StateError
from xenlab.ucode.cpu import CpuId, Vendor, this_cpu
from xenlab.ucode.extract import firmware_files, intel_name, write_tree
from xenlab.ucode.select import Selection

RELOAD = PurePosixPath("sys/devices/system/cpu/microcode/reload")
FIRMWARE = PurePosixPath("lib/firmware")


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Files to place under the firmware directory, then the reload trigger."""

    root: Path
    cpu: CpuId
    files: dict[PurePosixPath, bytes]
    reload: Path
    revision: int | None  # the revision the plan loads

    def describe(self) -> list[str]:
        """One line per step, for a dry run."""
        root = self.root / FIRMWARE
        lines = [f"write {root / p} ({len(d)} bytes)" for p, d in self.files.items()]
        lines.append(f"write '1' to {self.reload}")
        return lines


def plan_load(selection: Selection, root: Path = Path("/")) -> LoadPlan:
    """The plan that makes the kernel load ``selection.chosen``; raises if nothing fits."""
    if selection.chosen is None:
        raise StateError(f"no update fits CPU {selection.cpu.signature:#x}: nothing to load")
    if selection.note:
        raise StateError(selection.note)
    chosen = selection.chosen
    files = firmware_files([chosen])
    if chosen.vendor is Vendor.INTEL:
        # Only the file for this CPU's signature matters to the loader.
        name = PurePosixPath("intel-ucode", intel_name(selection.cpu.signature))
        files = {name: files[name]}
    return LoadPlan(root, selection.cpu, files, root / RELOAD, chosen.unsigned_revision)


def apply_load(plan: LoadPlan) -> CpuId:
    """Place the files and trigger the reload; returns the CPU as read afterwards."""
    if plan.root == Path("/") and os.geteuid() != 0:
        raise StateError("late microcode loading needs root")
    if not plan.reload.exists():
        raise StateError(f"{plan.reload} does not exist: this kernel has no late loader")
    write_tree(plan.root / FIRMWARE, plan.files)
    try:
        plan.reload.write_text("1\n")
    except OSError as err:
        raise StateError(f"{plan.reload}: the kernel refused the reload: {err}") from err
    return this_cpu(plan.root)
