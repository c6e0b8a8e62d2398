"""The vif device spec of xl (xl-network-configuration(5)); the entry point is parse_vif.

:func:`parse_vif` turns a spec such as
``'mac=00:16:3e:74:3d:76,bridge=xenbr0'`` into a :class:`VifSpec` with the
field names of ``libxl_device_nic``; :func:`vif_to_libxl_json` gives what ``xl
-N network-attach`` prints and :func:`format_vif` writes it back.  The parse
follows xl 4.17 (``parse_nic_config`` in tools/xl/xl_parse.c,
``xlu_vif_parse_rate``) rule for rule: what xl only reports becomes a warning
(:func:`parse_vif_with_warnings`; an error with ``strict=True``, as in ``xl
network-attach``) and what makes xl exit is a :class:`ConfigError`.  Fields
start unset, as ``libxl_device_nic_init`` leaves them (``base`` seeds xl's
defaults), and xl's number-reading quirks are kept and pinned by tests.  The
design (the rules, defaults, quirks and deviations) is in docs/config.md,
section Vif spec.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Any

from xenlab.config.clib import DEC_DIGITS, ULONG_MAX, strtoul, strtoull, to_c_int
from xenlab.config.errors import ConfigWarning, config_error

__all__ = [
    "COLO_KEYS",
    "MacAddress",
    "NicType",
    "VifSpec",
    "format_vif",
    "parse_rate",
    "parse_vif",
    "parse_vif_with_warnings",
    "vif_to_libxl_json",
]

_UINT32_MAX = 0xFFFF_FFFF
_UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF
#: Interval when ``rate=`` has no ``@``: 50 ms, xlu_vif_parse_rate's default.
DEFAULT_RATE_INTERVAL_USECS = 50_000


class NicType(enum.Enum):
    """``libxl_nic_type``; the value is libxl's JSON spelling."""

    UNKNOWN = "unknown"
    VIF_IOEMU = "vif_ioemu"
    VIF = "vif"


#: Six octets, most significant first.
MacAddress = tuple[int, int, int, int, int, int]

#: The COLO settings of ``libxl_device_nic``, in IDL order; the xl key is the
#: field name.  (``forwarddev=`` sets ``coloft_forwarddev``, a field of its own.)
COLO_KEYS: tuple[str, ...] = tuple(
    [f"colo_sock_mirror_{s}" for s in ("id", "ip", "port")]
    + [
        f"colo_sock_compare_{w}_{s}"
        for w in ("pri_in", "sec_in", "notify")
        for s in ("id", "ip", "port")
    ]
    + [f"colo_sock_redirector{n}_{s}" for n in range(3) for s in ("id", "ip", "port")]
    + ["colo_filter_mirror_queue", "colo_filter_mirror_outdev"]
    + [f"colo_filter_redirector{n}_{s}" for n in range(2) for s in ("queue", "indev", "outdev")]
    + ["colo_compare_pri_in", "colo_compare_sec_in", "colo_compare_out", "colo_compare_notify_dev"]
    + [f"colo_sock_sec_redirector{n}_{s}" for n in range(2) for s in ("id", "ip", "port")]
    + [f"colo_filter_sec_redirector{n}_{s}" for n in range(2) for s in ("queue", "indev", "outdev")]
    + ["colo_filter_sec_rewriter0_queue", "colo_checkpoint_host", "colo_checkpoint_port"]
)
_COLO_ORDER = {key: i for i, key in enumerate(COLO_KEYS)}


@dataclass(frozen=True, slots=True)
class VifSpec:
    """One vif, with ``libxl_device_nic``'s field names (see the module docstring).

    ``colo`` holds the COLO string settings that were given, as
    ``(field name, value)`` pairs in :data:`COLO_KEYS` order.
    ``trusted`` is libxl's defbool: ``None`` until ``trusted``/``untrusted``.
    """

    backend_domname: str | None = None
    devid: int | None = None
    mtu: int | None = None
    model: str | None = None
    mac: MacAddress | None = None
    ip: str | None = None
    bridge: str | None = None
    ifname: str | None = None
    script: str | None = None
    nictype: NicType = NicType.UNKNOWN
    rate_bytes_per_interval: int = 0
    rate_interval_usecs: int = 0
    gatewaydev: str | None = None
    coloft_forwarddev: str | None = None
    colo: tuple[tuple[str, str], ...] = field(default=())
    trusted: bool | None = None

    def colo_setting(self, name: str) -> str | None:
        """The value of COLO field ``name`` (one of :data:`COLO_KEYS`), or None."""
        for key, value in self.colo:
            if key == name:
                return value
        return None


# xl key -> VifSpec field, for the keys that just store their value.
_STRING_KEYS: dict[str, str] = {
    "bridge": "bridge",
    "gatewaydev": "gatewaydev",
    "ip": "ip",
    "script": "script",
    "backend": "backend_domname",
    "vifname": "ifname",
    "model": "model",
    "forwarddev": "coloft_forwarddev",
}

_BYTES_RE = re.compile(r"[0-9]+[GMK]?[Bb]/s", re.ASCII)
_INTERVAL_RE = re.compile(r"[0-9]+[mu]?s?", re.ASCII)
_UNIT = {"G": 1_000_000_000, "M": 1_000_000, "K": 1_000}


def _check_number(value: int, text: str, what: str, source: str, col: int) -> None:
    """xl's range check on the number before the unit: 1 to UINT32_MAX."""
    digits = len(text) - len(text.lstrip(DEC_DIGITS))
    octal = " (a leading 0 makes the number octal)" if text[0] == "0" and digits > 1 else ""
    if value == 0:
        raise config_error(source, 1, col, f"{what} {text!r} is zero, expected at least 1{octal}")
    if value > _UINT32_MAX:
        raise config_error(
            source, 1, col, f"{what} {text!r} overflows, expected a number up to {_UINT32_MAX}"
        )


def _rate_bytes_per_sec(text: str, source: str, col: int) -> int:
    if not _BYTES_RE.fullmatch(text):
        raise config_error(
            source,
            1,
            col,
            f"invalid rate {text!r}, expected NUMBER[K|M|G]B/s (bytes) or "
            "NUMBER[K|M|G]b/s (bits), e.g. 10Mb/s",
        )
    value, end = strtoull(text, 0)
    _check_number(value, text, "rate", source, col)
    # xl looks at the character after the number and the one after that;
    # an octal number that stopped early leaves a digit there.
    here = text[end]
    after = text[end + 1]
    value *= _UNIT.get(here, 1)
    if here == "b" or after == "b":
        value //= 8
    return value


def _rate_interval_usecs(text: str, source: str, col: int) -> int:
    if not _INTERVAL_RE.fullmatch(text):
        raise config_error(
            source,
            1,
            col,
            f"invalid replenishment interval {text!r}, expected NUMBER[s|ms|us], e.g. 20ms",
        )
    value, end = strtoull(text, 0)
    _check_number(value, text, "replenishment interval", source, col)
    unit = text[end] if end < len(text) else ""
    if unit in ("s", ""):
        value *= 1_000_000
    elif unit == "m":
        value *= 1_000
    if value > _UINT32_MAX:
        raise config_error(
            source,
            1,
            col,
            f"replenishment interval overflow in {text!r}: at most {_UINT32_MAX} us",
        )
    return value


def _parse_rate_at(text: str, source: str, col: int) -> tuple[int, int]:
    at = text.find("@")
    rate_text = text if at < 0 else text[:at]
    if rate_text == "":
        raise config_error(source, 1, col, "no rate specified, expected e.g. 10Mb/s[@20ms]")
    bytes_per_sec = _rate_bytes_per_sec(rate_text, source, col)
    interval = DEFAULT_RATE_INTERVAL_USECS
    if at >= 0:
        interval = _rate_interval_usecs(text[at + 1 :], source, col + at + 1)
    if bytes_per_sec > _UINT64_MAX // interval:
        raise config_error(
            source,
            1,
            col,
            f"rate overflow in {text!r}: bytes per interval do not fit in 64 bits",
        )
    return bytes_per_sec * interval // 1_000_000, interval


def parse_rate(text: str, *, source: str = "vif rate") -> tuple[int, int]:
    """Parse a ``rate=`` value as xlu_vif_parse_rate does.

    Returns ``(rate_bytes_per_interval, rate_interval_usecs)``; for example
    ``parse_rate("1MB/s@20ms") == (20000, 20000)``.

    :raise ConfigError: the rate or interval is malformed, zero, or too large;
        the column points into ``text``.
    """
    _reject_nul(text, source, 1)
    return _parse_rate_at(text, source, 1)


def _reject_nul(text: str, source: str, col: int) -> None:
    nul = text.find("\0")
    if nul >= 0:
        raise config_error(source, 1, col + nul, "NUL character, expected text")


def _parse_mac(value: str, start: MacAddress | None) -> tuple[MacAddress | None, int | None]:
    """xl's mac reader: (the address as stored, index of the bad group or None)."""
    octets = list(start or (0, 0, 0, 0, 0, 0))
    pos = 0
    for i in range(6):
        if pos > len(value):
            return _mac_or_none(octets), len(value)  # ran off the item (C reads on)
        number, end = strtoul(value, 16, pos)
        number &= _UINT32_MAX  # stored into an unsigned int first
        if end == pos or number > 255:
            return _mac_or_none(octets), pos
        octets[i] = number
        pos = end + 1  # xl skips exactly one separator, whatever it is
    return _mac_or_none(octets), None


def _mac_or_none(octets: list[int]) -> MacAddress | None:
    if not any(octets):
        return None
    a, b, c, d, e, f = octets
    return (a, b, c, d, e, f)


def _parse_ulong(value: str, source: str, col: int, key: str) -> int:
    number, end = strtoul(value, 10)
    if end == 0 or number == ULONG_MAX:
        raise config_error(
            source, 1, col, f"failed to convert {value!r} to a number for {key}=, expected digits"
        )
    return to_c_int(number)


def _items(spec: str) -> list[tuple[int, str]]:
    """strtok(spec, ",") with leading spaces dropped: (0-based offset, item)."""
    items = []
    offset = 0
    for piece in spec.split(","):
        if piece:
            stripped = piece.lstrip(" ")
            items.append((offset + len(piece) - len(stripped), stripped))
        offset += len(piece) + 1
    return items


def parse_vif_with_warnings(
    spec: str,
    *,
    source: str = "vif spec",
    base: VifSpec | None = None,
    strict: bool = False,
) -> tuple[VifSpec, tuple[ConfigWarning, ...]]:
    """Parse one vif spec as xl 4.17 does; return it with what xl would warn about.

    ``base`` is the value parsing starts from (xl seeds the list index as
    ``devid`` and xl.conf's vif defaults); it defaults to an unset
    :class:`VifSpec`.  Warnings cover unknown keys, bad ``type=``/``mac=``
    values (ignored, as in a domain config) and the deprecated ``accel=``
    and ``netdev=``.  With ``strict=True`` the ignored items raise instead, as
    in ``xl network-attach`` (which takes one item per argument; here the
    spec is still cut at ``,``, so a value cannot hold one).

    :raise ConfigError: a bad ``rate=``, ``devid=`` or ``mtu=`` (xl exits), a
        NUL character, or in strict mode an item xl rejects; the column is the
        1-based place in ``spec``.
    """
    _reject_nul(spec, source, 1)
    nic = base or VifSpec()
    colo: dict[str, str] = dict(nic.colo)
    warnings: list[ConfigWarning] = []

    def reject(col: int, message: str) -> None:
        if strict:
            raise config_error(source, 1, col, message)
        warnings.append(ConfigWarning(source, 1, f"column {col}: {message}; ignored"))

    for offset, item in _items(spec):
        col = offset + 1
        if item in ("trusted", "untrusted"):
            nic = replace(nic, trusted=item == "trusted")
            continue
        key, eq, value = item.partition("=")
        vcol = col + len(key) + 1
        if not eq:
            reject(col, f"unrecognized argument {item!r}, expected key=value, trusted or untrusted")
        elif key in _STRING_KEYS:
            change: dict[str, Any] = {_STRING_KEYS[key]: value}
            nic = replace(nic, **change)
        elif key in _COLO_ORDER:
            colo[key] = value
        elif key == "type":
            if value == "vif":
                nic = replace(nic, nictype=NicType.VIF)
            elif value == "ioemu":
                nic = replace(nic, nictype=NicType.VIF_IOEMU)
            else:
                reject(vcol, f"invalid type {value!r}, expected vif or ioemu")
        elif key == "mac":
            mac, bad = _parse_mac(value, nic.mac)
            if bad is not None:
                reject(vcol + bad, _mac_message(value))
            # A bad group leaves the octets before it stored, as in xl.
            nic = replace(nic, mac=mac)
        elif key == "netdev":
            warnings.append(
                ConfigWarning(
                    source, 1, f"column {col}: netdev= is deprecated, use gatewaydev= instead"
                )
            )
            nic = replace(nic, gatewaydev=value)
        elif key == "accel":
            warnings.append(
                ConfigWarning(source, 1, f"column {col}: accel= is not supported for vifs; ignored")
            )
        elif key == "rate":
            per_interval, usecs = _parse_rate_at(value, source, vcol)
            nic = replace(nic, rate_bytes_per_interval=per_interval, rate_interval_usecs=usecs)
        elif key == "devid":
            devid = _parse_ulong(value, source, vcol, key)
            nic = replace(nic, devid=None if devid == -1 else devid)
        elif key == "mtu":
            mtu = _parse_ulong(value, source, vcol, key)
            nic = replace(nic, mtu=mtu or None)
        else:
            reject(col, f"unrecognized argument {item!r}, unknown key {key!r}")
    ordered = tuple(sorted(colo.items(), key=lambda kv: _COLO_ORDER[kv[0]]))
    if ordered != nic.colo:
        nic = replace(nic, colo=ordered)
    return nic, tuple(warnings)


def _mac_message(value: str) -> str:
    return f"invalid mac {value!r}, expected six hexadecimal octets 0-ff such as 00:16:3e:01:02:03"


def parse_vif(
    spec: str,
    *,
    source: str = "vif spec",
    base: VifSpec | None = None,
    strict: bool = False,
) -> VifSpec:
    """Parse one vif spec as xl 4.17 does, dropping warnings.

    See :func:`parse_vif_with_warnings` for ``base`` and ``strict``.

    :raise ConfigError: as :func:`parse_vif_with_warnings`.
    """
    return parse_vif_with_warnings(spec, source=source, base=base, strict=strict)[0]


def _mac_text(mac: MacAddress) -> str:
    return ":".join(f"{octet:02x}" for octet in mac)


def vif_to_libxl_json(v: VifSpec) -> dict[str, object]:
    """libxl's JSON form of ``v`` (``libxl_device_nic_to_json``), as a dict.

    Keys come in IDL order and, as in libxl's generated code, a field at its
    default (NULL string, zero number, ``devid`` -1, all-zero MAC, unknown
    nictype, unset defbool) is left out.
    """
    out: dict[str, object] = {}
    if v.backend_domname is not None:
        out["backend_domname"] = v.backend_domname
    if v.devid is not None and v.devid != -1:
        out["devid"] = v.devid
    if v.mtu:
        out["mtu"] = v.mtu
    if v.model is not None:
        out["model"] = v.model
    if v.mac is not None and any(v.mac):
        out["mac"] = _mac_text(v.mac)
    for name in ("ip", "bridge", "ifname", "script"):
        value = getattr(v, name)
        if value is not None:
            out[name] = value
    if v.nictype is not NicType.UNKNOWN:
        out["nictype"] = v.nictype.value
    if v.rate_bytes_per_interval:
        out["rate_bytes_per_interval"] = v.rate_bytes_per_interval
    if v.rate_interval_usecs:
        out["rate_interval_usecs"] = v.rate_interval_usecs
    if v.gatewaydev is not None:
        out["gatewaydev"] = v.gatewaydev
    if v.coloft_forwarddev is not None:
        out["coloft_forwarddev"] = v.coloft_forwarddev
    given = dict(v.colo)
    for key in COLO_KEYS:
        if key in given:
            out[key] = given[key]
    if v.trusted is not None:
        out["trusted"] = "True" if v.trusted else "False"
    return out


# Units for format_vif, largest first: (bytes per second per unit, suffix).
_RATE_UNITS: tuple[tuple[int, str], ...] = (
    (1_000_000_000, "GB"),
    (125_000_000, "Gb"),
    (1_000_000, "MB"),
    (125_000, "Mb"),
    (1_000, "KB"),
    (125, "Kb"),
    (1, "B"),
)


def _format_rate(per_interval: int, usecs: int) -> str:
    """A ``rate=`` value that parses back to exactly these two numbers."""
    if not 1 <= usecs <= _UINT32_MAX:
        raise config_error(
            "format_vif", 1, 1, f"rate interval {usecs} us is not 1 to {_UINT32_MAX}"
        )
    if usecs % 1_000_000 == 0:
        interval = f"{usecs // 1_000_000}s"
    elif usecs % 1_000 == 0:
        interval = f"{usecs // 1_000}ms"
    else:
        interval = f"{usecs}us"
    suffix = "" if usecs == DEFAULT_RATE_INTERVAL_USECS else f"@{interval}"
    # Bytes per second that floor to per_interval over this interval.
    low = -(-per_interval * 1_000_000 // usecs)
    high = ((per_interval + 1) * 1_000_000 - 1) // usecs
    high = min(high, _UINT64_MAX // usecs)
    if per_interval == 0:
        return f"1b/s{suffix}"  # 1 bit/s is 0 bytes/s: xl's only way to say 0
    for unit, name in _RATE_UNITS:
        count = -(-low // unit)
        if 1 <= count <= _UINT32_MAX and count * unit <= high:
            return f"{count}{name}/s{suffix}"
    raise config_error(
        "format_vif",
        1,
        1,
        f"no rate=... gives {per_interval} bytes per {usecs} us interval",
    )


def _check_value(key: str, value: str) -> str:
    if "," in value or "\0" in value:
        raise config_error(
            "format_vif", 1, 1, f"{key}= value {value!r} cannot hold ',' or NUL in a vif spec"
        )
    return value


def format_vif(v: VifSpec) -> str:
    """Write ``v`` as a canonical vif spec; ``parse_vif(format_vif(v)) == v``.

    Items come in libxl's field order, unset fields are left out, rates are
    written with the largest exact unit (``10Mb/s@20ms``).

    :raise ConfigError: ``v`` holds something no vif spec can express (a
        string with ``,``, a rate no ``rate=`` produces).
    """
    parts: list[str] = []
    if v.backend_domname is not None:
        parts.append("backend=" + _check_value("backend", v.backend_domname))
    if v.devid is not None and v.devid != -1:
        parts.append(f"devid={v.devid}")
    if v.mtu:
        parts.append(f"mtu={v.mtu}")
    if v.model is not None:
        parts.append("model=" + _check_value("model", v.model))
    if v.mac is not None and any(v.mac):
        parts.append("mac=" + _mac_text(v.mac))
    for key, name in (
        ("ip", "ip"),
        ("bridge", "bridge"),
        ("vifname", "ifname"),
        ("script", "script"),
    ):
        value = getattr(v, name)
        if value is not None:
            parts.append(f"{key}=" + _check_value(key, value))
    if v.nictype is NicType.VIF:
        parts.append("type=vif")
    elif v.nictype is NicType.VIF_IOEMU:
        parts.append("type=ioemu")
    if v.rate_bytes_per_interval or v.rate_interval_usecs:
        parts.append("rate=" + _format_rate(v.rate_bytes_per_interval, v.rate_interval_usecs))
    if v.gatewaydev is not None:
        parts.append("gatewaydev=" + _check_value("gatewaydev", v.gatewaydev))
    if v.coloft_forwarddev is not None:
        parts.append("forwarddev=" + _check_value("forwarddev", v.coloft_forwarddev))
    for key, value in v.colo:
        parts.append(f"{key}=" + _check_value(key, value))
    if v.trusted is not None:
        parts.append("trusted" if v.trusted else "untrusted")
    return ",".join(parts)
