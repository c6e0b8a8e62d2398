"""What to put on Xen's command line for a given initrd or microcode file: :func:`advise`.

Xen finds boot-time microcode in one of two ways (xen-command-line(7),
``ucode=``):

- ``ucode=scan``: every multiboot module is searched for an *uncompressed*
  cpio archive holding ``kernel/x86/microcode/{GenuineIntel,AuthenticAMD}.bin``
  (the early part Linux also reads), the first one found is used;
- ``ucode=N``: module N (1 is the first after the dom0 kernel; negative
  counts from the end) is a raw microcode file or such an archive.

Under xen.efi the ``ucode=<file>`` line of xen.cfg replaces both.  The advice
is computed from a scan of the file, so every pitfall it names is one the
file really has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xenlab.ucode.cpu import CpuId, Vendor
from xenlab.ucode.scan import ScanResult
from xenlab.ucode.select import select
from xenlab.ucode.update import Container


@dataclass(slots=True)
class Advice:
    """The ``ucode=`` option, a grub entry sketch, and what is wrong or worth knowing."""

    file: str
    option: str | None
    grub: list[str] = field(default_factory=list)
    efi: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when Xen will find microcode in the file with the given option."""
        return self.option is not None and not self.problems


# Checked against Xen 4.17 booted under QEMU (tests/ucode/test_xen_boot.py).
GENERAL_NOTES = (
    "The early cpio must sit in the leading uncompressed part of the initrd (first, "
    "or after other uncompressed archives); Xen and Linux do not decompress to find "
    "microcode.",
    "Member names must start with kernel/x86/microcode/GenuineIntel.bin or "
    "AuthenticAMD.bin (no leading './' or '/'); the loaders compare the name's "
    "prefix and take the first regular file that matches.",
    "With ucode=scan Xen takes the first module holding such an archive; "
    "a later module's newer microcode is not seen.",
    "Xen keeps the highest fitting patch across every AMD container in the file; "
    "an update not newer than the running revision is not loaded.",
    "Recent Xen checks AMD patches against a table of known SHA-256 digests "
    "(ucode=digest-check); unknown patches are refused unless that is turned off "
    "with ucode=scan,digest-check=0.",
)



def advise(
    scan: ScanResult,
    *,
    module_index: int | None = None,
    cpu: CpuId | None = None,
    kernel: str = "/boot/vmlinuz",
    xen: str = "/boot/xen.gz",
) -> Advice:
    """Advise on the ``ucode=`` option for ``scan.file`` used as a multiboot module.

    ``module_index`` is the file's position among the modules (1 = the module
    right after the dom0 kernel); when not given, the file is assumed to be the
    dom0 initrd, module 1.
    """
    path = scan.file
    adv = Advice(path, None)
    kinds = [p.kind for p in scan.parts]
    raw_bundle = bool(kinds) and kinds[0] in ("intel-bundle", "amd-containers")
    early = [u for u in scan.updates if u.source.early]
    late = [u for u in scan.updates if u.source.container is Container.COMPRESSED]
    index = 1 if module_index is None else module_index

    if kinds and kinds[0] == "dat":
        adv.problems.append(
            "a .dat text file: Xen reads binary microcode only; convert it with "
            f"`xenlab ucode extract {path} --bundle OUT.bin` and use OUT.bin"
        )
    elif raw_bundle and not scan.updates:
        adv.problems.append("a microcode container with no update in it: Xen loads nothing")
    elif raw_bundle:
        adv.option = f"ucode={index}"
        adv.grub = [
            f"multiboot2 {xen} ... ucode={index}",
            f"module2 {kernel} root=...",
        ]
        if index != 1:
            adv.grub.append("module2 /boot/initrd.img")
        adv.grub.append(f"module2 {path}")
        adv.efi = [f"ucode={path.rsplit('/', 1)[-1]}"]
        adv.notes.append(
            f"a raw microcode file: give its module index (here {index}); "
            "ucode=scan only finds cpio archives"
        )
    elif early:
        adv.option = "ucode=scan"
        adv.grub = [f"multiboot2 {xen} ... ucode=scan", f"module2 {kernel} root=...",
                    f"module2 {path}"]
        adv.efi = [f"ramdisk={path.rsplit('/', 1)[-1]}", "(ucode= not needed: scan finds it)"]
        vendors = sorted({u.vendor.value for u in early})
        adv.notes.append(
            f"early cpio at the start holds {len(early)} update(s) for {', '.join(vendors)}"
        )
    else:
        if late:
            names = sorted({u.source.member or "" for u in late})
            adv.problems.append(
                "microcode found only inside a compressed archive ("
                + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
                + "): Xen's ucode=scan and Linux's early loader will not see it; "
                f"prepend an early cpio: `xenlab ucode build-early OUT --from {path} "
                f"--append-initrd {path}`"
            )
        else:
            adv.problems.append("no microcode where Xen looks: no early cpio and no raw bundle")
    for f in scan.findings:
        if "early loaders match the exact name" in f.message:
            adv.problems.append(str(f))
        elif f.severity == "error":
            # Past the early part (which the loaders read) this does not stop Xen.
            adv.notes.append(f"the scan stopped at {f}")
    if cpu is not None and adv.option is not None:
        pool = early if early else scan.updates
        sel = select(pool, cpu)
        if sel.chosen is None:
            who = cpu.vendor.value if cpu.vendor else "this"
            adv.problems.append(
                f"nothing in it fits the {who} CPU {cpu.signature:#x}"
                + (f" (platform mask {cpu.platform_mask:#x})" if cpu.platform_mask else "")
            )
        else:
            adv.notes.append(
                f"for CPU {cpu.signature:#x} the loader picks revision "
                f"{sel.chosen.unsigned_revision:#x} ({sel.chosen.date})"
            )
            if sel.note:
                adv.notes.append(sel.note)
        if cpu.vendor is Vendor.AMD and early:
            adv.notes.append(GENERAL_NOTES[4])
    adv.notes.extend(GENERAL_NOTES[:4])
    return adv


def advice_to_json(adv: Advice) -> dict[str, object]:
    """The ``xen-cmdline --json`` object."""
    return {
        "file": adv.file,
        "ok": adv.ok,
        "option": adv.option,
        "grub": adv.grub,
        "efi": adv.efi,
        "problems": adv.problems,
        "notes": adv.notes,
    }
