"""The PCI passthrough spec of xl (xl-pci-configuration(5)); the entry point is parse_pci.

:func:`parse_pci` turns a ``PCI_SPEC_STRING`` such as
``'0000:03:00.0@08,permissive=1'`` into a :class:`PciSpec` with the field
names of ``libxl_device_pci``; :func:`pci_to_libxl_json` and
:func:`format_pci` write it out, and :func:`parse_bdf` reads a bare BDF as
``xlu_pci_parse_bdf`` does. The grammar is libxlutil 4.17's
``xlu_pci_parse_spec_string``: an optional leading BDF, then ``key=value``
items; exactly one of a BDF and ``name=`` must be present, and an unknown key
is an error.  Fields start as ``libxl_device_pci_init`` leaves them, xl's
domain-wide ``pci_*`` and ``rdm=`` settings come in ``base``, and libxlutil's
quirks (``sscanf("%x")`` numbers, ``atoi`` flags into a C bool) are kept and
pinned by tests.  The design (the grammar, defaults, quirks and deviations) is
in docs/config.md, section PCI spec.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from xenlab.config.clib import HEX_DIGITS, atoi, sscanf_x
from xenlab.config.errors import ConfigError, config_error

__all__ = [
    "PCI_FUNC_ALL",
    "PciSpec",
    "RdmPolicy",
    "format_pci",
    "parse_bdf",
    "parse_pci",
    "pci_to_libxl_json",
]

#: ``vfunc_mask`` for ``BB:DD.*``: every function (LIBXL_PCI_FUNC_ALL, ~0U).
PCI_FUNC_ALL = 0xFFFF_FFFF


class RdmPolicy(enum.Enum):
    """``libxl_rdm_reserve_policy``; the value is libxl's name for it."""

    INVALID = "invalid"
    STRICT = "strict"
    RELAXED = "relaxed"


@dataclass(frozen=True, slots=True)
class PciSpec:
    """One passthrough device, with ``libxl_device_pci``'s field names.

    ``vdevfn`` is the guest devfn (``vslot << 3``); docs/config.md, section PCI
    spec, says what ``vfunc_mask`` holds and the defaults.
    """

    domain: int = 0
    bus: int = 0
    dev: int = 0
    func: int = 0
    vdevfn: int = 0
    vfunc_mask: int = 0
    msitranslate: bool = False
    power_mgmt: bool = False
    permissive: bool = False
    seize: bool = False
    rdm_policy: RdmPolicy = RdmPolicy.INVALID
    name: str | None = None

    @property
    def all_functions(self) -> bool:
        """Whether the spec named every function (``BB:DD.*``)."""
        return self.vfunc_mask == PCI_FUNC_ALL

    @property
    def vslot(self) -> int | None:
        """The guest slot asked for, or None for "any free slot"."""
        return self.vdevfn >> 3 if self.vdevfn else None

    @property
    def bdf(self) -> str:
        """The host address as ``DDDD:BB:DD.F`` (``*`` for all functions)."""
        func = "*" if self.all_functions else str(self.func)
        return f"{self.domain:04x}:{self.bus:02x}:{self.dev:02x}.{func}"


# ------------------------------------------------------------ BDF and vslot


@dataclass(frozen=True, slots=True)
class _Bdf:
    domain: int
    bus: int
    dev: int
    func: int
    vfunc_mask: int
    end: int


@dataclass(frozen=True, slots=True)
class _Fail:
    at: int  # 0-based index into the text where the problem is
    reason: str
    # libxlutil goes on with an uninitialised length here (see Deviations).
    undefined: bool = False


_BDF_FORM = "expected [DDDD:]BB:DD.F in hexadecimal, F being 0-7 or *"


def _parse_bdf(text: str, start: int) -> _Bdf | _Fail:
    """libxlutil's ``parse_bdf`` on ``text[start:]``."""
    colons = 0
    k = start
    while k < len(text) and (text[k] in HEX_DIGITS or text[k] == ":"):
        colons += text[k] == ":"
        k += 1
    if colons not in (1, 2):
        return _Fail(start, f"not a BDF or key=value, {_BDF_FORM}")
    numbers: list[int] = []
    places: list[int] = []
    pos = start
    for sep in ":" * colons + ".":
        scanned = sscanf_x(text, pos)
        if scanned is None:
            return _Fail(pos, f"expected a hexadecimal number, {_BDF_FORM}")
        places.append(pos)
        value, pos = scanned
        numbers.append(value)
        if pos >= len(text) or text[pos] != sep:
            return _Fail(pos, f"expected {sep!r}, {_BDF_FORM}", undefined=sep == ".")
        pos += 1
    if colons == 1:
        numbers.insert(0, 0)
        places.insert(0, start)
    domain, bus, dev = numbers
    limits = ((domain, 0xFFFF, "domain"), (bus, 0xFF, "bus"), (dev, 0x1F, "device"))
    for (value, limit, what), place in zip(limits, places, strict=True):
        if value > limit:
            return _Fail(place, f"{what} {value:#x} is out of range (at most {limit:#x})")
    if pos < len(text) and text[pos] == "*":
        return _Bdf(domain, bus, dev, 0, PCI_FUNC_ALL, pos + 1)
    scanned = sscanf_x(text, pos)
    if scanned is None:
        return _Fail(pos, f"expected a function number 0-7 or *, {_BDF_FORM}")
    func, end = scanned
    if func > 7:
        return _Fail(pos, f"function {func:#x} is out of range (0-7 or *)")
    return _Bdf(domain, bus, dev, func, 1, end)


def _bdf_is_undefined(text: str) -> bool:
    """Whether libxlutil's parse_bdf reads an uninitialised ``%n`` on ``text``.

    That happens when the numbers before the function parse but the ``.`` is
    missing; libxlutil's outcome then depends on stack contents, so tests that
    compare with the real library leave such inputs out.
    """
    got = _parse_bdf(text, 0)
    return isinstance(got, _Fail) and got.undefined


def _parse_vslot(text: str, start: int) -> tuple[int, int] | _Fail:
    """libxlutil's ``parse_vslot``: (vdevfn, end) or a failure."""
    scanned = sscanf_x(text, start)
    if scanned is None:
        return _Fail(start, "expected a virtual slot number in hexadecimal (0-1f)")
    value, end = scanned
    if value > 0x1F:
        return _Fail(start, f"virtual slot {value:#x} is out of range (0-1f)")
    return value << 3, end


def _ascii_lower(text: str) -> str:
    # strcasecmp in the C locale folds ASCII only; str.lower() folds more
    # (the Kelvin sign lowers to "k").
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


_RDM = {p.value: p for p in RdmPolicy}
_FLAGS = ("permissive", "msitranslate", "seize", "power_mgmt")


def _reject_nul(text: str, source: str) -> None:
    nul = text.find("\0")
    if nul >= 0:
        raise config_error(source, 1, nul + 1, "NUL character, expected text")


def parse_bdf(text: str, *, source: str = "pci bdf") -> PciSpec:
    """Read a bare BDF as ``xlu_pci_parse_bdf`` does; text after it is ignored.

    Returns a :class:`PciSpec` with ``domain``, ``bus``, ``dev``, ``func`` and
    ``vfunc_mask`` set.

    :raise ConfigError: ``text`` does not start with a valid BDF.
    """
    _reject_nul(text, source)
    got = _parse_bdf(text, 0)
    if isinstance(got, _Fail):
        raise config_error(source, 1, got.at + 1, got.reason)
    return PciSpec(
        domain=got.domain, bus=got.bus, dev=got.dev, func=got.func, vfunc_mask=got.vfunc_mask
    )


def _with_bdf(pci: PciSpec, bdf: _Bdf) -> PciSpec:
    """Return ``pci`` with the address a BDF names."""
    return replace(
        pci,
        domain=bdf.domain,
        bus=bdf.bus,
        dev=bdf.dev,
        func=bdf.func,
        vfunc_mask=bdf.vfunc_mask,
    )


def parse_pci(spec: str, *, source: str = "pci spec", base: PciSpec | None = None) -> PciSpec:
    """Parse one ``PCI_SPEC_STRING`` as libxlutil 4.17 does.

    ``base`` is the value parsing starts from (xl seeds the ``pci_*`` options
    and the ``rdm=`` policy); it defaults to libxl's initial device.

    :raise ConfigError: wherever ``xlu_pci_parse_spec_string`` fails, with
        the 1-based column of the problem in ``spec``.
    """
    _reject_nul(spec, source)
    pci = base or PciSpec()
    bdf_present = False
    name_at: int | None = None
    pos = 0
    n = len(spec)

    def fail(at: int, message: str) -> ConfigError:
        return config_error(source, 1, at + 1, message)

    first = _parse_bdf(spec, 0)
    bdf_failure: _Fail | None = None
    if isinstance(first, _Bdf):
        bdf_present = True
        pci = _with_bdf(pci, first)
        pos = first.end
        if pos < n and spec[pos] == "@":
            slot = _parse_vslot(spec, pos + 1)
            if isinstance(slot, _Fail):
                raise fail(slot.at, slot.reason)
            pci = replace(pci, vdevfn=slot[0])
            pos = slot[1]
        if pos < n and spec[pos] == ",":
            pos += 1
        elif pos < n:
            raise fail(pos, f"unexpected {spec[pos]!r} after the BDF, expected ',' or the end")
    else:
        bdf_failure = first

    def bdf_attempt() -> bool:
        # A first item without '=' was meant as a BDF: say why it is not one.
        return bdf_failure is not None and "=" not in spec.split(",", 1)[0]

    while pos < n:
        eq = spec.find("=", pos)
        if eq < 0:
            if pos == 0 and bdf_failure is not None:
                raise fail(bdf_failure.at, bdf_failure.reason)
            raise fail(pos, f"expected key=value, got {spec[pos:]!r}")
        key = spec[pos:eq]
        vstart = eq + 1
        comma = spec.find(",", vstart)
        vend = n if comma < 0 else comma
        value = spec[vstart:vend]
        key_at = pos
        pos = vend + 1 if comma >= 0 else vend
        if key == "bdf":
            got = _parse_bdf(value, 0)
            if isinstance(got, _Fail):
                raise fail(vstart + got.at, got.reason)
            bdf_present = True
            pci = _with_bdf(pci, got)
        elif key == "vslot":
            slot = _parse_vslot(value, 0)
            if isinstance(slot, _Fail):
                raise fail(vstart + slot.at, slot.reason)
            pci = replace(pci, vdevfn=slot[0])
        elif key in _FLAGS:
            flag: dict[str, Any] = {key: atoi(value) != 0}
            pci = replace(pci, **flag)
        elif key == "rdm_policy":
            policy = _RDM.get(_ascii_lower(value))
            if policy is None:
                raise fail(vstart, f"unknown rdm_policy {value!r}, expected strict or relaxed")
            pci = replace(pci, rdm_policy=policy)
        elif key == "name":
            name_at = key_at
            pci = replace(pci, name=value)
        else:
            if key_at == 0 and bdf_attempt():
                assert bdf_failure is not None
                raise fail(bdf_failure.at, bdf_failure.reason)
            raise fail(
                key_at,
                f"unknown option {key!r}, expected bdf, vslot, permissive, msitranslate, "
                "seize, power_mgmt, rdm_policy or name",
            )
    if bdf_present and name_at is not None:
        raise fail(name_at, "name= cannot be combined with a BDF, expected one of them")
    if not bdf_present and name_at is None:
        if bdf_failure is not None and n > 0 and bdf_attempt():
            raise fail(bdf_failure.at, bdf_failure.reason)
        raise fail(0, "expected a BDF ([DDDD:]BB:DD.F) or name=")
    return pci


def pci_to_libxl_json(p: PciSpec) -> dict[str, object]:
    """libxl's JSON form of ``p`` (``libxl_device_pci_to_json``), as a dict.

    Keys come in IDL order (func, dev, bus, domain, ...); as in libxl's
    generated code a field at its default (zero, false, INVALID policy, no
    name) is left out.
    """
    out: dict[str, object] = {}
    for key in ("func", "dev", "bus", "domain", "vdevfn", "vfunc_mask"):
        value = getattr(p, key)
        if value:
            out[key] = value
    for key in ("msitranslate", "power_mgmt", "permissive", "seize"):
        if getattr(p, key):
            out[key] = True
    if p.rdm_policy is not RdmPolicy.INVALID:
        out["rdm_policy"] = p.rdm_policy.value
    if p.name is not None:
        out["name"] = p.name
    return out


def _unwritable(message: str) -> ConfigError:
    return config_error("format_pci", 1, 1, message)


def format_pci(p: PciSpec) -> str:
    """Write ``p`` as a canonical pci spec; ``parse_pci(format_pci(p)) == p``.

    A device given by address is written ``[DDDD:]BB:DD.F[@VS]`` (the domain
    only when non-zero, as lspci does), one given by name as ``name=...``;
    then the flags that are set and the ``rdm_policy``.

    :raise ConfigError: ``p`` holds something no pci spec can express (both or
        neither of an address and a name, a ``vdevfn`` that is not a slot, a
        name with ``,``, numbers out of range).
    """
    if p.vdevfn & 7 or not 0 <= p.vdevfn <= 0xF8:
        raise _unwritable(f"vdevfn {p.vdevfn:#x} is not a slot number << 3")
    parts: list[str] = []
    if p.name is None:
        if not (0 <= p.domain <= 0xFFFF and 0 <= p.bus <= 0xFF and 0 <= p.dev <= 0x1F):
            raise _unwritable("domain, bus or device number out of range")
        if p.vfunc_mask == PCI_FUNC_ALL and p.func == 0:
            func = "*"
        elif p.vfunc_mask == 1 and 0 <= p.func <= 7:
            func = str(p.func)
        else:
            raise _unwritable(
                f"function {p.func} with vfunc_mask {p.vfunc_mask:#x}: a spec gives mask 1 "
                "with function 0-7, or all functions"
            )
        domain = f"{p.domain:04x}:" if p.domain else ""
        slot = f"@{p.vdevfn >> 3:02x}" if p.vdevfn else ""
        parts.append(f"{domain}{p.bus:02x}:{p.dev:02x}.{func}{slot}")
    else:
        if p.domain or p.bus or p.dev or p.func or p.vfunc_mask:
            raise _unwritable("a device given by name= has no BDF fields")
        if "," in p.name or "\0" in p.name:
            raise _unwritable(f"name {p.name!r} cannot hold ',' or NUL in a pci spec")
        parts.append(f"name={p.name}")
        if p.vdevfn:
            parts.append(f"vslot={p.vdevfn >> 3:02x}")
    for key in ("msitranslate", "power_mgmt", "permissive", "seize"):
        if getattr(p, key):
            parts.append(f"{key}=1")
    if p.rdm_policy is not RdmPolicy.INVALID:
        parts.append(f"rdm_policy={p.rdm_policy.value}")
    return ",".join(parts)
