"""Tests of xenlab.ucode.cpu: signatures, --cpu specs, /proc/cpuinfo, the running machine."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.errors import ParseError, StateError
from xenlab.files import InputTooLargeError
from xenlab.ucode.cpu import (
    CpuId,
    Vendor,
    fms_from_signature,
    infer_vendor,
    parse_cpu_spec,
    parse_cpuinfo,
    signature_from_fms,
    this_cpu,
)

# --------------------------------------------------------------------------
# /proc/cpuinfo samples, in the layout Linux prints (arch/x86/kernel/cpu/proc.c):
# tab-padded keys, one block per logical CPU, a blank line after each block.
# --------------------------------------------------------------------------


def _block(
    n: int,
    vendor: str,
    family: int,
    model: int,
    name: str,
    stepping: str,
    microcode: str | None,
) -> str:
    lines = [
        f"processor\t: {n}",
        f"vendor_id\t: {vendor}",
        f"cpu family\t: {family}",
        f"model\t\t: {model}",
        f"model name\t: {name}",
        f"stepping\t: {stepping}",
    ]
    if microcode is not None:
        lines.append(f"microcode\t: {microcode}")
    lines += [
        "cpu MHz\t\t: 2400.000",
        "cache size\t: 30720 KB",
        f"physical id\t: {n // 2}",
        "siblings\t: 2",
        f"core id\t\t: {n % 2}",
        "fpu\t\t: yes",
        "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov",
        "bugs\t\t: spectre_v1 spectre_v2",
        "bogomips\t: 4800.00",
        "clflush size\t: 64",
        "address sizes\t: 46 bits physical, 48 bits virtual",
        "power management:",
        "",
    ]
    return "\n".join(lines) + "\n"


ALDER_LAKE = "".join(
    _block(n, "GenuineIntel", 6, 154, "12th Gen Intel(R) Core(TM) i7-1260P", "3", "0x432")
    for n in range(4)
)
SKYLAKE_SP = "".join(
    _block(n, "GenuineIntel", 6, 85, "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", "4", "0x2007006")
    for n in range(2)
)
NETBURST = _block(0, "GenuineIntel", 15, 4, "Intel(R) Pentium(R) 4 CPU 3.00GHz", "8", "0x14")
EPYC_MILAN = "".join(
    _block(n, "AuthenticAMD", 25, 1, "AMD EPYC 7763 64-Core Processor", "1", "0xa0011d1")
    for n in range(2)
)
RYZEN_ZEN2 = _block(
    0, "AuthenticAMD", 23, 113, "AMD Ryzen 5 3600 6-Core Processor", "0", "0x8701021"
)
# A guest without a microcode line (some hypervisors hide it).
KVM_GUEST = _block(0, "GenuineIntel", 6, 106, "Intel Xeon Processor (Icelake)", "6", None)
# Two sockets whose microcode differs: a machine between late loads.
MIXED = _block(0, "GenuineIntel", 6, 85, "Xeon", "4", "0x2006e05") + _block(
    1, "GenuineIntel", 6, 85, "Xeon", "4", "0x2007006"
)
ARM64 = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

"""


@pytest.mark.parametrize(
    ("text", "vendor", "signature", "revision", "fms"),
    [
        (ALDER_LAKE, Vendor.INTEL, 0x906A3, 0x432, (6, 0x9A, 3)),
        (SKYLAKE_SP, Vendor.INTEL, 0x50654, 0x2007006, (6, 0x55, 4)),
        (NETBURST, Vendor.INTEL, 0xF48, 0x14, (0xF, 4, 8)),
        (EPYC_MILAN, Vendor.AMD, 0xA00F11, 0xA0011D1, (0x19, 1, 1)),
        (RYZEN_ZEN2, Vendor.AMD, 0x870F10, 0x8701021, (0x17, 0x71, 0)),
        (KVM_GUEST, Vendor.INTEL, 0x606A6, None, (6, 0x6A, 6)),
    ],
)
def test_parse_cpuinfo_samples(
    text: str, vendor: Vendor, signature: int, revision: int | None, fms: tuple[int, int, int]
) -> None:
    (cpu,) = parse_cpuinfo(text)
    assert cpu == CpuId(vendor, signature, None, revision, "cpuinfo")
    assert (cpu.family, cpu.model, cpu.stepping) == fms


def test_parse_cpuinfo_keeps_distinct_cpus_in_order() -> None:
    cpus = parse_cpuinfo(MIXED)
    assert [c.microcode_revision for c in cpus] == [0x2006E05, 0x2007006]
    assert {c.signature for c in cpus} == {0x50654}


def test_parse_cpuinfo_blocks_without_blank_line_do_not_merge() -> None:
    text = MIXED.replace("power management:\n\nprocessor", "power management:\nprocessor")
    assert len(parse_cpuinfo(text)) == 2


def test_parse_cpuinfo_other_architectures_and_vendors() -> None:
    assert parse_cpuinfo(ARM64) == ()
    assert parse_cpuinfo("") == ()
    (hygon,) = parse_cpuinfo(_block(0, "HygonGenuine", 24, 0, "Hygon C86", "1", "0x900006"))
    assert hygon.vendor is None
    assert hygon.signature == 0x900F01


def test_parse_cpuinfo_unknown_stepping() -> None:
    (cpu,) = parse_cpuinfo(_block(0, "GenuineIntel", 6, 1, "Pentium Pro", "unknown", None))
    assert cpu.signature == 0x610


def test_parse_cpuinfo_errors_have_places() -> None:
    text = SKYLAKE_SP.replace("model\t\t: 85", "model\t\t: 8x5", 1)
    with pytest.raises(ParseError) as err:
        parse_cpuinfo(text, source="cpuinfo.txt")
    assert (err.value.source, err.value.line, err.value.col) == ("cpuinfo.txt", 4, 10)
    assert "expected a decimal number" in err.value.message
    text = SKYLAKE_SP.replace("microcode\t: 0x2007006", "microcode\t: 0xzz", 1)
    with pytest.raises(ParseError) as err:
        parse_cpuinfo(text)
    assert (err.value.line, err.value.col) == (7, 13)
    # family 5 has no extended model field: model 0x20 cannot be encoded
    with pytest.raises(ParseError, match="extended model") as err:
        parse_cpuinfo(_block(0, "GenuineIntel", 5, 32, "Quark?", "0", None))
    assert err.value.line == 3


# --------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signature", "fms"),
    [
        (0x906A4, (6, 0x9A, 4)),
        (0x632, (6, 3, 2)),
        (0x106A4, (6, 0x1A, 4)),
        (0xF48, (0xF, 4, 8)),
        (0x800F12, (0x17, 1, 2)),
        (0x100F22, (0x10, 2, 2)),
        (0xA10F11, (0x19, 0x11, 1)),
        (0xFFF0FFF, (0x10E, 0xFF, 0xF)),
        (0x543, (5, 4, 3)),
    ],
)
def test_signature_examples(signature: int, fms: tuple[int, int, int]) -> None:
    assert fms_from_signature(signature) == fms
    assert signature_from_fms(*fms) == signature


def test_fms_ignores_type_and_reserved_bits() -> None:
    # Intel OverDrive processors set type 1 (bit 12); reserved bits 31:28.
    assert fms_from_signature(0xF00016A3) == (6, 0xA, 3)
    # 06-03-02's update is for 0x1632: type 1 (OverDrive), which F-M-S cannot say.
    assert fms_from_signature(0x1632) == (6, 3, 2)
    assert signature_from_fms(6, 3, 2) == 0x632
    # Only family 6 and 0xf use the extended model.
    assert fms_from_signature(0x10543) == (5, 4, 3)


@pytest.mark.parametrize(
    ("fms", "match"),
    [
        ((0x10F, 0, 0), "family"),
        ((6, 0x100, 0), "model"),
        ((6, 0, 0x10), "stepping"),
        ((5, 0x10, 0), "extended model"),
        ((-1, 0, 0), "family"),
    ],
)
def test_signature_from_fms_rejects(fms: tuple[int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        signature_from_fms(*fms)


_families = st.integers(0, 0x10E)


@st.composite
def _fms(draw: st.DrawFn) -> tuple[int, int, int]:
    family = draw(_families)
    wide = family == 6 or family >= 0xF
    model = draw(st.integers(0, 0xFF if wide else 0xF))
    return family, model, draw(st.integers(0, 0xF))


@given(_fms())
def test_fms_round_trip(fms: tuple[int, int, int]) -> None:
    assert fms_from_signature(signature_from_fms(*fms)) == fms


@given(st.integers(0, 0xFFFFFFFF))
def test_signature_round_trip(signature: int) -> None:
    rebuilt = signature_from_fms(*fms_from_signature(signature))
    base_family = (signature >> 8) & 0xF
    keep = 0x0FFF0FFF
    if base_family != 0xF:
        keep &= ~0x0FF00000  # ext family only counts with family 0xf
    if base_family not in (6, 0xF):
        keep &= ~0x000F0000  # ext model only counts with family 6 and 0xf
    assert rebuilt == signature & keep


@given(_fms())
def test_firmware_name_round_trip(fms: tuple[int, int, int]) -> None:
    cpu = CpuId(None, signature_from_fms(*fms))
    assert parse_cpu_spec(cpu.firmware_name).signature == cpu.signature


def test_infer_vendor() -> None:
    assert infer_vendor(0x906A4) is Vendor.INTEL
    assert infer_vendor(0xF48) is Vendor.INTEL
    assert infer_vendor(0x800F12) is Vendor.AMD
    assert infer_vendor(0x100F22) is Vendor.AMD
    assert infer_vendor(0x543) is None  # family 5: Intel P5 or AMD K6, no loadable microcode


# --------------------------------------------------------------------------
# --cpu specs
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x906a4", CpuId(Vendor.INTEL, 0x906A4)),
        ("906a4", CpuId(Vendor.INTEL, 0x906A4)),
        ("0X906A4", CpuId(Vendor.INTEL, 0x906A4)),
        ("0x906a4,0x80", CpuId(Vendor.INTEL, 0x906A4, 0x80)),
        ("0x906a4,c0", CpuId(Vendor.INTEL, 0x906A4, 0xC0)),
        ("06-9a-04", CpuId(Vendor.INTEL, 0x906A4)),
        ("6-9A-4", CpuId(Vendor.INTEL, 0x906A4)),
        ("0f-04-08", CpuId(Vendor.INTEL, 0xF48)),
        ("17-01-02", CpuId(Vendor.AMD, 0x800F12)),
        ("intel:0x906a4,0x80", CpuId(Vendor.INTEL, 0x906A4, 0x80)),
        ("INTEL:06-9a-04", CpuId(Vendor.INTEL, 0x906A4)),
        ("amd:0x800f12", CpuId(Vendor.AMD, 0x800F12)),
        ("0x800f12", CpuId(Vendor.AMD, 0x800F12)),
        ("amd:0x906a4", CpuId(Vendor.AMD, 0x906A4)),  # the prefix wins over inference
        ("0x543", CpuId(None, 0x543)),
        ("0x543,0x1", CpuId(Vendor.INTEL, 0x543, 0x1)),  # only Intel has platform ids
        ("0x800f12,0x1", CpuId(None, 0x800F12, 0x1)),  # an AMD family with an Intel mask
    ],
)
def test_parse_cpu_spec(text: str, expected: CpuId) -> None:
    cpu = parse_cpu_spec(text)
    assert cpu == expected
    assert cpu.source == "command line"


@pytest.mark.parametrize(
    ("text", "col", "words"),
    [
        ("", 1, "empty CPU"),
        ("amd:", 5, "empty CPU"),
        ("via:0x6f1", 1, "unknown vendor 'via'"),
        ("0x90g6a4", 5, "found 'g'"),
        ("0x", 3, "found nothing"),
        ("0x906a4,", 9, "empty platform mask"),
        ("0x906a4,0x0", 9, "matches no platform"),
        ("0x906a4,0x100", 9, "larger than 0xff"),
        ("0x906a4,0x80,0x3", 13, "unexpected ','"),
        ("0x1ffffffff", 1, "larger than 0xffffffff"),
        ("intel:0x906a4,zz", 15, "found 'z'"),
        ("amd:0x800f12,0x2", 14, "no platform id"),
        ("06-9a", 1, "family-model-stepping"),
        ("05-20-00", 1, "extended model"),
        ("0x906a4 ", 8, "blank"),
    ],
)
def test_parse_cpu_spec_errors(text: str, col: int, words: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_cpu_spec(text)
    assert (err.value.source, err.value.line, err.value.col) == ("--cpu", 1, col)
    assert words in err.value.message
    assert str(err.value).startswith(f"--cpu:1:{col}: ")


@given(st.integers(0, 0xFFFFFFFF), st.one_of(st.none(), st.integers(1, 0xFF)))
def test_parse_cpu_spec_round_trip(signature: int, mask: int | None) -> None:
    text = f"{signature:#x}" + ("" if mask is None else f",{mask:#x}")
    cpu = parse_cpu_spec(f"intel:{text}")
    assert (cpu.vendor, cpu.signature, cpu.platform_mask) == (Vendor.INTEL, signature, mask)
    assert parse_cpu_spec(text).signature == signature


@given(st.text(max_size=30))
def test_parse_cpu_spec_only_raises_parse_error(text: str) -> None:
    try:
        cpu = parse_cpu_spec(text)
    except ParseError as err:
        assert 1 <= err.col <= len(text) + 1
    else:
        assert 0 <= cpu.signature <= 0xFFFFFFFF


# --------------------------------------------------------------------------
# this_cpu on fixture trees
# --------------------------------------------------------------------------


def _tree(
    root: Path,
    *,
    cpuinfo: str | None = None,
    leaf1_eax: int | None = None,
    processor_flags: str | None = None,
    msr17: int | None = None,
    version: str | None = None,
) -> Path:
    """A fake root: the cpuid/msr devices are plain files whose offsets hold the leaves/MSRs."""
    if cpuinfo is not None:
        (root / "proc").mkdir(parents=True)
        (root / "proc" / "cpuinfo").write_text(cpuinfo)
    dev = root / "dev" / "cpu" / "0"
    if leaf1_eax is not None:
        dev.mkdir(parents=True, exist_ok=True)
        # The driver maps the file offset to the leaf; offset 1 is leaf 1.
        leaf1 = struct.pack("<IIII", leaf1_eax, 0x00100800, 0x7FFAFBBF, 0xBFEBFBFF)
        (dev / "cpuid").write_bytes(b"\0" + leaf1)
    if msr17 is not None:
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "msr").write_bytes(bytes(0x17) + struct.pack("<Q", msr17))
    micro = root / "sys" / "devices" / "system" / "cpu" / "cpu0" / "microcode"
    if processor_flags is not None or version is not None:
        micro.mkdir(parents=True)
    if processor_flags is not None:
        (micro / "processor_flags").write_text(processor_flags)
    if version is not None:
        (micro / "version").write_text(version)
    return root


def test_this_cpu_cpuinfo_only(tmp_path: Path) -> None:
    cpu = this_cpu(_tree(tmp_path, cpuinfo=SKYLAKE_SP))
    assert cpu == CpuId(Vendor.INTEL, 0x50654, None, 0x2007006, "cpuinfo")


def test_this_cpu_sysfs_flags(tmp_path: Path) -> None:
    root = _tree(tmp_path, cpuinfo=ALDER_LAKE, processor_flags="0x80\n")
    assert this_cpu(root) == CpuId(
        Vendor.INTEL, 0x906A3, 0x80, 0x432, "cpuinfo+sysfs processor_flags"
    )


def test_this_cpu_cpuid_and_msr(tmp_path: Path) -> None:
    # Platform id 7 in MSR 0x17 bits 52:50, other bits set to be ignored.
    root = _tree(
        tmp_path, cpuinfo=ALDER_LAKE, leaf1_eax=0x906A4, msr17=(7 << 50) | (1 << 49) | 0xFF
    )
    assert this_cpu(root) == CpuId(Vendor.INTEL, 0x906A4, 0x80, 0x432, "cpuinfo+cpuid+msr 0x17")


def test_this_cpu_cpuid_keeps_type_bits(tmp_path: Path) -> None:
    # cpuinfo cannot show the processor type bits; the cpuid device can.
    root = _tree(tmp_path, cpuinfo=SKYLAKE_SP, leaf1_eax=0x1050654, processor_flags="0x2")
    cpu = this_cpu(root)
    assert cpu.signature == 0x1050654
    assert cpu.platform_mask == 0x2
    assert cpu.source == "cpuinfo+cpuid+sysfs processor_flags"


def test_this_cpu_cpuid_without_cpuinfo(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        leaf1_eax=0x50654,
        msr17=2 << 50,
        version="0x2007006\n",
    )
    assert this_cpu(root) == CpuId(
        Vendor.INTEL, 0x50654, 0x4, 0x2007006, "cpuid+sysfs version+msr 0x17"
    )


def test_this_cpu_amd_has_no_platform_mask(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        cpuinfo=EPYC_MILAN,
        leaf1_eax=0xA00F11,
        processor_flags="0x1",
        msr17=1 << 50,
    )
    assert this_cpu(root) == CpuId(Vendor.AMD, 0xA00F11, None, 0xA0011D1, "cpuinfo+cpuid")


def test_this_cpu_short_cpuid_device_is_ignored(tmp_path: Path) -> None:
    root = _tree(tmp_path, cpuinfo=RYZEN_ZEN2)
    (root / "dev" / "cpu" / "0").mkdir(parents=True)
    (root / "dev" / "cpu" / "0" / "cpuid").write_bytes(b"\x01\x02")
    assert this_cpu(root).source == "cpuinfo"


def test_this_cpu_huge_cpuinfo_is_refused(tmp_path: Path) -> None:
    """Under --root, proc/cpuinfo may be anything: past 16 MiB it is not read through."""
    root = _tree(tmp_path, cpuinfo=ALDER_LAKE)
    with (root / "proc" / "cpuinfo").open("r+b") as f:
        f.truncate(20 << 20)
    with pytest.raises(InputTooLargeError) as exc:
        this_cpu(root)
    assert str(exc.value) == f"{root}/proc/cpuinfo: CPU information larger than 16 MiB: not read"


def test_this_cpu_nothing_readable(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot identify the CPU"):
        this_cpu(tmp_path)
    with pytest.raises(StateError, match="--cpu"):
        this_cpu(_tree(tmp_path / "arm", cpuinfo=ARM64))


# --------------------------------------------------------------------------
# The real machine
# --------------------------------------------------------------------------


def _real_cpuinfo_fms() -> tuple[str, int, int, int] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    block = text.split("\n\n")[0]
    values = {}
    for line in block.splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    if "cpu family" not in values:
        return None
    stepping = values.get("stepping", "0")
    return (
        values.get("vendor_id", ""),
        int(values["cpu family"]),
        int(values["model"]),
        0 if stepping == "unknown" else int(stepping),
    )


REAL = _real_cpuinfo_fms()


@pytest.mark.skipif(REAL is None, reason="this machine has no x86 /proc/cpuinfo")
def test_real_machine_cpuinfo() -> None:
    assert REAL is not None
    vendor_id, family, model, stepping = REAL
    cpus = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert cpus
    assert (cpus[0].family, cpus[0].model, cpus[0].stepping) == (family, model, stepping)
    expected_vendor = {"GenuineIntel": Vendor.INTEL, "AuthenticAMD": Vendor.AMD}.get(vendor_id)
    assert cpus[0].vendor is expected_vendor


@pytest.mark.skipif(REAL is None, reason="this machine has no x86 /proc/cpuinfo")
def test_real_machine_this_cpu() -> None:
    assert REAL is not None
    _, family, model, stepping = REAL
    cpu = this_cpu()
    assert (cpu.family, cpu.model, cpu.stepping) == (family, model, stepping)
    assert cpu.source.startswith("cpuinfo")
    if os.access("/dev/cpu/0/cpuid", os.R_OK):
        fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
        try:
            eax = struct.unpack("<I", os.pread(fd, 16, 1)[:4])[0]
        finally:
            os.close(fd)
        assert cpu.signature == eax
        assert "cpuid" in cpu.source.split("+")
