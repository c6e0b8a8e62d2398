"""The disk spec of xl (xl-disk-configuration(5)); the entry point is parse_disk.

:func:`parse_disk` turns one or more spec strings (all describing one disk)
into a :class:`DiskSpec` with the field names of ``libxl_device_disk``;
:func:`disk_to_libxl_json` gives exactly what ``libxl_device_disk_to_json``
prints and :func:`format_disk` writes a canonical spec back.  The scanner
keeps the shape of libxlutil 4.17's flex scanner (``libxlu_disk_l.l``):
:data:`_RULES` lists flex's rules in flex's order, the longest match wins and
the earlier rule on a tie, and trailing context counts for the length without
being consumed.  Every quirk of libxlutil 4.17 is kept on purpose and pinned
by a test (``trusted`` is not a flag, ``target=`` swallows commas...); the few
deviations (a scanner jam, a NUL) are errors here.  The design (the rule
table, defaults, quirks and deviations) is in docs/config.md, section Disk
spec.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from xenlab.config.clib import atoi
from xenlab.config.errors import ConfigError, config_error
from xenlab.errors import Problem

__all__ = [
    "DiskBackend",
    "DiskFormat",
    "DiskSpec",
    "DiskSpecification",
    "disk_to_libxl_json",
    "format_disk",
    "parse_disk",
]


class DiskFormat(enum.Enum):
    """``libxl_disk_format``; the values are libxl's JSON names."""

    UNKNOWN = "unknown"
    QCOW = "qcow"
    QCOW2 = "qcow2"
    VHD = "vhd"
    RAW = "raw"
    EMPTY = "empty"
    QED = "qed"


class DiskBackend(enum.Enum):
    """``libxl_disk_backend`` (``backendtype=``); UNKNOWN lets libxl choose."""

    UNKNOWN = "unknown"
    PHY = "phy"
    TAP = "tap"
    QDISK = "qdisk"
    STANDALONE = "standalone"


class DiskSpecification(enum.Enum):
    """``libxl_disk_specification``; UNKNOWN means libxl's default (xen)."""

    UNKNOWN = "unknown"
    XEN = "xen"
    VIRTIO = "virtio"


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """A parsed disk spec: the fields of ``libxl_device_disk`` that a spec can set.

    ``None`` means "not set" for strings and for libxl's defbools
    (``discard_enable``, ``colo_enable``), which libxl resolves later.  There
    is no ``trusted``: libxlutil 4.17 cannot set it (see the module notes).
    ``removable``, ``readwrite`` and ``is_cdrom`` are C ints that only ever
    hold 0 or 1 here.
    """

    vdev: str
    pdev_path: str | None = None
    format: DiskFormat = DiskFormat.RAW
    backend: DiskBackend = DiskBackend.UNKNOWN
    backend_domname: str | None = None
    script: str | None = None
    removable: bool = False
    readwrite: bool = True
    is_cdrom: bool = False
    direct_io_safe: bool = False
    discard_enable: bool | None = None
    specification: DiskSpecification = DiskSpecification.UNKNOWN
    colo_enable: bool | None = None
    colo_host: str | None = None
    colo_port: int = 0
    colo_export: str | None = None
    active_disk: str | None = None
    hidden_disk: str | None = None


# ---------------------------------------------------------------- scanner rules

# (name, head, trailing context or None), in the order of libxlu_disk_l.l.
_RULE_TEXT: tuple[tuple[str, str, str | None], ...] = (
    ("ws", r"[ \t\n]+", r"(?:[^ \t\n].*)?"),
    ("format", r"format=[^,]*,?", None),
    ("cdrom", r"cdrom,?", None),
    ("devtype_cdrom", r"devtype=cdrom,?", None),
    ("devtype_disk", r"devtype=disk,?", None),
    ("devtype_bad", r"devtype=[^,]*,?", None),
    ("access", r"access=[^,]*,?", None),
    ("backend", r"backend=[^,]*,?", None),
    ("backendtype", r"backendtype=[^,]*,?", None),
    ("specification", r"specification=[^,]*,?", None),
    ("vdev", r"vdev=[^,]*,?", None),
    ("script", r"script=[^,]*,?", None),
    ("direct_io_safe", r"direct-io-safe,?", None),
    ("discard", r"discard,?", None),
    ("no_discard", r"no-discard,?", None),
    ("colo", r"colo,?", None),
    ("no_colo", r"no-colo,?", None),
    ("colo_host", r"colo-host=[^,]*,?", None),
    ("colo_port", r"colo-port=[^,]*,?", None),
    ("colo_export", r"colo-export=[^,]*,?", None),
    ("active_disk", r"active-disk=[^,]*,?", None),
    ("hidden_disk", r"hidden-disk=[^,]*,?", None),
    ("target", r"target=.*", None),
    ("unknown_param", r"[a-z][-a-z0-9]*=[^,],?", None),
    ("prefix_format", r"(?:raw|qcow2?|vhd):", r".*"),
    ("prefix_script", r"(?:iscsi|e?nbd|drbd):", r".*"),
    ("prefix_ignored", r"tapdisk:", r".*"),
    ("prefix_ignored", r"tap2?:", r".*"),
    ("prefix_ignored", r"aio:", r".*"),
    ("prefix_ignored", r"ioemu:", r".*"),
    ("prefix_ignored", r"file:", r".*"),
    ("prefix_ignored", r"phy:", r".*"),
    ("prefix_unknown", r"[a-z][a-z0-9]*:", r"(?:[^a-z0-9].*)?"),
    ("positional", r"[^=,]*,|[^=,]+,?", None),
    ("other", r".", None),
)

_RULES: tuple[tuple[str, re.Pattern[str], re.Pattern[str] | None], ...] = tuple(
    (name, re.compile(head), re.compile(ctx) if ctx is not None else None)
    for name, head, ctx in _RULE_TEXT
)

# Keys whose value is a string saved with libxlutil's savestring().
_STRING_KEYS: dict[str, tuple[str, str]] = {
    "backend": ("backend_domname", "backend"),
    "vdev": ("vdev", "vdev"),
    "script": ("script", "script"),
    "colo_host": ("colo_host", "colo-host"),
    "colo_export": ("colo_export", "colo-export"),
    "active_disk": ("active_disk", "active-disk"),
    "hidden_disk": ("hidden_disk", "hidden-disk"),
}

_FORMATS: dict[str, DiskFormat] = {
    "": DiskFormat.RAW,
    "raw": DiskFormat.RAW,
    "qcow": DiskFormat.QCOW,
    "qcow2": DiskFormat.QCOW2,
    "vhd": DiskFormat.VHD,
    "empty": DiskFormat.EMPTY,
    "qed": DiskFormat.QED,
}
_BACKENDS: dict[str, DiskBackend] = {
    "phy": DiskBackend.PHY,
    "tap": DiskBackend.TAP,
    "qdisk": DiskBackend.QDISK,
    "standalone": DiskBackend.STANDALONE,
}
_SPECIFICATIONS: dict[str, DiskSpecification] = {
    "xen": DiskSpecification.XEN,
    "virtio": DiskSpecification.VIRTIO,
}


def _match(text: str, pos: int) -> tuple[str, int]:
    """Flex's choice at ``pos``: (rule name, length consumed)."""
    best_name = ""
    best_total = 0
    best_head = 0
    for name, head, ctx in _RULES:
        m = head.match(text, pos)
        if m is None:
            continue
        end = m.end()
        total = end - pos
        if ctx is not None:
            c = ctx.match(text, end)
            if c is not None:
                total += c.end() - end
        if total > best_total:
            best_name, best_total, best_head = name, total, end - pos
    return best_name, best_head


# ---------------------------------------------------------------- parse state


class _Disk:
    """The libxl_device_disk being filled in, plus xlu's DiskParseContext flags."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.fields: dict[str, object] = {}
        self.strings: dict[str, str] = {}
        self.format = DiskFormat.UNKNOWN
        self.backend = DiskBackend.UNKNOWN
        self.specification = DiskSpecification.UNKNOWN
        self.readwrite = True
        self.is_cdrom = False
        self.colo_port = 0
        self.access_set = False
        self.had_depr_prefix = False
        self.problems: list[Problem] = []
        self.line = 1
        self.text = ""

    # -- errors

    def error(self, offset: int, message: str) -> None:
        self.problems.append(Problem(self.source, self.line, offset + 1, message))

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    # -- libxlutil's setters

    def savestring(self, field: str, what: str, value: str, offset: int) -> None:
        old = self.strings.get(field)
        if old:  # an earlier empty value may be overwritten silently
            self.error(
                offset,
                f"{what} respecified: near `{value}' (expected one value; `{old}' came first)",
            )
            return
        self.strings[field] = value

    def set_enum(self, member: str, new: enum.Enum, value: str, offset: int) -> None:
        current: enum.Enum = getattr(self, member)
        if current.value != "unknown" and current is not new:
            self.error(
                offset,
                f"{member} respecified: near `{value}'"
                f" (expected one value; {current.value} came first)",
            )
        else:
            setattr(self, member, new)

    def setformat(self, value: str, offset: int) -> None:
        fmt = _FORMATS.get(value)
        if fmt is None:
            self.error(
                offset,
                f"unknown value for format: near `{value}'"
                " (expected raw, qcow, qcow2, vhd, qed or empty)",
            )
        else:
            self.set_enum("format", fmt, value, offset)

    def setaccess(self, value: str, offset: int) -> None:
        if value in ("r", "ro"):
            self.readwrite = False
        elif value in ("rw", "w", ""):
            self.readwrite = True
        else:
            self.error(
                offset, f"unknown value for access: near `{value}' (expected r, ro, rw or w)"
            )

    def vdev_and_devtype(self, token: str, offset: int) -> bool:
        """``<vdev>:<devtype>``: returns False (doing nothing) without a colon."""
        colon = token.rfind(":")
        if colon < 0:
            return False
        self.savestring("vdev", "vdev", token[:colon], offset)
        devtype = token[colon + 1 :]
        if devtype == "cdrom":
            self.is_cdrom = True
        elif devtype == "disk":
            self.is_cdrom = False
        else:
            self.error(
                offset + colon + 1,
                f"unknown deprecated type: near `{devtype}' (expected cdrom or disk)",
            )
        return True

    # -- one token

    def act(self, rule: str, token: str, pos: int) -> bool:
        """Run one rule's action; False stops scanning this string."""
        stripped = token[:-1] if token.endswith(",") else token
        eq = token.find("=")
        value = stripped[eq + 1 :]
        voff = pos + eq + 1
        if rule == "format":
            self.setformat(value, voff)
        elif rule in ("cdrom", "devtype_cdrom"):
            self.is_cdrom = True
        elif rule == "devtype_disk":
            self.is_cdrom = False
        elif rule == "devtype_bad":
            self.error(
                pos,
                f"unknown value for type: near `{token}' (expected devtype=cdrom or devtype=disk)",
            )
        elif rule == "access":
            self.setaccess(value, voff)
        elif rule == "backendtype":
            backend = _BACKENDS.get(value)
            if backend is None:
                self.error(
                    voff,
                    f"unknown value for backendtype: near `{value}'"
                    " (expected phy, tap, qdisk or standalone)",
                )
            else:
                self.set_enum("backend", backend, value, voff)
        elif rule == "specification":
            spec = _SPECIFICATIONS.get(value)
            if spec is None:
                self.error(
                    voff,
                    f"unknown value for specification: near `{value}' (expected xen or virtio)",
                )
            else:
                self.set_enum("specification", spec, value, voff)
        elif rule in _STRING_KEYS:
            field, what = _STRING_KEYS[rule]
            self.savestring(field, what, value, voff)
        elif rule == "direct_io_safe":
            self.fields["direct_io_safe"] = True
        elif rule in ("discard", "no_discard"):
            self.fields["discard_enable"] = rule == "discard"
        elif rule in ("colo", "no_colo"):
            self.fields["colo_enable"] = rule == "colo"
        elif rule == "colo_port":
            port = atoi(value)
            if port:
                self.colo_port = port
            else:
                self.error(
                    voff, f"unknown value for colo_port: near `{value}' (expected a port number)"
                )
        elif rule == "target":
            self.savestring("pdev_path", "target", value, voff)
        elif rule == "unknown_param":
            self.error(
                pos,
                f"unknown parameter: near `{token}'"
                " (expected target=, format=, vdev=, access=, devtype=, backend=,"
                " backendtype=, script=, specification= or a colo key)",
            )
        elif rule == "prefix_format":
            self.had_depr_prefix = True
            self.setformat(token[:-1], pos)
        elif rule == "prefix_script":
            self.had_depr_prefix = True
            self.savestring("script", "script", f"block-{token[:-1]}", pos)
        elif rule == "prefix_ignored":
            self.had_depr_prefix = True
        elif rule == "prefix_unknown":
            self.error(
                pos,
                f"unknown deprecated disk prefix: near `{token}'"
                " (expected raw:, qcow:, qcow2:, vhd:, iscsi:, nbd:, enbd:, drbd:,"
                " tap:, tap2:, tapdisk:, aio:, ioemu:, file: or phy:)",
            )
            return False
        else:
            return self.positional(stripped, pos)
        return True

    def positional(self, token: str, pos: int) -> bool:
        if self.failed:
            return True  # earlier errors may just lead to later ones
        if "pdev_path" not in self.strings:
            self.savestring("pdev_path", "target", token, pos)
        elif not self.had_depr_prefix and self.format is DiskFormat.UNKNOWN:
            if not self.strings["pdev_path"] and self.vdev_and_devtype(token, pos):
                self.format = DiskFormat.EMPTY
            else:
                self.setformat(token, pos)
        elif "vdev" not in self.strings:
            if not self.vdev_and_devtype(token, pos):
                self.savestring("vdev", "vdev", token, pos)
        elif not self.access_set:
            self.access_set = True
            self.setaccess(token, pos)
        else:
            self.error(
                pos,
                f"too many positional parameters: near `{token}'"
                " (expected at most target, format, vdev, access)",
            )
            return False
        return True

    def scan(self, text: str) -> None:
        """Scan one spec string (a fresh flex scanner, the same disk)."""
        self.text = text
        nul = text.find("\0")
        if nul >= 0:
            self.error(nul, "NUL character in disk spec (expected text)")
            return
        pos = 0
        n = len(text)
        while pos < n:
            rule, length = _match(text, pos)
            if not length:  # every character matches some rule; never reached
                rule, length = "other", 1
            token = text[pos : pos + length]
            if rule == "other":
                # Flex enters its error state; "=" at the very end is
                # dropped silently, anything else is reported.
                rest_end = text.find("\n", pos + 1)
                if pos + 1 == n:
                    return
                if rest_end < 0:
                    rest_end = n
                self.error(
                    pos,
                    f"bad disk syntax: near `{text[pos:rest_end]}'"
                    " (expected key=value, a flag or a positional parameter)",
                )
                return
            if rule != "ws" and not self.act(rule, token, pos):
                return
            pos += length

    def result(self) -> DiskSpec:
        fmt = self.format
        if fmt is DiskFormat.UNKNOWN:
            fmt = DiskFormat.RAW
        removable = False
        readwrite = self.readwrite
        pdev = self.strings.get("pdev_path")
        if self.is_cdrom:
            removable = True
            readwrite = False
            if not pdev:
                fmt = DiskFormat.EMPTY
        end = len(self.text)
        vdev = self.strings.get("vdev")
        if vdev is None:
            self.error(end, "no vdev specified (expected vdev= or a positional vdev)")
        elif pdev is None and not removable:
            self.error(
                end,
                "no target specified (and device not removable)"
                " (expected target= or a positional target)",
            )
        if self.problems or vdev is None:
            raise ConfigError(self.problems)
        return DiskSpec(
            vdev=vdev,
            pdev_path=pdev,
            format=fmt,
            backend=self.backend,
            backend_domname=self.strings.get("backend_domname"),
            script=self.strings.get("script"),
            removable=removable,
            readwrite=readwrite,
            is_cdrom=self.is_cdrom,
            direct_io_safe=bool(self.fields.get("direct_io_safe", False)),
            discard_enable=_opt_bool(self.fields.get("discard_enable")),
            specification=self.specification,
            colo_enable=_opt_bool(self.fields.get("colo_enable")),
            colo_host=self.strings.get("colo_host"),
            colo_port=self.colo_port,
            colo_export=self.strings.get("colo_export"),
            active_disk=self.strings.get("active_disk"),
            hidden_disk=self.strings.get("hidden_disk"),
        )


def _opt_bool(value: object) -> bool | None:
    return None if value is None else bool(value)


def parse_disk(spec: str | Sequence[str], *, source: str = "disk spec") -> DiskSpec:
    """Parse a disk spec (or several strings describing one disk) as ``xlu_disk_parse``.

    :raise ConfigError: the spec is invalid; ``problems`` lists every error
        libxlutil would report, with ``line`` the 1-based index of the string
        and ``col`` the 1-based character where the problem starts.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    disk = _Disk(source)
    for index, text in enumerate(specs):
        disk.line = index + 1
        disk.scan(text)
        if disk.failed:
            raise ConfigError(disk.problems)
    return disk.result()


# ---------------------------------------------------------------- output


def _defbool(value: bool | None) -> str | None:
    return None if value is None else ("True" if value else "False")


def disk_to_libxl_json(disk: DiskSpec) -> dict[str, object]:
    """The object ``libxl_device_disk_to_json`` prints for this disk.

    libxl leaves out NULL strings, zero integers, false booleans, unset
    defbools (which print as ``"True"``/``"False"``) and UNKNOWN enums; an
    empty string is printed.
    """
    items: list[tuple[str, object]] = [
        ("backend_domname", disk.backend_domname),
        ("pdev_path", disk.pdev_path),
        ("vdev", disk.vdev),
        ("backend", None if disk.backend is DiskBackend.UNKNOWN else disk.backend.value),
        ("format", None if disk.format is DiskFormat.UNKNOWN else disk.format.value),
        ("script", disk.script),
        ("removable", 1 if disk.removable else None),
        ("readwrite", 1 if disk.readwrite else None),
        ("is_cdrom", 1 if disk.is_cdrom else None),
        ("direct_io_safe", True if disk.direct_io_safe else None),
        ("discard_enable", _defbool(disk.discard_enable)),
        (
            "specification",
            None if disk.specification is DiskSpecification.UNKNOWN else disk.specification.value,
        ),
        ("colo_enable", _defbool(disk.colo_enable)),
        ("colo_host", disk.colo_host),
        ("colo_port", disk.colo_port or None),
        ("colo_export", disk.colo_export),
        ("active_disk", disk.active_disk),
        ("hidden_disk", disk.hidden_disk),
    ]
    return {key: value for key, value in items if value is not None}


def _unwritable(message: str) -> ConfigError:
    return config_error("disk spec", 1, 1, f"cannot write this disk as a spec: {message}")


def _keyed(key: str, value: str | None) -> str | None:
    if value is None:
        return None
    if "," in value:
        raise _unwritable(f"{key} `{value}' holds a comma")
    return f"{key}={value}"


def _positional_target_ok(pdev: str) -> bool:
    """Whether ``pdev`` as a first positional parameter scans back as itself."""
    if "," in pdev or "=" in pdev or "\0" in pdev or not pdev:
        return False
    stripped = pdev.lstrip(" \t\n")
    if not stripped:
        return False
    if stripped != pdev and "\n" not in stripped:
        return False  # the leading blanks would be skipped
    rule, length = _match(pdev + ",", 0)
    return rule == "positional" and length == len(pdev) + 1


def format_disk(disk: DiskSpec) -> str:
    """A canonical spec for ``disk``: ``key=value`` items, ``target=`` last.

    ``parse_disk(format_disk(d)) == d`` for every ``d`` that
    :func:`parse_disk` can return.

    :raise ConfigError: no spec parses to ``disk`` (a value with a comma, a
        non-cdrom without a target, inconsistent cdrom fields...).
    """
    if disk.removable != disk.is_cdrom:
        raise _unwritable("removable is set by (and only by) cdrom")
    if disk.is_cdrom and disk.readwrite:
        raise _unwritable("a cdrom is always read-only")
    if disk.is_cdrom and not disk.pdev_path and disk.format is not DiskFormat.EMPTY:
        raise _unwritable("a cdrom without a target always has format empty")
    if disk.pdev_path is None and not disk.is_cdrom:
        raise _unwritable("only a cdrom may lack a target")
    if disk.format is DiskFormat.UNKNOWN:
        raise _unwritable("format unknown is replaced by raw")
    if not -(1 << 31) <= disk.colo_port < 1 << 31:
        raise _unwritable(f"colo_port {disk.colo_port} is not a C int")
    strings: tuple[str | None, ...] = (
        disk.vdev,
        disk.pdev_path,
        disk.backend_domname,
        disk.script,
        disk.colo_host,
        disk.colo_export,
        disk.active_disk,
        disk.hidden_disk,
    )
    if any(s is not None and "\0" in s for s in strings):
        raise _unwritable("a value holds a NUL character")
    parts: list[str | None] = []
    lead: str | None = None
    pdev = disk.pdev_path
    if pdev is not None and "\n" in pdev:
        # target= stops at a newline; only a positional target can hold one.
        if not _positional_target_ok(pdev):
            raise _unwritable(f"target `{pdev}' holds a newline and cannot be positional")
        lead = pdev
    parts.append(f"format={disk.format.value}")
    parts.append(_keyed("vdev", disk.vdev))
    if not disk.readwrite:
        parts.append("access=ro")
    if disk.is_cdrom:
        parts.append("devtype=cdrom")
    if disk.backend is not DiskBackend.UNKNOWN:
        parts.append(f"backendtype={disk.backend.value}")
    if disk.specification is not DiskSpecification.UNKNOWN:
        parts.append(f"specification={disk.specification.value}")
    parts.append(_keyed("backend", disk.backend_domname))
    parts.append(_keyed("script", disk.script))
    if disk.direct_io_safe:
        parts.append("direct-io-safe")
    flags: tuple[tuple[bool | None, str, str], ...] = (
        (disk.discard_enable, "discard", "no-discard"),
        (disk.colo_enable, "colo", "no-colo"),
    )
    for value, yes, no in flags:
        if value is not None:
            parts.append(yes if value else no)
    parts.append(_keyed("colo-host", disk.colo_host))
    if disk.colo_port:
        parts.append(f"colo-port={disk.colo_port}")
    parts.append(_keyed("colo-export", disk.colo_export))
    parts.append(_keyed("active-disk", disk.active_disk))
    parts.append(_keyed("hidden-disk", disk.hidden_disk))
    if pdev is not None and lead is None:
        # target= eats the rest of the line and cuts one trailing comma.
        parts.append(f"target={pdev}," if pdev.endswith(",") else f"target={pdev}")
    text = ",".join(p for p in parts if p is not None)
    if lead is not None:
        text = f"{lead},{text}"
    return text
