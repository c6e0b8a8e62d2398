"""A test oracle over Debian's real libxlutil 4.17: load() gives a Libxlu.

xenlab re-implements the xl configuration language and its device-spec
mini-languages; the tests compare it with the C library xl itself uses.  This
module fetches the library from the Debian archive with ``apt-get download`` and
``dpkg -x`` into a cache directory (``$XENLAB_ORACLE_CACHE``, default
``~/.cache/xenlab/libxlu-4.17``), without installing anything, and drives it
through ctypes:

* :meth:`Libxlu.parse_cfg` runs ``xlu_cfg_readdata`` and walks libxlutil's
  private settings list (there is no public way to enumerate settings), so the
  ctypes structures below mirror ``tools/libs/util/libxlu_internal.h`` as of
  RELEASE-4.17.x.
* :meth:`Libxlu.parse_disk`, :meth:`Libxlu.parse_pci` and
  :meth:`Libxlu.parse_vif_rate` run the spec parsers and report libxl's own JSON
  form of the device structure (``libxl_device_*_to_json``).

Everything libxlutil prints to its report stream is captured (an
``open_memstream`` FILE*) and returned as text.

Some inputs make the C code abort the whole process (``assert`` in the
dequoter when a quoted string holds a NUL byte); those raise
:class:`OracleRefuses` instead of reaching the library.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.oracle.debs import DebsUnavailable, unpack_debs

#: Debian packages holding libxlutil, libxenlight and every library they load.
PACKAGES: tuple[str, ...] = (
    "libxenmisc4.17",
    "libxen-dev",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenstore4",
    "libxentoollog1",
    "libxentoolcore1",
    "libyajl2",
)

# Load order: each library after the ones it needs (ldd of libxenlight).
_LIBS: tuple[str, ...] = (
    "libxentoolcore.so.1",
    "libxentoollog.so.1",
    "libxencall.so.1",
    "libxenevtchn.so.1",
    "libxengnttab.so.1",
    "libxenforeignmemory.so.1",
    "libxendevicemodel.so.1",
    "libxenhypfs.so.1",
    "libxenstore.so.4",
    "libyajl.so.2",
    "libxenctrl.so.4.17",
    "libxenguest.so.4.17",
    "libxenlight.so.4.17",
    "libxlutil.so.4.17",
)

_LIBDIR = Path("usr/lib/x86_64-linux-gnu")

# Generous: sizeof(libxl_device_disk) is about 200 bytes, nic and pci less.
_DEVICE_BUFSIZE = 4096

XLU_STRING = 0
XLU_LIST = 1
XLU_OP_ADDITION = 1


class OracleUnavailable(Exception):
    """The real library could not be fetched or loaded on this machine."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class OracleRefuses(ValueError):
    """The input would crash (abort) the C library, so it is not passed on."""


# ---------------------------------------------------------------- results


Value = str | tuple["Value", ...]


@dataclass(frozen=True, slots=True)
class OracleSetting:
    """One statement as libxlutil keeps it in memory."""

    name: str
    op: str  # "=" or "+="
    lineno: int
    value: Value


@dataclass(frozen=True, slots=True)
class OracleCfg:
    """The outcome of ``xlu_cfg_readdata`` on a whole file."""

    ok: bool
    rc: int
    report: str
    likely_python: bool
    settings: tuple[OracleSetting, ...]
    data: bytes = field(repr=False)
    lib: Libxlu = field(repr=False, compare=False)

    def get_string(self, name: str) -> OracleLookup:
        """Look ``name`` up with ``xlu_cfg_get_string`` (warnings on)."""
        return self.lib._lookup(self.data, name, "string")

    def get_long(self, name: str) -> OracleLookup:
        """Look ``name`` up with ``xlu_cfg_get_long`` (warnings on)."""
        return self.lib._lookup(self.data, name, "long")


@dataclass(frozen=True, slots=True)
class OracleLookup:
    """A ``xlu_cfg_get_*`` answer: ``rc`` is 0 or an errno; ``value`` only when 0."""

    rc: int
    value: str | int | None
    report: str


@dataclass(frozen=True, slots=True)
class OracleDevice:
    """The outcome of a spec parser: rc, report, and libxl's JSON of the device."""

    ok: bool
    rc: int
    report: str
    json: dict[str, object] | None


OracleDisk = OracleDevice
OraclePci = OracleDevice
OracleVifRate = OracleDevice


# ---------------------------------------------------------------- fetching


def cache_dir() -> Path:
    """Where the extracted packages live."""
    env = os.environ.get("XENLAB_ORACLE_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "xenlab" / "libxlu-4.17"


def ensure_root(cache: Path | None = None) -> Path:
    """Fetch and extract the packages once (tests/oracle/debs.py); return the extracted root."""

    def check(root: Path) -> None:
        missing = [lib for lib in _LIBS if not (root / _LIBDIR / lib).exists()]
        if missing:
            raise OracleUnavailable(f"packages lack {', '.join(missing)}")

    try:
        return unpack_debs(PACKAGES, cache or cache_dir(), finish=check)
    except DebsUnavailable as err:
        raise OracleUnavailable(str(err)) from err


# ---------------------------------------------------------------- ctypes mirror


class _YYLTYPE(ctypes.Structure):
    _fields_ = (
        ("first_line", ctypes.c_int),
        ("first_column", ctypes.c_int),
        ("last_line", ctypes.c_int),
        ("last_column", ctypes.c_int),
    )


class _ConfigValue(ctypes.Structure):
    pass


class _ConfigList(ctypes.Structure):
    _fields_ = (
        ("avalues", ctypes.c_int),
        ("nvalues", ctypes.c_int),
        ("values", ctypes.POINTER(ctypes.POINTER(_ConfigValue))),
    )


class _ValueUnion(ctypes.Union):
    _fields_ = (("string", ctypes.c_void_p), ("list", _ConfigList))


_ConfigValue._fields_ = (
    ("type", ctypes.c_int),
    ("u", _ValueUnion),
    ("loc", _YYLTYPE),
)


class _ConfigSetting(ctypes.Structure):
    pass


_ConfigSetting._fields_ = (
    ("next", ctypes.POINTER(_ConfigSetting)),
    ("name", ctypes.c_void_p),
    ("value", ctypes.POINTER(_ConfigValue)),
    ("op", ctypes.c_int),
    ("lineno", ctypes.c_int),
)


class _Config(ctypes.Structure):
    _fields_ = (
        ("settings", ctypes.POINTER(_ConfigSetting)),
        ("report", ctypes.c_void_p),
        ("config_source", ctypes.c_char_p),
    )


def _cstr(ptr: int | None) -> str:
    if not ptr:
        return ""
    return ctypes.string_at(ptr).decode("utf-8", "surrogateescape")


def _walk_value(root: _ConfigValue) -> Value:
    # Iterative: a list may nest thousands deep, beyond Python's recursion limit.
    def children(v: _ConfigValue) -> list[_ConfigValue]:
        lst = v.u.list
        return [lst.values[i].contents for i in range(lst.nvalues)]

    if root.type == XLU_STRING:
        return _cstr(root.u.string)
    stack: list[tuple[list[_ConfigValue], list[Value]]] = [(children(root), [])]
    while True:
        pending, done = stack[-1]
        if len(done) < len(pending):
            child = pending[len(done)]
            if child.type == XLU_STRING:
                done.append(_cstr(child.u.string))
            else:
                stack.append((children(child), []))
            continue
        stack.pop()
        value: Value = tuple(done)
        if not stack:
            return value
        stack[-1][1].append(value)


# ---------------------------------------------------------------- crash predicate


def _string_end(data: bytes, i: int) -> int | None:
    """End (exclusive) of the flex quoted-string token starting at ``i``, or None."""
    quote = data[i]
    j = i + 1
    n = len(data)
    while j < n:
        c = data[j]
        if c == quote:
            return j + 1
        if c == 0x0A:
            return None
        if c == 0x5C:  # backslash pairs with any char but newline
            if j + 1 >= n or data[j + 1] == 0x0A:
                return None
            j += 2
            continue
        j += 1
    return None


_SPACE = b" \t\n\v\f\r"
_SAFE_DEPTH = 4900


def _dequote(token: bytes) -> str:
    """What xlu__cfgl_dequote() does with this token: "abort", "error" or "ok".

    The dequoter measures the token with strlen(), so a NUL byte cuts it short
    and breaks its assert()ed assumptions (ends with the opening quote, no
    backslash as the last character).
    """
    src = token.split(b"\0", 1)[0]
    if len(src) < 2 or src[0] != src[-1]:
        return "abort"
    end = len(src) - 1
    p = 1
    while p < end:
        c = src[p]
        p += 1
        if c != 0x5C:
            continue
        if p >= end:
            return "abort"  # assert(p < src+len-1)
        nc = src[p]
        p += 1
        if nc in b"\"'\\abfnrtv":
            continue
        if nc == ord("x") or not (ord("0") <= nc <= ord("7")):
            return "error"  # \x never has enough digits; others are invalid
        # Octal escape: strtoul(base 10) over the next three bytes.
        buf = src[p : p + 3]
        k = 0
        while k < len(buf) and buf[k] in _SPACE:
            k += 1
        if k < len(buf) and buf[k] in b"+-":
            k += 1
        digits = k
        while k < len(buf) and 0x30 <= buf[k] <= 0x39:
            k += 1
        consumed = k if k > digits else 0
        if consumed <= 1:
            return "error"
        p += consumed
    return "ok"


def _tokens(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The flex scanner's tokens, as far as they matter here; stops at a lexical error."""
    n = len(data)
    i = 0
    while i < n:
        c = data[i]
        if c in b"'\"":
            end = _string_end(data, i)
            if end is None:
                return
            yield "STRING", data[i:end]
            i = end
        elif c == ord("#"):
            nl = data.find(b"\n", i)
            if nl < 0:
                return
            yield "NEWLINE", b"\n"
            i = nl + 1
        elif 0x61 <= c <= 0x7A:
            j = i + 1
            while j < n and (
                0x61 <= data[j] <= 0x7A or 0x30 <= data[j] <= 0x39 or data[j] in b"._"
            ):
                j += 1
            yield "IDENT", data[i:j]
            i = j
        elif 0x30 <= c <= 0x39:
            j = i + 1
            while j < n and (0x30 <= data[j] <= 0x39 or 0x61 <= data[j] <= 0x66 or data[j] == 0x78):
                j += 1
            yield "NUMBER", data[i:j]
            i = j
        elif c == ord("+") and i + 1 < n and data[i + 1] == ord("="):
            yield "+=", b"+="
            i += 2
        elif c in b" \t":
            i += 1
        elif c == ord("\n"):
            yield "NEWLINE", b"\n"
            i += 1
        elif c in b",[]=;":
            yield chr(c), bytes([c])
            i += 1
        else:
            return  # lexical error: sets the error flag, nothing is dequoted after it


def cfg_input_aborts(data: bytes) -> bool:
    """Whether libxlutil's config parser would abort the process on ``data``.

    Only the dequoter can abort, and only on a quoted string holding a NUL byte
    (see _dequote).  It returns early once any error has been recorded, so this
    follows the scanner, the grammar and the ``+=`` type check up to the first
    error, exactly as far as the library dequotes.  (Lists nested deeper than
    _SAFE_DEPTH are refused outright: bison's stack runs out at 4996 levels.)
    """
    if b"\0" not in data:
        return False
    types: dict[bytes, str] = {}
    state = "stmt"  # stmt, ident, value, end, l_open, l_val, l_comma
    depth = 0
    name = b""
    op = ""
    vtype = ""

    def finish_value() -> bool:
        # The assignment is reduced as soon as its value is complete; the
        # += type check runs then, before the next token is scanned.
        if op == "+=" and name in types and types[name] != vtype:
            return False
        types[name] = vtype
        return True

    for kind, text in _tokens(data):
        if kind == "STRING":
            verdict = _dequote(text)
            if verdict == "abort":
                return True
            if verdict == "error":
                return False
        atom = kind in ("STRING", "NUMBER")
        if state == "stmt":
            if kind == "IDENT":
                name, state = text, "ident"
            elif kind not in ("NEWLINE", ";"):
                return False
        elif state == "ident":
            if kind not in ("=", "+="):
                return False
            op, state = kind, "value"
        elif state == "value":
            if atom:
                vtype, state = "string", "end"
                if not finish_value():
                    return False
            elif kind == "[":
                vtype, state, depth = "list", "l_open", 1
            else:
                return False
        elif state == "end":
            if kind not in ("NEWLINE", ";"):
                return False
            state = "stmt"
        else:  # inside a list
            if kind == "NEWLINE":
                continue
            if kind == "]" and state in ("l_open", "l_val", "l_comma"):
                depth -= 1
                state = "l_val"
                if depth == 0:
                    state = "end"
                    if not finish_value():
                        return False
            elif kind == "," and state == "l_val":
                state = "l_comma"
            elif atom and state in ("l_open", "l_comma"):
                state = "l_val"
            elif kind == "[" and state in ("l_open", "l_comma"):
                depth += 1
                state = "l_open"
                if depth > _SAFE_DEPTH:
                    # Near bison's stack limit the parser fails with "memory
                    # exhausted"; refuse rather than model its exact stack.
                    return True
            else:
                return False
    return False


# ---------------------------------------------------------------- the library


class _Report:
    """A FILE* writing into memory (open_memstream), read back as text."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._libc = libc
        self._buf = ctypes.c_void_p()
        self._size = ctypes.c_size_t()
        self.fp = libc.open_memstream(ctypes.byref(self._buf), ctypes.byref(self._size))
        if not self.fp:
            raise OSError("open_memstream failed")

    def close(self) -> str:
        self._libc.fclose(ctypes.c_void_p(self.fp))
        text = ctypes.string_at(self._buf, self._size.value) if self._buf else b""
        self._libc.free(self._buf)
        return text.decode("utf-8", "surrogateescape")


class Libxlu:
    """The loaded libxlutil + libxenlight, with typed entry points."""

    def __init__(self, root: Path) -> None:
        libdir = root / _LIBDIR
        self.root = root
        self._keep = [ctypes.CDLL(str(libdir / name), mode=ctypes.RTLD_GLOBAL) for name in _LIBS]
        self.xl = self._keep[-2]
        self.xlu = self._keep[-1]
        self.libc = ctypes.CDLL(None)
        self._declare()

    def _declare(self) -> None:
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        libc, xl, xlu = self.libc, self.xl, self.xlu
        libc.open_memstream.restype = vp
        libc.open_memstream.argtypes = [vp, vp]
        libc.fclose.argtypes = [vp]
        libc.free.argtypes = [vp]
        xlu.xlu_cfg_init.restype = ctypes.POINTER(_Config)
        xlu.xlu_cfg_init.argtypes = [vp, cp]
        xlu.xlu_cfg_destroy.argtypes = [ctypes.POINTER(_Config)]
        xlu.xlu_cfg_readdata.argtypes = [ctypes.POINTER(_Config), cp, ci]
        xlu.xlu_cfg_get_string.argtypes = [ctypes.POINTER(_Config), cp, vp, ci]
        xlu.xlu_cfg_get_long.argtypes = [ctypes.POINTER(_Config), cp, vp, ci]
        xlu.xlu_disk_parse.argtypes = [ctypes.POINTER(_Config), ci, vp, vp]
        xlu.xlu_pci_parse_spec_string.argtypes = [ctypes.POINTER(_Config), vp, cp]
        xlu.xlu_vif_parse_rate.argtypes = [ctypes.POINTER(_Config), cp, vp]
        for kind in ("disk", "pci", "nic"):
            getattr(xl, f"libxl_device_{kind}_init").argtypes = [vp]
            getattr(xl, f"libxl_device_{kind}_dispose").argtypes = [vp]
            to_json = getattr(xl, f"libxl_device_{kind}_to_json")
            to_json.argtypes = [vp, vp]
            to_json.restype = vp

    # -- config files

    def _open(self, source: bytes) -> tuple[_Report, ctypes._Pointer[_Config]]:
        report = _Report(self.libc)
        cfg = self.xlu.xlu_cfg_init(report.fp, source)
        if not cfg:
            report.close()
            raise MemoryError("xlu_cfg_init failed")
        return report, cfg

    def parse_cfg(self, data: bytes, *, source: str = "config") -> OracleCfg:
        """Parse a whole config file with ``xlu_cfg_readdata``."""
        if cfg_input_aborts(data):
            raise OracleRefuses("a quoted string holding a NUL byte aborts libxlutil")
        report, cfg = self._open(source.encode())
        try:
            rc = self.xlu.xlu_cfg_readdata(cfg, data, len(data))
            settings: list[OracleSetting] = []
            node = cfg.contents.settings
            while node:
                s = node.contents
                settings.append(
                    OracleSetting(
                        name=_cstr(s.name),
                        op="+=" if s.op == XLU_OP_ADDITION else "=",
                        lineno=s.lineno,
                        value=_walk_value(s.value.contents),
                    )
                )
                node = s.next
        finally:
            self.xlu.xlu_cfg_destroy(cfg)
            text = report.close()
        settings.reverse()
        return OracleCfg(
            ok=rc == 0,
            rc=rc,
            report=text,
            likely_python="Python" in text,
            settings=tuple(settings),
            data=data,
            lib=self,
        )

    def _lookup(self, data: bytes, name: str, kind: str) -> OracleLookup:
        if cfg_input_aborts(data):
            raise OracleRefuses("a quoted string holding a NUL byte aborts libxlutil")
        report, cfg = self._open(b"config")
        try:
            self.xlu.xlu_cfg_readdata(cfg, data, len(data))
            value: str | int | None = None
            if kind == "string":
                out = ctypes.c_void_p()
                rc = self.xlu.xlu_cfg_get_string(cfg, name.encode(), ctypes.byref(out), 0)
                if rc == 0:
                    value = _cstr(out.value)
            else:
                num = ctypes.c_long()
                rc = self.xlu.xlu_cfg_get_long(cfg, name.encode(), ctypes.byref(num), 0)
                if rc == 0:
                    value = num.value
        finally:
            self.xlu.xlu_cfg_destroy(cfg)
            text = report.close()
        return OracleLookup(rc=rc, value=value, report=text)

    # -- device specs

    def _device(self, kind: str, parse: object) -> OracleDevice:
        buf = ctypes.create_string_buffer(_DEVICE_BUFSIZE)
        getattr(self.xl, f"libxl_device_{kind}_init")(buf)
        report, cfg = self._open(b"spec")
        try:
            rc = parse(cfg, buf)  # type: ignore[operator]
            raw = getattr(self.xl, f"libxl_device_{kind}_to_json")(None, buf)
            doc: dict[str, object] | None = None
            if raw:
                text = ctypes.string_at(raw).decode("utf-8", "surrogateescape")
                self.libc.free(raw)
                doc = json.loads(text)
        finally:
            getattr(self.xl, f"libxl_device_{kind}_dispose")(buf)
            self.xlu.xlu_cfg_destroy(cfg)
            out = report.close()
        return OracleDevice(ok=rc == 0, rc=rc, report=out, json=doc)

    @staticmethod
    def _cbytes(text: str) -> bytes:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as err:
            raise OracleRefuses(f"not representable as bytes: {err}") from err
        if b"\0" in raw:
            raise OracleRefuses("a C string cannot hold a NUL byte")
        return raw

    def parse_disk(self, specs: Sequence[str]) -> OracleDevice:
        """Run ``xlu_disk_parse`` over ``specs`` (one disk); JSON of the result."""
        if isinstance(specs, str):
            specs = [specs]
        raw = [self._cbytes(s) for s in specs]
        if any(b"=\n" in r for r in raw):
            # An "=" that the disk scanner reaches as a token start, followed by
            # a newline, jams flex ("flex scanner jammed") and exit()s the
            # process.  Refusing every "=\n" is a slight superset of that.
            raise OracleRefuses("'=' before a newline makes the disk scanner exit")
        arr = (ctypes.c_char_p * max(1, len(raw)))(*raw)

        def parse(cfg: object, buf: object) -> int:
            return int(self.xlu.xlu_disk_parse(cfg, len(raw), arr, buf))

        return self._device("disk", parse)

    def parse_pci(self, spec: str) -> OracleDevice:
        """Run ``xlu_pci_parse_spec_string``; JSON of the libxl_device_pci."""
        raw = self._cbytes(spec)

        def parse(cfg: object, buf: object) -> int:
            return int(self.xlu.xlu_pci_parse_spec_string(cfg, buf, raw))

        return self._device("pci", parse)

    def parse_vif_rate(self, rate: str) -> OracleDevice:
        """Run ``xlu_vif_parse_rate``; JSON holds only the nic's ``rate_*`` fields."""
        raw = self._cbytes(rate)

        def parse(cfg: object, buf: object) -> int:
            return int(self.xlu.xlu_vif_parse_rate(cfg, raw, buf))

        res = self._device("nic", parse)
        if res.json is not None:
            rates = {k: v for k, v in res.json.items() if k.startswith("rate_")}
            res = OracleDevice(ok=res.ok, rc=res.rc, report=res.report, json=rates)
        return res


_LOADED: Libxlu | None = None


def load() -> Libxlu:
    """Fetch (once per machine) and load (once per process) the library."""
    global _LOADED
    if _LOADED is None:
        root = ensure_root()
        try:
            _LOADED = Libxlu(root)
        except OSError as err:
            raise OracleUnavailable(f"cannot load libxlutil: {err}") from err
    return _LOADED
