"""End-to-end: the real Xen 4.17 hypervisor finds and uses the early initrds xenlab builds.

Each test boots Debian's Xen under QEMU TCG (tests/oracle/xen_boot.py) with
``ucode=scan`` and an initrd as multiboot module 1, the CPU QEMU shows set to
the signature an update is for, and reads Xen's serial log.  TCG ignores the
loader MSR write, so Xen reports the update it chose as a failed attempt:
``microcode: CPU0 update rev 0x1 to 0x43a failed, result 0x1``.  A boot stops
once Xen is past microcode loading (about a quarter of a second of TCG).

The updates are built with the project's writers (tests/ucode/builders.py),
so a fresh clone tests itself; the real Intel and AMD files in ../shared are
used in addition, to compare xenlab's ``select`` with Xen's choice CPU by CPU.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.oracle import xen_boot
from tests.oracle.xen_boot import BootLog, QemuCpu
from tests.ucode import builders
from xenlab.formats.amd_ucode import build_container, build_patch
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.ucode.cmdline import advise
from xenlab.ucode.cpu import CpuId, Vendor, fms_from_signature
from xenlab.ucode.early import build_early, early_cpio
from xenlab.ucode.scan import scan_buffer
from xenlab.ucode.select import select
from xenlab.ucode.update import Update

pytestmark = pytest.mark.integration

# What QEMU's revision MSR reads unless ucode-rev is set (QEMU 7.2 defaults).
QEMU_INTEL_REV = 0x1
QEMU_AMD_REV = 0x01000065

INTEL_CPU = QemuCpu("GenuineIntel", 6, 154, 4)  # 0x906a4
AMD_CPU = QemuCpu("AuthenticAMD", 0x17, 1, 2)  # 0x800f12, Zen1
# Xen 4.17.7 refuses Zen patches whose digest it does not know; the built
# (and the old real fam17h) patches are not on its list.
NO_DIGEST = "ucode=scan,digest-check=0"

# Intel platform id under TCG is 0 (MSR 0x17 reads 0): the CPU's mask is 0x1.
TCG_PF = 0x1

# Updates for 0x906a4 on the TCG platform: an old one, the newest (reaching
# 0x906a4 through its extended table), one for another platform with a higher
# revision, and one for another stepping with a higher revision still.
INTEL_OLD = builders.intel(0x906A4, 0x10, TCG_PF, date="2021-01-02", seed=21)
INTEL_NEW = builders.intel(
    0x906A3, 0x43A, TCG_PF, ext=((0x906A3, TCG_PF), (0x906A4, TCG_PF)), seed=22
)
INTEL_OTHER_PF = builders.intel(0x906A4, 0x500, 0x40, seed=23)
INTEL_OTHER_SIG = builders.intel(0x906A3, 0x600, TCG_PF, seed=24)
INTEL_ALL = INTEL_OLD + INTEL_NEW + INTEL_OTHER_PF + INTEL_OTHER_SIG


@pytest.fixture(scope="session")
def xen() -> Path:
    """Debian's Xen ELF and QEMU; skipped, with the reason, only if apt or QEMU cannot serve."""
    try:
        xen_boot.qemu_binary()
        return xen_boot.ensure_xen()
    except xen_boot.XenUnavailable as err:
        pytest.skip(err.reason)


@pytest.fixture(scope="module")
def main_initrd(main_cpio: Callable[[str], Path]) -> bytes:
    """A gzip-compressed main archive (busybox tree), as initramfs-tools makes them."""
    return main_cpio("gzip").read_bytes()


def updates_of(blob: bytes) -> list[Update]:
    """The updates xenlab's scanner finds in a bundle or container."""
    found = scan_buffer(blob, "built").updates
    assert found, "the builders made no update"
    return found


def boot(xen: Path, image: bytes, cpu: QemuCpu, xen_args: str = "ucode=scan") -> BootLog:
    """Boot with ``image`` as module 1 and check Xen got past microcode loading."""
    log = xen_boot.boot([image], cpu, xen_args=xen_args, xen=xen)
    assert log.ended == "marker", f"Xen did not get past microcode loading:\n{log.text[-3000:]}"
    # A boot is a quarter second of TCG here; a minute means something hangs.
    assert log.seconds < 30, log.seconds
    return log


def xenlab_early(image: bytes, vendor: Vendor) -> list[int]:
    """Revisions xenlab's scanner says the early loaders would see in ``image``."""
    return [u.revision for u in scan_buffer(image, "image", early_only=True).early(vendor)]


# ------------------------------------------------------------ built updates


def test_intel_build_early_is_found_and_the_newest_fitting_update_chosen(
    xen: Path, main_initrd: bytes
) -> None:
    ups = updates_of(INTEL_ALL)
    image = build_early(ups, main_initrd)
    assert image.intel_count == 4

    log = boot(xen, image.data, INTEL_CPU)

    assert log.bsp_revision == QEMU_INTEL_REV
    assert log.attempts == ((QEMU_INTEL_REV, 0x43A),), log.microcode_lines()
    assert log.microcode_lines() == (
        "(XEN) microcode: CPU0 update rev 0x1 to 0x43a failed, result 0x1",
    )
    # xenlab's own choice for this CPU is the one Xen made.
    chosen = select(ups, CpuId(Vendor.INTEL, INTEL_CPU.signature, TCG_PF)).chosen
    assert chosen is not None and chosen.revision == 0x43A


def test_amd_build_early_is_found_and_its_patch_chosen(xen: Path, main_initrd: bytes) -> None:
    ups = updates_of(builders.AMD_CONTAINER)
    image = build_early(ups, main_initrd)
    assert image.amd_count == 2

    log = boot(xen, image.data, AMD_CPU, NO_DIGEST)

    assert log.bsp_revision == QEMU_AMD_REV
    assert log.attempts == ((QEMU_AMD_REV, 0x08001227),), log.microcode_lines()
    chosen = select(ups, CpuId(Vendor.AMD, AMD_CPU.signature)).chosen
    assert chosen is not None and chosen.revision == 0x08001227


def test_amd_zen_patch_is_matched_then_refused_for_an_unknown_digest(
    xen: Path, main_initrd: bytes
) -> None:
    # Xen 4.17.7's default: the patch matched the CPU (the digest is only
    # looked up for a fitting patch) and was refused, so nothing is written.
    image = build_early(updates_of(builders.AMD_CONTAINER), main_initrd)
    log = boot(xen, image.data, AMD_CPU)
    assert log.refused_digests == (0x08001227,)
    assert log.attempts == ()


def test_one_image_serves_both_vendors(xen: Path, main_initrd: bytes) -> None:
    image = build_early(updates_of(INTEL_ALL) + updates_of(builders.AMD_CONTAINER), main_initrd)
    assert boot(xen, image.data, INTEL_CPU).attempts == ((QEMU_INTEL_REV, 0x43A),)
    # The other fam17h CPU in the container gets its own patch.
    zen_plus = QemuCpu("AuthenticAMD", 0x17, 8, 2)  # 0x800f82
    assert boot(xen, image.data, zen_plus, NO_DIGEST).attempts == ((QEMU_AMD_REV, 0x0800820B),)


def test_update_not_newer_than_the_running_revision_is_not_loaded(
    xen: Path, main_initrd: bytes
) -> None:
    image = build_early(updates_of(INTEL_OLD + INTEL_NEW), main_initrd)
    running = 0x500
    cpu = QemuCpu("GenuineIntel", 6, 154, 4, ucode_rev=running << 32)
    log = boot(xen, image.data, cpu)
    assert log.bsp_revision == running
    assert log.attempts == (), log.microcode_lines()
    # xenlab chooses the same update and says the loader would skip it.
    sel = select(
        updates_of(INTEL_OLD + INTEL_NEW),
        CpuId(Vendor.INTEL, cpu.signature, TCG_PF, microcode_revision=running),
    )
    assert sel.chosen is not None and sel.chosen.revision == 0x43A
    assert sel.note is not None and "not newer" in sel.note


def test_the_first_early_file_wins_and_build_early_puts_ours_first(
    xen: Path, main_initrd: bytes
) -> None:
    old_early, _, _ = early_cpio(updates_of(INTEL_OLD))
    distro = old_early + main_initrd  # an initrd that already carries rev 0x10

    replaced = build_early(updates_of(INTEL_NEW), distro)
    assert replaced.replaced_early == len(old_early)
    kept = build_early(updates_of(INTEL_NEW), distro, keep_old_early=True)
    assert kept.replaced_early == 0
    # Ours in front of an old part that was put in front again afterwards.
    buried = old_early + replaced.data

    for image, want in ((replaced.data, 0x43A), (kept.data, 0x43A), (buried, 0x10)):
        log = boot(xen, image, INTEL_CPU)
        assert log.attempts == ((QEMU_INTEL_REV, want),), log.microcode_lines()
        assert xenlab_early(image, Vendor.INTEL) == [want]


def test_concatenated_amd_containers_the_highest_patch_wins(xen: Path) -> None:
    # Xen 4.17 walks every container in the file and keeps the highest patch
    # for the CPU's equivalence id, whichever container comes first.
    higher = build_patch(
        patch_id=0x08001250,
        processor_rev_id=0x8012,
        date="2019-11-14",
        body=builders.payload(3200 - 64, 31),
    )
    second = build_container(builders.AMD_EQUIV, [higher])
    for blob in (builders.AMD_CONTAINER + second, second + builders.AMD_CONTAINER):
        ups = updates_of(blob)
        log = boot(xen, build_early(ups).data, AMD_CPU, NO_DIGEST)
        assert log.attempts == ((QEMU_AMD_REV, 0x08001250),), log.microcode_lines()
        chosen = select(ups, CpuId(Vendor.AMD, AMD_CPU.signature)).chosen
        assert chosen is not None and chosen.revision == 0x08001250


def test_the_ucode_option_xenlab_advises_is_the_one_that_works(
    xen: Path, main_initrd: bytes
) -> None:
    early = build_early(updates_of(INTEL_ALL), main_initrd).data
    cases = [
        # (modules 1.., index of the microcode module, the vendor bundle alone?)
        ([early], 1),
        ([INTEL_ALL], 1),  # a raw bundle: ucode=N, scan only finds cpio archives
        ([main_initrd, INTEL_ALL], 2),
    ]
    for modules, index in cases:
        scanned = scan_buffer(modules[index - 1], f"module{index}")
        advice = advise(scanned, module_index=index)
        assert advice.ok and advice.option is not None, advice.problems
        log = xen_boot.boot(modules, INTEL_CPU, xen_args=advice.option, xen=xen)
        assert log.attempts == ((QEMU_INTEL_REV, 0x43A),), (advice.option, log.microcode_lines())
    # Microcode only in a compressed archive: xenlab says it will not be seen, and it is not.
    hidden = gzip.compress(builders.early_cpio(INTEL_NEW), mtime=0) + main_initrd
    advice = advise(scan_buffer(hidden, "hidden"))
    assert not advice.ok and any("compressed" in p for p in advice.problems)
    assert boot(xen, hidden, INTEL_CPU).microcode_lines() == ()


# ------------------------------------------------------------ what Xen does not find


def _other_cpio() -> bytes:
    return write_newc([CpioMember("etc/hostname", b"xenlab\n")], align=512)


LAYOUTS: dict[str, tuple[Callable[[bytes], bytes], bool]] = {
    # name: (image from the Intel bundle, whether the early loaders find it)
    "early-first": (lambda b: builders.early_cpio(b), True),
    "after-another-uncompressed-archive": (lambda b: _other_cpio() + builders.early_cpio(b), True),
    "dot-slash-names": (lambda b: builders.early_cpio(b, prefix="./"), False),
    "gzip-compressed": (lambda b: gzip.compress(builders.early_cpio(b), mtime=0), False),
    "compressed-after-uncompressed": (
        lambda b: _other_cpio() + gzip.compress(builders.early_cpio(b), mtime=0),
        False,
    ),
    # find_cpio_data compares only the name's first strlen(name) bytes.
    "name-with-a-suffix": (
        lambda b: write_newc(
            [CpioMember("kernel/x86/microcode/GenuineIntel.bin.old", b)], align=512
        ),
        True,
    ),
    "directory-only": (
        lambda b: write_newc(
            [CpioMember("kernel/x86/microcode/GenuineIntel.bin", mode=0o040755)], align=512
        ),
        False,
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_xen_finds_exactly_what_xenlab_scan_calls_early(
    xen: Path, main_initrd: bytes, layout: str
) -> None:
    make, found = LAYOUTS[layout]
    image = make(INTEL_NEW) + main_initrd
    log = boot(xen, image, INTEL_CPU)

    assert log.bsp_revision == QEMU_INTEL_REV  # the loader ran either way
    if found:
        assert log.attempts == ((QEMU_INTEL_REV, 0x43A),), log.microcode_lines()
    else:
        # Not a word about a blob or a patch: Xen found nothing to parse.
        assert log.microcode_lines() == ()
    # xenlab's early-only scan agrees with Xen.
    assert xenlab_early(image, Vendor.INTEL) == ([0x43A] if found else [])


def test_amd_container_in_a_compressed_part_is_not_found(xen: Path, main_initrd: bytes) -> None:
    early = builders.early_cpio(amd_blob=builders.AMD_CONTAINER)
    image = gzip.compress(early, mtime=0) + main_initrd
    log = boot(xen, image, AMD_CPU, NO_DIGEST)
    assert log.bsp_revision == QEMU_AMD_REV
    assert log.microcode_lines() == ()
    assert xenlab_early(image, Vendor.AMD) == []


# ------------------------------------------------------------ real files


def _qemu_cpu(vendor: Vendor, signature: int) -> QemuCpu | None:
    """The QEMU CPU showing ``signature``, or None if -cpu cannot (processor type bits)."""
    if signature >> 12 & 0x3 or signature >> 28:
        return None
    family, model, stepping = fms_from_signature(signature)
    cpu = QemuCpu(
        "GenuineIntel" if vendor is Vendor.INTEL else "AuthenticAMD", family, model, stepping
    )
    return cpu if cpu.signature == signature else None


def test_xen_and_xenlab_choose_the_same_real_update_for_every_cpu(
    xen: Path, shared_data: Path, main_initrd: bytes
) -> None:
    ups: list[Update] = []
    for path in sorted((shared_data / "microcode").rglob("*")):
        if path.is_file() and not path.name.endswith((".txt", ".amd-ucode")):
            ups += scan_buffer(path.read_bytes(), path.name).updates
    image = build_early(ups, main_initrd).data
    assert len(image) > 500_000

    cpus = sorted({(u.vendor, s) for u in ups for s in u.signatures}, key=str)
    loaded: dict[Vendor, int] = {Vendor.INTEL: 0, Vendor.AMD: 0}
    not_loaded = 0
    for vendor, sig in cpus:
        cpu = _qemu_cpu(vendor, sig)
        if cpu is None:
            continue  # 06-03-02's 0x1632: QEMU cannot set the processor type bits
        running = QEMU_INTEL_REV if vendor is Vendor.INTEL else QEMU_AMD_REV
        pf = TCG_PF if vendor is Vendor.INTEL else None
        sel = select(ups, CpuId(vendor, sig, pf, microcode_revision=running))
        log = boot(xen, image, cpu, NO_DIGEST if vendor is Vendor.AMD else "ucode=scan")
        if sel.chosen is None or sel.note:
            assert log.microcode_lines() == (), f"{vendor.value} {sig:#x}"
            not_loaded += 1
        else:
            want = ((running, sel.chosen.unsigned_revision),)
            assert log.attempts == want, (f"{vendor.value} {sig:#x}", log.microcode_lines())
            loaded[vendor] += 1
    # Every AMD CPU in the containers, the Intel ones whose masks have bit 0
    # (extended signatures included), and 06-9a-04/06-c5-02 (pf 0x40/0x80/0x82) not.
    assert loaded[Vendor.AMD] >= 20 and loaded[Vendor.INTEL] >= 10
    assert not_loaded >= 4
