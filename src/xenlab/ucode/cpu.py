"""CPU identities for microcode selection: ``CpuId``, from ``parse_cpu_spec`` or ``this_cpu``.

A microcode update names the CPUs it fits by the CPUID leaf 1 EAX value (the
*signature*) and, on Intel, by a mask of platform ids.  This module converts
signatures to and from the display family/model/stepping that ``/proc/cpuinfo``
and firmware file names (``06-9a-04``) use, parses a ``--cpu`` option, parses
``/proc/cpuinfo`` text, and reads the identity of the running machine.

Signature layout (CPUID leaf 1 EAX; Intel SDM vol. 2A, CPUID; AMD APM vol. 3)::

    bits  3:0   stepping
    bits  7:4   model
    bits 11:8   family
    bits 13:12  processor type (Intel; ignored here)
    bits 19:16  extended model
    bits 27:20  extended family

The display family is ``family + ext_family`` only when ``family == 0xf``; the
display model is ``ext_model << 4 | model`` only when ``family`` is 6 or 0xf.

Vendor inference (used when a spec has no ``intel:``/``amd:`` prefix): every
CPU that takes Intel microcode updates in the ``intel-ucode`` collection is
family 6 or base family 0xf with extended family 0 (display family 0xf), and
every AMD CPU with loadable microcode is display family 0x10 or above (AMD
containers start at family 10h).  Anything else is left ``None``.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xenlab.errors import ParseError, StateError, XenlabError
from xenlab.files import CONFIG_LIMIT, InputTooLargeError, read_bounded

__all__ = [
    "CpuId",
    "Vendor",
    "fms_from_signature",
    "infer_vendor",
    "parse_cpu_spec",
    "parse_cpuinfo",
    "signature_from_fms",
    "this_cpu",
]

#: Largest display family a signature can hold: 0xf + 0xff.
MAX_FAMILY = 0xF + 0xFF

# The processor type bits (13:12) and reserved bits are not part of what
# fms_from_signature reads; a signature rebuilt from F/M/S has them clear.
_FMS_BITS = 0x0FFF0FFF


class Vendor(enum.Enum):
    """The CPU vendors whose microcode xenlab handles."""

    INTEL = "intel"
    AMD = "amd"


#: CPUID leaf 0 vendor strings (EBX, EDX, ECX) and the ``vendor_id`` of /proc/cpuinfo.
_VENDOR_IDS: dict[str, Vendor] = {
    "GenuineIntel": Vendor.INTEL,
    "AuthenticAMD": Vendor.AMD,
}


def signature_from_fms(family: int, model: int, stepping: int) -> int:
    """The CPUID leaf 1 EAX value for display *family*, *model* and *stepping*.

    Raises ``ValueError`` for values no signature can hold: a family above
    0x10e, a stepping above 0xf, a model above 0xff, or a model above 0xf for
    a family whose signature has no room for the extended model (not 6, not
    0xf and above).
    """
    if not 0 <= family <= MAX_FAMILY:
        raise ValueError(f"family {family:#x} out of range 0..{MAX_FAMILY:#x}")
    if not 0 <= stepping <= 0xF:
        raise ValueError(f"stepping {stepping:#x} out of range 0..0xf")
    if not 0 <= model <= 0xFF:
        raise ValueError(f"model {model:#x} out of range 0..0xff")
    if family >= 0xF:
        base_family, ext_family = 0xF, family - 0xF
    else:
        base_family, ext_family = family, 0
    if base_family in (6, 0xF):
        base_model, ext_model = model & 0xF, model >> 4
    elif model > 0xF:
        raise ValueError(
            f"model {model:#x} needs the extended model field, "
            f"which family {family:#x} does not use"
        )
    else:
        base_model, ext_model = model, 0
    return ext_family << 20 | ext_model << 16 | base_family << 8 | base_model << 4 | stepping


def fms_from_signature(signature: int) -> tuple[int, int, int]:
    """The display (family, model, stepping) of a CPUID leaf 1 EAX value."""
    stepping = signature & 0xF
    base_model = (signature >> 4) & 0xF
    base_family = (signature >> 8) & 0xF
    ext_model = (signature >> 16) & 0xF
    ext_family = (signature >> 20) & 0xFF
    family = base_family + ext_family if base_family == 0xF else base_family
    model = ext_model << 4 | base_model if base_family in (6, 0xF) else base_model
    return family, model, stepping


def infer_vendor(signature: int) -> Vendor | None:
    """The vendor a signature must belong to, or ``None`` when it fits neither or both."""
    family, _, _ = fms_from_signature(signature)
    if family in (6, 0xF):
        return Vendor.INTEL
    if family >= 0x10:
        return Vendor.AMD
    return None


@dataclass(frozen=True, slots=True)
class CpuId:
    """A CPU as microcode selection sees it.

    ``platform_mask`` is Intel's ``1 << platform_id`` (or, from a ``--cpu``
    option, any mask: an update matches when the masks share a bit), ``None``
    when unknown or not applicable.  ``source`` says where the values came
    from, e.g. ``"command line"``, ``"cpuinfo"``, ``"cpuinfo+cpuid+msr"``.
    """

    vendor: Vendor | None
    signature: int
    platform_mask: int | None = None
    microcode_revision: int | None = None
    source: str = "command line"

    @property
    def family(self) -> int:
        """Display family (``cpu family`` in /proc/cpuinfo)."""
        return fms_from_signature(self.signature)[0]

    @property
    def model(self) -> int:
        """Display model (``model`` in /proc/cpuinfo)."""
        return fms_from_signature(self.signature)[1]

    @property
    def stepping(self) -> int:
        """Stepping (``stepping`` in /proc/cpuinfo)."""
        return fms_from_signature(self.signature)[2]

    @property
    def firmware_name(self) -> str:
        """The Intel firmware file name for this CPU, e.g. ``06-9a-04``."""
        family, model, stepping = fms_from_signature(self.signature)
        return f"{family:02x}-{model:02x}-{stepping:02x}"


# --------------------------------------------------------------------------
# --cpu option
# --------------------------------------------------------------------------

_SPEC_SOURCE = "--cpu"
_HEX = re.compile(r"(0[xX])?([0-9a-fA-F]+)")
_FMS = re.compile(r"([0-9a-fA-F]{1,3})-([0-9a-fA-F]{1,2})-([0-9a-fA-F]{1,2})")


def _spec_error(col: int, message: str) -> ParseError:
    return ParseError.at(_SPEC_SOURCE, 1, col, message)


def _hex_field(text: str, start: int, end: int, what: str, limit: int) -> int:
    """The hex number in ``text[start:end]`` (``0x`` optional), at most *limit*."""
    field = text[start:end]
    col = start + 1
    if not field:
        raise _spec_error(col, f"empty {what}, expected a hex number")
    match = _HEX.fullmatch(field)
    if match is None:
        digits_at = 2 if field[:2].lower() == "0x" else 0
        bad = next(
            (i for i in range(digits_at, len(field)) if field[i] not in "0123456789abcdefABCDEF"),
            digits_at,
        )
        found = repr(field[bad]) if bad < len(field) else "nothing"
        raise _spec_error(col + bad, f"{what}: found {found}, expected a hex digit")
    value = int(match.group(2), 16)
    if value > limit:
        raise _spec_error(col, f"{what} {field} is larger than {limit:#x}")
    return value


def parse_cpu_spec(text: str) -> CpuId:
    """Parse a ``--cpu`` value: a signature, an optional platform mask, an optional vendor.

    Accepted forms (hex throughout, ``0x`` optional; prefix ``intel:`` or
    ``amd:`` optional and case-insensitive)::

        0x906a4            signature (CPUID leaf 1 EAX), all 32 bits kept
        0x906a4,0x80       signature and platform MASK (as iucode_tool's -s)
        06-9a-04           display family-model-stepping, as firmware files are
                           named (type bits 13:12 are 0: 06-03-02 gives 0x632,
                           while the update in that file is for 0x1632)
        intel:0x906a4,0x80
        amd:0x800f12

    Without a prefix the vendor is inferred (see the module docstring); a
    platform mask only exists on Intel, so ``amd:`` with a mask is refused and
    an unprefixed mask on a family that is not clearly AMD means Intel.
    Raises ``ParseError`` at ``--cpu:1:COL`` for anything else.
    """
    vendor: Vendor | None = None
    start = 0
    head, colon, _ = text.partition(":")
    if colon:
        try:
            vendor = Vendor(head.lower())
        except ValueError:
            raise _spec_error(
                1, f"unknown vendor {head!r}, expected 'intel:' or 'amd:' (or no prefix)"
            ) from None
        start = len(head) + 1
    body = text[start:]
    if not body:
        raise _spec_error(start + 1, "empty CPU, expected a signature such as 0x906a4 or 06-9a-04")
    if any(c.isspace() for c in body):
        at = next(i for i, c in enumerate(body) if c.isspace())
        raise _spec_error(start + at + 1, "unexpected blank in a CPU spec")

    platform_mask: int | None = None
    mask_col = 0
    fms = _FMS.fullmatch(body)
    if fms is not None:
        family, model, stepping = (int(g, 16) for g in fms.groups())
        try:
            signature = signature_from_fms(family, model, stepping)
        except ValueError as err:
            raise _spec_error(start + 1, f"{body}: {err}") from None
    elif "-" in body:
        raise _spec_error(
            start + 1,
            f"{body!r} is not family-model-stepping, expected hex like 06-9a-04",
        )
    else:
        sig_text, comma, rest = body.partition(",")
        sig_end = start + len(sig_text)
        mask_col = sig_end + 2
        signature = _hex_field(text, start, sig_end, "signature", 0xFFFFFFFF)
        if comma:
            if "," in rest:
                extra = sig_end + 1 + rest.index(",")
                raise _spec_error(
                    extra + 1, "unexpected ',', expected only signature[,platform mask]"
                )
            platform_mask = _hex_field(text, sig_end + 1, len(text), "platform mask", 0xFF)
            if platform_mask == 0:
                raise _spec_error(mask_col, "platform mask 0 matches no platform")

    if vendor is None:
        vendor = infer_vendor(signature)
        if platform_mask is not None and vendor is None:
            vendor = Vendor.INTEL
        elif platform_mask is not None and vendor is Vendor.AMD:
            # Intel has shipped display families above 0xf too; with a mask the
            # spec reads as Intel's, so say nothing rather than guess.
            vendor = None
    elif vendor is Vendor.AMD and platform_mask is not None:
        raise _spec_error(
            mask_col,
            "AMD CPUs have no platform id, expected no platform mask after amd:",
        )
    return CpuId(vendor, signature, platform_mask, None, "command line")


# --------------------------------------------------------------------------
# /proc/cpuinfo
# --------------------------------------------------------------------------

_CPUINFO_FIELDS = ("processor", "vendor_id", "cpu family", "model", "stepping", "microcode")


def _cpuinfo_int(value: str, base: int, source: str, line: int, col: int, key: str) -> int:
    try:
        return int(value, base)  # base 16 also takes the 0x prefix Linux prints
    except ValueError:
        kind = "hex" if base == 16 else "decimal"
        raise ParseError.at(
            source, line, col, f"{key}: found {value!r}, expected a {kind} number"
        ) from None


def _cpu_from_block(fields: dict[str, tuple[str, int, int]], source: str) -> CpuId | None:
    """One processor block's CpuId, or None when it has no x86 identity."""
    if "cpu family" not in fields or "model" not in fields:
        return None
    vendor_text = fields.get("vendor_id", ("", 0, 0))[0]
    vendor = _VENDOR_IDS.get(vendor_text)
    fam_text, fam_line, fam_col = fields["cpu family"]
    mod_text, mod_line, mod_col = fields["model"]
    family = _cpuinfo_int(fam_text, 10, source, fam_line, fam_col, "cpu family")
    model = _cpuinfo_int(mod_text, 10, source, mod_line, mod_col, "model")
    stepping = 0
    if "stepping" in fields:
        st_text, st_line, st_col = fields["stepping"]
        # Linux prints "unknown" when CPUID gave no stepping (very old parts).
        if st_text != "unknown":
            stepping = _cpuinfo_int(st_text, 10, source, st_line, st_col, "stepping")
    revision: int | None = None
    if "microcode" in fields:
        mc_text, mc_line, mc_col = fields["microcode"]
        revision = _cpuinfo_int(mc_text, 16, source, mc_line, mc_col, "microcode")
    try:
        signature = signature_from_fms(family, model, stepping)
    except ValueError as err:
        raise ParseError.at(source, fam_line, fam_col, str(err)) from None
    return CpuId(vendor, signature, None, revision, "cpuinfo")


def parse_cpuinfo(text: str, source: str = "/proc/cpuinfo") -> tuple[CpuId, ...]:
    """The distinct CPUs described by an x86 ``/proc/cpuinfo`` text, in first-seen order.

    Reads ``vendor_id``, ``cpu family``, ``model``, ``stepping`` and
    ``microcode`` of each processor block (blocks are separated by blank
    lines).  Two processors with the same vendor, signature and revision are
    one CPU here; a machine in the middle of a late load shows two.  Blocks
    without ``cpu family`` (other architectures, trailing text) are skipped;
    a malformed number raises ``ParseError`` at its line and column.
    """
    cpus: dict[CpuId, None] = {}
    fields: dict[str, tuple[str, int, int]] = {}
    lines = text.splitlines()
    for lineno, line in enumerate([*lines, ""], start=1):
        if not line.strip():
            if fields:
                cpu = _cpu_from_block(fields, source)
                if cpu is not None:
                    cpus.setdefault(cpu)
                fields = {}
            continue
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or key not in _CPUINFO_FIELDS:
            continue
        if key == "processor" and fields:
            # A new block without a blank line before it (hand-edited text):
            # close the previous one so two CPUs do not merge.
            cpu = _cpu_from_block(fields, source)
            if cpu is not None:
                cpus.setdefault(cpu)
            fields = {}
        stripped = value.strip()
        col = len(line) - len(value.lstrip()) + 1 if stripped else len(line) + 1
        fields[key] = (stripped, lineno, col)
    return tuple(cpus)


# --------------------------------------------------------------------------
# The running machine
# --------------------------------------------------------------------------


def _pread(path: Path, size: int, offset: int) -> bytes | None:
    """*size* bytes at *offset* of a device file, or None if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, offset)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def _read_text(path: Path) -> str | None:
    """A small text file under the root, or None if it cannot be read.

    Bounded: under ``--root`` any of these may be a huge file or a device;
    past ``CONFIG_LIMIT`` (16 MiB; a 1024-CPU cpuinfo is under 2 MB) it is
    an ``InputTooLargeError``, not something to read through.
    """
    try:
        return read_bounded(path, CONFIG_LIMIT, what="CPU information").decode("ascii", "replace")
    except InputTooLargeError:
        raise
    except XenlabError:
        return None


def this_cpu(root: Path = Path("/")) -> CpuId:
    """The identity of CPU 0 of the machine whose root file system is *root*.

    Uses what is readable, best first, and names each part in ``source``:

    * ``proc/cpuinfo``: vendor, signature from family/model/stepping, revision;
    * ``dev/cpu/0/cpuid`` (the cpuid driver; root): CPUID leaf 1 EAX, the exact
      signature including the type bits cpuinfo does not show (without
      cpuinfo, the vendor is inferred from it);
    * ``sys/devices/system/cpu/cpu0/microcode/processor_flags`` (Intel; Linux
      prints the platform MASK there) or ``dev/cpu/0/msr`` MSR 0x17
      (IA32_PLATFORM_ID, bits 52:50 = platform id) for the platform mask;
    * ``sys/devices/system/cpu/cpu0/microcode/version`` for the revision when
      cpuinfo has none.

    Raises ``StateError`` when neither cpuinfo nor the cpuid device gives a CPU.
    """
    parts: list[str] = []
    vendor: Vendor | None = None
    signature: int | None = None
    revision: int | None = None

    cpuinfo_path = root / "proc" / "cpuinfo"
    cpuinfo = _read_text(cpuinfo_path)
    if cpuinfo is not None:
        cpus = parse_cpuinfo(cpuinfo, source=str(cpuinfo_path))
        if cpus:
            vendor, signature, revision = (
                cpus[0].vendor,
                cpus[0].signature,
                cpus[0].microcode_revision,
            )
            parts.append("cpuinfo")

    cpuid_path = root / "dev" / "cpu" / "0" / "cpuid"
    # The cpuid driver maps the file offset to the leaf: 16 bytes = EAX, EBX, ECX, EDX.
    leaf1 = _pread(cpuid_path, 16, 1)
    if leaf1 is not None:
        signature = int.from_bytes(leaf1[0:4], "little")
        if vendor is None:
            vendor = infer_vendor(signature)
        parts.append("cpuid")

    if signature is None:
        raise StateError(
            f"cannot identify the CPU under {root}: neither {cpuinfo_path} "
            f"(with an x86 processor) nor {cpuid_path} is readable; "
            "give the CPU explicitly, e.g. --cpu 0x906a4,0x80"
        )

    microcode_dir = root / "sys" / "devices" / "system" / "cpu" / "cpu0" / "microcode"
    if revision is None:
        version = _read_text(microcode_dir / "version")
        if version is not None:
            try:
                revision = int(version.strip(), 0)
                parts.append("sysfs version")
            except ValueError:
                pass

    platform_mask: int | None = None
    if vendor is Vendor.INTEL:
        flags = _read_text(microcode_dir / "processor_flags")
        if flags is not None:
            try:
                platform_mask = int(flags.strip(), 0)
                parts.append("sysfs processor_flags")
            except ValueError:
                platform_mask = None
        if platform_mask is None:
            msr = _pread(root / "dev" / "cpu" / "0" / "msr", 8, 0x17)
            if msr is not None:
                platform_id = (int.from_bytes(msr, "little") >> 50) & 0x7
                platform_mask = 1 << platform_id
                parts.append("msr 0x17")

    return CpuId(vendor, signature, platform_mask, revision, "+".join(parts))
