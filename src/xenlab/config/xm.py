"""Conversion of xm-era (Python) domain configs to xl configs: :func:`convert_xm`.

xm (xend, removed from Xen in 2014) *executed* its config files as Python 2;
xl's libxlutil reads a small language of ``name = value`` lines instead and
gives up on ``+ - . ( ) :`` outside strings.  :func:`convert_xm` reads an xm
file with :mod:`ast` and evaluates it with a restricted evaluator that never
runs the code, maps the Python values to xl values, renames or drops the keys
that xm knew and xl does not, and writes an xl file.

The restricted evaluator, its limits and their reasons are in
:mod:`xenlab.config.xmeval`.

Names
    A name that is not a valid xl identifier (xl wants ``[a-z][a-z0-9_.]*``:
    ``BASE``, ``_tmp``, ``vmId``) is a helper variable: it can be referenced
    by later lines but is not written, and a note says so.  xm itself only
    read the option names it knew, so such names never configured anything.
    Other names are written as they are (xl, too, ignores names it does not
    know), except the xm options in the translation table of
    :class:`_Translator`, which are renamed, folded into others or dropped
    with a note.  ``None`` values are dropped with a note.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from xenlab.config.errors import ConfigError, ConfigWarning, config_error
from xenlab.config.values import Value
from xenlab.config.writer import format_settings
from xenlab.config.xmeval import (
    MAX_EXPR_DEPTH,
    MAX_SOURCE_CHARS,
    MAX_STRING_CHARS,
    MAX_VALUE_DEPTH,
    MAX_VALUE_UNITS,
    MAX_WORK_UNITS,
    Entry,
    Evaluator,
    Py,
    Seq,
    parse_python,
    xm_text,
)

__all__ = [
    "MAX_EXPR_DEPTH",
    "MAX_SOURCE_CHARS",
    "MAX_STRING_CHARS",
    "MAX_VALUE_DEPTH",
    "MAX_VALUE_UNITS",
    "MAX_WORK_UNITS",
    "XmConversion",
    "convert_xm",
]

_XL_NAME = re.compile(r"[a-z][._0-9a-z]*\Z")

@dataclass(frozen=True, slots=True)
class XmConversion:
    """The result of converting an xm config.

    ``settings`` are the xl names and values in file order (each name once,
    at its first assignment, with its final value); ``notes`` say what was
    changed, renamed or dropped, with the xm line (line 0 for notes about the
    whole file, such as a default that differs between xm and xl); ``text``
    is the xl file: the notes as comments, then one line per setting, and it
    parses back to exactly ``settings``.
    """

    settings: tuple[tuple[str, Value], ...]
    notes: tuple[ConfigWarning, ...]
    text: str

    def get(self, name: str) -> Value | None:
        """Return the value of ``name``, or None when it is not set."""
        for key, value in self.settings:
            if key == name:
                return value
        return None


# --------------------------------------------------------------------------
# Python values to xl values


def _xl_value(ev: Evaluator, entry: Entry, value: Py) -> Value:
    name = entry.name
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if "\0" in value:
            raise config_error(
                ev.source,
                entry.line,
                entry.col,
                f"value of `{name}` contains a NUL character, which xl strings cannot hold",
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise config_error(
                ev.source,
                entry.line,
                entry.col,
                f"value of `{name}` contains an unpaired surrogate, which is not text",
            ) from None
        return value
    if value is None:
        raise config_error(
            ev.source,
            entry.line,
            entry.col,
            f"`{name}` has None inside a list; xl lists hold only strings, numbers and lists",
        )
    return tuple(_xl_value(ev, entry, item) for item in value.items)


# --------------------------------------------------------------------------
# Key translation: xm names and values to xl ones

_XM_ACTIONS = frozenset(
    {"destroy", "restart", "preserve", "rename-restart", "coredump-destroy", "coredump-restart"}
)
_XL_ACTIONS = _XM_ACTIONS | {"soft-reset"}
_ACTION_KEYS = ("on_poweroff", "on_reboot", "on_crash")
_RESTART_MODES: dict[str, tuple[str, str, str]] = {
    "onreboot": ("destroy", "restart", "destroy"),
    "always": ("restart", "restart", "restart"),
    # xend wrote the invalid action 'never' here; what was meant is destroy.
    "never": ("destroy", "destroy", "destroy"),
}
_TSC_MODES = ("default", "always_emulate", "native", "native_paravirt")
_TIMER_MODES = (
    "delay_for_missed_ticks",
    "no_delay_for_missed_ticks",
    "no_missed_ticks_pending",
    "one_missed_tick_pending",
)
_RENAMES = {"cpu_cap": "cap", "irq": "irqs"}
_IP_KEYS = ("ip", "gateway", "netmask", "hostname", "interface", "dhcp", "nfs_server", "nfs_root")
#: xm options with no xl equivalent, and why.
_DROPPED: dict[str, str] = {
    "vncconsole": "xl has no such option; use `xl create -V` to start a VNC viewer",
    "vncviewer": "xl ignores it; use `xl create -V` to start a VNC viewer",
    "description": "xl has no description option",
    "features": "xl has no PV `features` option",
    "vscsi": "xl 4.17 has no PV SCSI option",
    "vusb": "xl describes USB with `usbctrl` and `usbdev`, in another syntax",
    "fda": "xl cannot attach floppy disks",
    "fdb": "xl cannot attach floppy disks",
    "isa": "xl has no ISA-only machine option",
    "guest_os_type": "xl has no guest OS type option",
    "parallel": "xl has no parallel port option",
    "monitor": "xl has no device-model monitor option",
    "monitor_path": "xl has no device-model monitor option",
    "on_xend_start": "there is no xend under xl",
    "on_xend_stop": "there is no xend under xl",
    "target": "xl sets up stub domains itself",
    "memory_sharing": "xl has no memory sharing option",
    "s3_integrity": "xl has no tboot S3 integrity option",
    "machine_address_size": "xl has no machine address size option",
    "suppress_spurious_page_faults": "xl has no such option",
    "superpages": "xl has no superpages option",
    "cpuid_check": "xl has no cpuid_check option",
    "access_control": "xl labels domains with `seclabel` instead",
    "vhpt": "an IA64 option",
    "nics": "deprecated in xm; the number of `vif` entries counts",
    "bootentry": "deprecated in xm; pass the entry in `bootloader_args`",
}


@dataclass(slots=True)
class _Translator:
    ev: Evaluator
    entries: list[Entry] = field(default_factory=list)

    def note(self, line: int, message: str) -> None:
        self.ev.note(line, message)

    def find(self, name: str) -> Entry | None:
        for entry in self.entries:
            if entry.name == name:
                return entry
        return None

    def remove(self, name: str) -> Entry | None:
        entry = self.find(name)
        if entry is not None:
            self.entries.remove(entry)
        return entry

    def replace(self, old: Entry, new: Iterable[Entry]) -> None:
        index = self.entries.index(old)
        self.entries[index : index + 1] = list(new)

    def error(self, entry: Entry, message: str) -> ConfigError:
        return config_error(self.ev.source, entry.line, entry.col, message)

    def run(self) -> None:
        guest_type = self.guest_type()
        for handler in (
            self.builder,
            self.kernel_and_loader,
            self.device_model,
            self.renames,
            self.cpu,
            self.vcpu_avail,
            self.restart,
            self.actions,
            self.modes,
            self.bootargs,
            self.ip_family,
            self.cmdline,
            self.vfb,
            self.backends,
            self.dropped,
            self.boot,
        ):
            handler(guest_type)
        self.defaults()

    def guest_type(self) -> str | None:
        builder = self.find("builder")
        typ = self.find("type")
        if typ is not None and typ.value not in ("pv", "pvh", "hvm"):
            # xm never read `type`, so here it is a helper variable (say,
            # for vif strings); xl would take it as the guest type.
            self.remove("type")
            self.note(
                typ.line,
                f"dropped `type = {typ.value!r}`: xm ignored it, and xl would "
                "read it as the guest type",
            )
            typ = None
        if builder is None:
            return typ.value if typ is not None else None  # type: ignore[return-value]
        if builder.value == "hvm":
            from_builder = "hvm"
        elif builder.value in ("linux", "generic"):
            from_builder = "pv"
        else:
            raise self.error(
                builder,
                f"builder {builder.value!r} is unknown, expected 'hvm', 'linux' or 'generic'",
            )
        if typ is not None and typ.value != from_builder:
            raise self.error(builder, f"builder {builder.value!r} contradicts type {typ.value!r}")
        return from_builder

    def builder(self, guest_type: str | None) -> None:
        builder = self.find("builder")
        if builder is None:
            return
        if self.find("type") is not None:
            self.remove("builder")
            self.note(builder.line, "dropped `builder`: `type` already says the same")
            return
        self.replace(builder, [Entry("type", guest_type, builder.line)])
        self.note(
            builder.line,
            f'`builder = {builder.value!r}` became `type = "{guest_type}"` '
            "(xl deprecates `builder`, and rejects 'linux')",
        )

    def kernel_and_loader(self, guest_type: str | None) -> None:
        kernel = self.find("kernel")
        if (
            guest_type == "hvm"
            and kernel is not None
            and isinstance(kernel.value, str)
            and posixpath.basename(kernel.value) == "hvmloader"
        ):
            self.remove("kernel")
            self.note(
                kernel.line,
                "dropped `kernel = hvmloader`: xl loads the HVM firmware itself "
                "(use `firmware_override` for a non-default one)",
            )
        loader = self.find("loader")
        if loader is None:
            return
        if isinstance(loader.value, str) and posixpath.basename(loader.value) == "hvmloader":
            self.remove("loader")
            self.note(loader.line, "dropped `loader = hvmloader`: xl loads the HVM firmware itself")
        else:
            self.replace(loader, [Entry("firmware_override", loader.value, loader.line)])
            self.note(loader.line, "renamed `loader` to `firmware_override`")

    def device_model(self, guest_type: str | None) -> None:
        entry = self.find("device_model")
        if entry is None:
            return
        path = entry.value if isinstance(entry.value, str) else ""
        base = posixpath.basename(path)
        if base == "qemu-dm":
            self.remove("device_model")
            self.note(
                entry.line,
                f"dropped `device_model = {path!r}`: it named xm's default device model, "
                "and xl picks its own (xl ignores `device_model`)",
            )
        elif "stubdom-dm" in base:
            if guest_type == "hvm":
                self.replace(entry, [Entry("device_model_stubdomain_override", True, entry.line)])
                self.note(
                    entry.line,
                    f"`device_model = {path!r}` became `device_model_stubdomain_override = 1`",
                )
            else:
                self.remove("device_model")
                self.note(entry.line, "dropped `device_model`: stub domains are for HVM guests")
        else:
            self.replace(entry, [Entry("device_model_override", entry.value, entry.line)])
            self.note(
                entry.line,
                "renamed `device_model` to `device_model_override` (xl ignores "
                "`device_model`); xm's device models were qemu-xen-traditional, so also "
                "set `device_model_version` to match the binary",
            )

    def renames(self, guest_type: str | None) -> None:
        for old, new in _RENAMES.items():
            entry = self.find(old)
            if entry is None:
                continue
            value = entry.value
            if new == "irqs" and not isinstance(value, Seq):
                value = Seq((value,), True, 2, 1)
            if self.find(new) is not None:
                self.remove(old)
                self.note(entry.line, f"dropped `{old}`: `{new}` is also set and wins")
            else:
                self.replace(entry, [Entry(new, value, entry.line)])
                self.note(entry.line, f"renamed `{old}` to `{new}`")

    def cpu(self, guest_type: str | None) -> None:
        entry = self.find("cpu")
        if entry is None:
            return
        cpus = self.find("cpus")
        if cpus is None:
            self.replace(entry, [Entry("cpus", str(entry.value), entry.line)])
            self.note(entry.line, "`cpu` (xm's deprecated pinning) became `cpus`")
        elif isinstance(cpus.value, str | int):
            self.remove("cpu")
            cpus.value = f"{entry.value},{cpus.value}"
            self.note(entry.line, "merged `cpu` into `cpus` as xm did (`cpu,cpus`)")
        else:
            self.remove("cpu")
            self.note(entry.line, "dropped `cpu`: xm ignored it beside a per-vCPU `cpus` list")

    def vcpu_avail(self, guest_type: str | None) -> None:
        entry = self.find("vcpu_avail")
        if entry is None:
            return
        mask = entry.value
        vcpus_entry = self.find("vcpus")
        vcpus = vcpus_entry.value if vcpus_entry is not None else 1
        # xl can start the first N vCPUs online and no other set, so only a
        # mask of the low bits has an xl form.
        if not (
            isinstance(mask, int)
            and not isinstance(mask, bool)
            and isinstance(vcpus, int)
            and mask > 0
            and mask & (mask + 1) == 0
            and self.find("maxvcpus") is None
        ):
            self.remove("vcpu_avail")
            self.note(
                entry.line,
                "dropped `vcpu_avail`: xl can only start the first N vCPUs online "
                "(`vcpus = N` with `maxvcpus`)",
            )
            return
        online = mask.bit_length()
        if online >= vcpus:
            self.remove("vcpu_avail")
            self.note(entry.line, "dropped `vcpu_avail`: every vCPU starts online")
            return
        maxvcpus = Entry("maxvcpus", vcpus, entry.line)
        self.replace(entry, [maxvcpus])
        if vcpus_entry is not None:
            vcpus_entry.value = online
        else:
            self.entries.insert(self.entries.index(maxvcpus), Entry("vcpus", online, entry.line))
        self.note(
            entry.line,
            f"`vcpu_avail = {mask:#x}` became `vcpus = {online}` with `maxvcpus = {vcpus}`",
        )

    def restart(self, guest_type: str | None) -> None:
        entry = self.find("restart")
        if entry is None:
            return
        mode = _RESTART_MODES.get(entry.value) if isinstance(entry.value, str) else None
        if mode is None:
            self.remove("restart")
            self.note(entry.line, f"dropped `restart = {entry.value!r}`: xend ignored that value")
            return
        for key in _ACTION_KEYS:
            if self.remove(key) is not None:
                self.note(entry.line, f"`restart` overrides `{key}`, as it did in xend")
        self.replace(
            entry,
            [
                Entry(key, action, entry.line)
                for key, action in zip(_ACTION_KEYS, mode, strict=True)
            ],
        )
        self.note(entry.line, f"`restart = {entry.value!r}` became on_poweroff/on_reboot/on_crash")

    def actions(self, guest_type: str | None) -> None:
        for key in (*_ACTION_KEYS, "on_watchdog", "on_soft_reset"):
            entry = self.find(key)
            if entry is not None and entry.value not in _XL_ACTIONS:
                raise self.error(
                    entry,
                    f"`{key}` action {entry.value!r} is unknown, expected one of "
                    + ", ".join(sorted(_XL_ACTIONS)),
                )

    def modes(self, guest_type: str | None) -> None:
        for key, names in (("tsc_mode", _TSC_MODES), ("timer_mode", _TIMER_MODES)):
            entry = self.find(key)
            if entry is None or isinstance(entry.value, bool) or not isinstance(entry.value, int):
                continue
            if not 0 <= entry.value < len(names):
                raise self.error(
                    entry, f"`{key}` {entry.value} is out of range, expected 0 to {len(names) - 1}"
                )
            new = names[entry.value]
            self.note(
                entry.line,
                f'`{key} = {entry.value}` became `{key} = "{new}"` (xl deprecates the numbers)',
            )
            entry.value = new

    def bootargs(self, guest_type: str | None) -> None:
        entry = self.find("bootargs")
        if entry is None:
            return
        if self.find("bootloader_args") is not None:
            self.remove("bootargs")
            self.note(entry.line, "dropped `bootargs`: `bootloader_args` is also set")
            return
        if isinstance(entry.value, str):
            try:
                words = shlex.split(entry.value)
            except ValueError as err:
                raise self.error(entry, f"cannot split `bootargs` into words: {err}") from None
            value: Py = Seq(tuple(words), True, 1 + sum(len(w) + 1 for w in words), 1)
        else:
            value = entry.value
        self.replace(entry, [Entry("bootloader_args", value, entry.line)])
        self.note(entry.line, "`bootargs` became the list `bootloader_args` (split as xend did)")

    def ip_family(self, guest_type: str | None) -> None:
        found = {key: e for key in _IP_KEYS if (e := self.find(key)) is not None}
        if not found:
            return
        values = {key: xm_text(e.value) for key, e in found.items()}
        first = min(found.values(), key=self.entries.index)
        index = self.entries.index(first)
        extra = self.find("extra")
        old_args = xm_text(extra.value) if extra is not None else ""
        args = old_args
        # xm built these into the kernel command line (xm/create.py's
        # preprocess_ip and preprocess_nfs, then XendConfig); xl does not
        # know them, so the command line they made is written out instead.
        nfs_server = values.get("nfs_server", "")
        if values.get("nfs_root"):
            if not nfs_server:
                raise self.error(found["nfs_root"], "`nfs_root` needs `nfs_server`, as in xm")
            args = f"nfsroot={nfs_server}:{values['nfs_root']} {args}"
        ip = values.get("ip", "")
        dhcp = values.get("dhcp", "off")
        if (ip or dhcp != "off") and not re.search(r"ip=[^ ]+", args):
            fields = (
                ip,
                nfs_server or "127.0.255.255",
                values.get("gateway", ""),
                values.get("netmask", ""),
                values.get("hostname", ""),
                values.get("interface", "eth0"),
                dhcp,
            )
            args = "ip=" + ":".join(fields) + " " + args
        args = args.rstrip(" ") if not old_args else args
        for key in found:
            self.remove(key)
        if extra is not None:
            extra.value = args
        elif args:
            self.entries.insert(index, Entry("extra", args, first.line))
        names = ", ".join(f"`{key}`" for key in found)
        if args == old_args:
            self.note(first.line, f"dropped {names}: xm added nothing to the command line")
        else:
            self.note(
                first.line, f"folded {names} into `extra` (the kernel command line), as xm did"
            )

    def cmdline(self, guest_type: str | None) -> None:
        entry = self.find("cmdline")
        if entry is not None and (self.find("root") or self.find("extra")):
            # xm never read `cmdline`; xl would use it and ignore root/extra.
            self.remove("cmdline")
            self.note(
                entry.line,
                "dropped `cmdline`: xm ignored it, and xl would use it in place of "
                "`root` and `extra`",
            )

    def vfb(self, guest_type: str | None) -> None:
        entry = self.find("vfb")
        if entry is None or not isinstance(entry.value, Seq):
            return
        specs: list[Py] = []
        changed = False
        for spec in entry.value.items:
            if isinstance(spec, str):
                parts = [p.strip() for p in spec.split(",")]
                new_parts = [{"type=vnc": "vnc=1", "type=sdl": "sdl=1"}.get(p, p) for p in parts]
                if new_parts != parts:
                    changed = True
                    spec = ",".join(new_parts)
            specs.append(spec)
        if changed:
            entry.value = Seq(tuple(specs), True, entry.value.units, entry.value.depth)
            self.note(entry.line, "`vfb`: xm's `type=vnc`/`type=sdl` became `vnc=1`/`sdl=1`")

    def backends(self, guest_type: str | None) -> None:
        for key in ("blkif", "netif"):
            entry = self.find(key)
            if entry is None:
                continue
            if entry.value and self.find("driver_domain") is None:
                self.replace(entry, [Entry("driver_domain", True, entry.line)])
                self.note(entry.line, f"`{key}` (a backend domain) became `driver_domain = 1`")
            else:
                self.remove(key)
                self.note(entry.line, f"dropped `{key}`")

    def dropped(self, guest_type: str | None) -> None:
        for key, why in _DROPPED.items():
            entry = self.remove(key)
            if entry is not None:
                self.note(entry.line, f"dropped `{key}`: {why}")

    def boot(self, guest_type: str | None) -> None:
        entry = self.find("boot")
        if entry is not None and isinstance(entry.value, str):
            odd = sorted(set(entry.value) - set("cdn"))
            if odd:
                self.note(
                    entry.line,
                    f"`boot` has {', '.join(odd)}: xl boots only from c (disk), d (CD-ROM) "
                    "and n (network)",
                )

    def defaults(self) -> None:
        if not any(self.find(key) for key in ("on_crash",)):
            self.note(
                0,
                "xm restarted a crashed domain by default, xl destroys it: "
                'add `on_crash = "restart"` to keep xm\'s behaviour',
            )
        if self.find("memory") is None:
            self.note(0, "xm gave 128 MiB when `memory` was not set, xl gives 32 MiB")
        if self.find("name") is None:
            self.note(0, "xl needs `name`; the file sets none")


# --------------------------------------------------------------------------
# Writing the xl file


def _comment(text: str) -> str:
    # A comment runs to the end of the line, so a value with a newline in a
    # note must not end it early.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _render(
    source: str,
    settings: tuple[tuple[str, Value], ...],
    notes: tuple[ConfigWarning, ...],
) -> str:
    lines = [f"# xl config converted from the xm config {_comment(source)} by xenlab.\n"]
    for note in notes:
        where = f"line {note.line}" if note.line else "file"
        lines.append(f"# {where}: {_comment(note.message)}\n")
    lines.append("\n")
    return "".join(lines) + format_settings(settings)


# --------------------------------------------------------------------------
# Entry point


def convert_xm(text: str | bytes, *, source: str = "<xm>") -> XmConversion:
    """Convert the xm (Python) config ``text`` to an xl config, without running it.

    ``text`` may be bytes, which must be UTF-8.  ``source`` names the file in
    messages.  Returns the xl settings in file order, notes on everything that
    was renamed, changed or dropped, and the xl text.

    :raise ConfigError: when the text is not UTF-8 or not Python, uses a
        construct outside the allowed subset (imports, calls, attribute
        access, ``if``/``for``/``def``, subscripts...), exceeds a size limit,
        or sets a value xl cannot hold or xm itself would reject (an unknown
        ``builder`` or ``on_*`` action).  The error is placed at the node.
    """
    text, tree = parse_python(text, source)
    ev = Evaluator(source, text)
    ev.run(tree)
    translator = _Translator(ev)
    for name, binding in ev.env.items():
        if not _XL_NAME.match(name):
            ev.note(
                binding.line,
                f"`{name}` is not an xl name (xl names are lowercase letters, digits, `_` "
                "and `.`, starting with a letter): kept as a helper variable, not written",
            )
            continue
        if binding.value is None:
            ev.note(binding.line, f"dropped `{name}`: it is None, which xl has no value for")
            continue
        translator.entries.append(Entry(name, binding.value, binding.line, binding.col))
    translator.run()
    settings = tuple(
        (entry.name, _xl_value(ev, entry, entry.value)) for entry in translator.entries
    )
    notes = tuple(sorted(ev.notes, key=lambda n: n.line))
    return XmConversion(settings, notes, _render(source, settings, notes))
