"""The typed domain configuration built from a parsed xl config: :func:`domain_config`.

:func:`domain_config` reads a :class:`~xenlab.config.values.ConfigFile` the
way xl 4.17's ``parse_config_data`` (tools/xl/xl_parse.c) does, makes the
checks xl, libxl and libxc make before a domain exists, and returns a frozen
:class:`DomainConfig` or raises one :class:`ConfigError` listing every
problem; :func:`domain_config_to_json` renders it as JSON-ready data.  Each
key goes through a getter that behaves like libxlutil's (the last statement
wins, a value of the wrong shape is reported), and :mod:`xenlab.config.keys`
says whether xl warns (a :class:`ConfigWarning`, placed at a line) or exits (a
problem, placed at the value).  Defaults are xl's and libxl's, and every check
beyond xl has its reason.  The design (the getters, the defaults and the added
checks, with their reasons) is in docs/config.md, section Domain model.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from xenlab.config.clib import strtol0
from xenlab.config.errors import ConfigError, ConfigWarning
from xenlab.config.keys import KEYS, XENLAB_KEYS, KeyInfo, KeyKind, Severity
from xenlab.config.specs.cpus import CpuSet, format_cpus, parse_cpus
from xenlab.config.specs.disk import DiskSpec, disk_to_libxl_json, parse_disk
from xenlab.config.specs.pci import PciSpec, RdmPolicy, parse_pci, pci_to_libxl_json
from xenlab.config.specs.vif import VifSpec, parse_vif_with_warnings, vif_to_libxl_json
from xenlab.config.specs.vnuma import VnumaNode, parse_vnuma, vnuma_to_libxl_json
from xenlab.config.values import ConfigFile, Op, Setting, Value, value_to_json
from xenlab.errors import Problem

__all__ = [
    "Arch",
    "DeviceModelVersion",
    "DomainConfig",
    "DomainType",
    "ShutdownAction",
    "domain_config",
    "domain_config_to_json",
]


class DomainType(enum.Enum):
    """The guest type (``type=``); values are xl's names."""

    PV = "pv"
    PVH = "pvh"
    HVM = "hvm"


class Arch(enum.Enum):
    """The host architecture, which decides xl's default guest type."""

    X86 = "x86"
    ARM = "arm"


class ShutdownAction(enum.Enum):
    """What to do when the guest shuts down (``on_*=``); values are xl's names."""

    DESTROY = "destroy"
    RESTART = "restart"
    RENAME_RESTART = "rename-restart"
    PRESERVE = "preserve"
    COREDUMP_DESTROY = "coredump-destroy"
    COREDUMP_RESTART = "coredump-restart"
    SOFT_RESET = "soft-reset"


class DeviceModelVersion(enum.Enum):
    """``device_model_version=``; values are xl's names."""

    QEMU_XEN = "qemu-xen"
    QEMU_XEN_TRADITIONAL = "qemu-xen-traditional"


#: A cpus setting: one set for every vCPU, or one per vCPU (the list form).
CpuAffinity = CpuSet | tuple[CpuSet, ...]

# Keys with a field of their own in DomainConfig (everything else known goes
# to ``extra``).
_TYPED_KEYS: Final = frozenset(
    {
        "name", "type", "builder", "uuid", "memory", "maxmem", "vcpus", "maxvcpus",
        "cpus", "cpus_soft", "kernel", "ramdisk", "cmdline", "root", "extra",
        "bootloader", "on_poweroff", "on_reboot", "on_crash", "on_watchdog",
        "on_soft_reset", "boot", "serial", "vfb", "vnc", "vnclisten", "vncdisplay",
        "vncpasswd", "sdl", "usb", "usbdevice", "gfx_passthru", "nographic",
        "device_model_version", "disk", "vif", "pci", "vnuma",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DomainConfig:
    """A domain configuration as xl understands it, with defaults applied.

    ``None`` means "not given" where xl/libxl pick a default later (for
    example ``vnc``).  ``extra`` holds every other key xl knows, with its raw
    value; ``warnings`` what xl (or we) would warn about.
    """

    name: str
    type: DomainType
    memory_mib: int
    maxmem_mib: int
    vcpus: int
    maxvcpus: int
    uuid: str | None = None
    cpus: CpuAffinity | None = None
    cpus_soft: CpuAffinity | None = None
    kernel: str | None = None
    ramdisk: str | None = None
    cmdline: str | None = None
    bootloader: str | None = None
    on_poweroff: ShutdownAction = ShutdownAction.DESTROY
    on_reboot: ShutdownAction = ShutdownAction.RESTART
    on_crash: ShutdownAction = ShutdownAction.DESTROY
    on_watchdog: ShutdownAction = ShutdownAction.DESTROY
    on_soft_reset: ShutdownAction = ShutdownAction.SOFT_RESET
    boot: str | None = None
    serial: tuple[str, ...] = ()
    vfb: tuple[str, ...] = ()
    vnc: bool | None = None
    vnclisten: str | None = None
    vncdisplay: int | None = None
    vncpasswd: str | None = None
    sdl: bool | None = None
    usb: bool | None = None
    usbdevice: tuple[str, ...] = ()
    gfx_passthru: bool | None = None
    gfx_passthru_kind: str | None = None
    nographic: bool | None = None
    device_model_version: DeviceModelVersion | None = None
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    pcis: tuple[PciSpec, ...] = ()
    vnuma: tuple[VnumaNode, ...] = ()
    extra: Mapping[str, Value] = field(default_factory=lambda: MappingProxyType({}))
    warnings: tuple[ConfigWarning, ...] = ()


# --- libxlutil's getters ---------------------------------------------------

_UUID: Final = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_VIRIDIAN: Final = frozenset(
    {
        "base", "freq", "time_ref_count", "reference_tsc", "hcall_remote_tlb_flush",
        "apic_assist", "crash_ctl", "synic", "stimer", "hcall_ipi",
        "ex_processor_masks", "no_vp_limit", "cpu_hotplug",
    }
)  # fmt: skip
# hvm_info_table.h: the MMIO hole is between 256 MiB and 3840 MiB.
_MMIO_HOLE_MIB: Final = (256, 3840)
_LIBXL_DEFAULT_MEMORY_MIB: Final = 32


class _Reader:
    """Reads keys from a ConfigFile like libxlutil, collecting problems and warnings."""

    def __init__(self, cfg: ConfigFile) -> None:
        self.cfg = cfg
        self.source = cfg.source
        self.latest = cfg.latest()
        self.problems: list[Problem] = []
        self.warnings: list[ConfigWarning] = []

    def error(self, setting: Setting | None, message: str) -> None:
        line, col = (setting.line, setting.col) if setting else (1, 1)
        self.problems.append(Problem(self.source, line, col, message))

    def warn(self, setting: Setting | None, message: str) -> None:
        self.warnings.append(ConfigWarning(self.source, setting.line if setting else 1, message))

    def bad(self, info: KeyInfo, setting: Setting, message: str) -> None:
        if info.on_bad is Severity.ERROR:
            self.error(setting, message)
        else:
            self.warn(setting, f"{message}; ignored")

    def setting(self, name: str) -> Setting | None:
        return self.latest.get(name)

    def string(self, name: str) -> str | None:
        """``xlu_cfg_get_string``: the value, or None when absent or a list."""
        setting = self.setting(name)
        if setting is None:
            return None
        if not isinstance(setting.value, str):
            self.bad(
                _info(name), setting, f"parameter {name!r} is a list but should be a single value"
            )
            return None
        return setting.value

    def number(self, name: str, *, quiet: bool = False) -> int | None:
        """``xlu_cfg_get_long`` (or bounded): the number, or None when unusable."""
        setting = self.setting(name)
        if setting is None:
            return None
        info = _info(name)
        found = setting

        def report(message: str) -> None:
            if not quiet:
                self.bad(info, found, message)

        if not isinstance(setting.value, str):
            report(f"parameter {name!r} is a list but should be a single value")
            return None
        if setting.op is Op.ADD:
            report(f"can't use += with numbers for parameter {name!r}")
            return None
        got = strtol0(setting.value)
        if isinstance(got, str):
            report(f"parameter {name!r} is {got}: {setting.value!r}")
            return None
        if info.bounds and not info.bounds[0] <= got <= info.bounds[1]:
            low, high = info.bounds
            report(f"value {got} of {name!r} is outside {low}..{high}")
            return None
        return got

    def boolean(self, name: str) -> bool | None:
        """``xlu_cfg_get_defbool``: a number, true when non-zero."""
        got = self.number(name)
        return None if got is None else got != 0

    def items(self, name: str) -> tuple[str, ...] | None:
        """``xlu_cfg_get_list`` walked with ``xlu_cfg_get_listitem``: its strings.

        xl stops at the first entry that is not a string; so do we, with a warning.
        """
        setting = self.setting(name)
        if setting is None:
            return None
        if isinstance(setting.value, str):
            self.bad(
                _info(name), setting, f"parameter {name!r} is a single value but should be a list"
            )
            return None
        return self.strings_of(name, setting, setting.value)

    def strings_of(self, name: str, setting: Setting, values: tuple[Value, ...]) -> tuple[str, ...]:
        result: list[str] = []
        for index, item in enumerate(values):
            if not isinstance(item, str):
                self.warn(
                    setting,
                    f"{name}: entry {index} is a list; xl ignores it and every entry after it",
                )
                break
            result.append(item)
        return tuple(result)

    def string_or_list(self, name: str) -> tuple[str, ...] | str | None:
        setting = self.setting(name)
        if setting is None:
            return None
        if isinstance(setting.value, str):
            return setting.value
        return self.strings_of(name, setting, setting.value)


# --- building a DomainConfig ----------------------------------------------


def _prefix_of(value: str, *words: str) -> bool:
    """xl's ``!strncmp(buf, word, strlen(buf))``: value is a prefix of word (even empty)."""
    return any(word.startswith(value) for word in words)


def _domain_type(r: _Reader, arch: Arch) -> DomainType:
    chosen: DomainType | None = None
    text = r.string("type")
    if text is not None:
        # xl tests "hvm", then "pv", then "pvh" by prefix: "p" is pv, "" is hvm.
        if _prefix_of(text, "hvm"):
            chosen = DomainType.HVM
        elif _prefix_of(text, "pv"):
            chosen = DomainType.PV
        elif _prefix_of(text, "pvh"):
            chosen = DomainType.PVH
        else:
            r.error(r.setting("type"), f"invalid domain type {text!r}, expected pv, pvh or hvm")
        if chosen is not None and text != chosen.value:
            r.warn(r.setting("type"), f"type={text!r} is read by xl as {chosen.value!r}")
    builder = r.string("builder")
    if builder is not None:
        where = r.setting("builder")
        if _prefix_of(builder, "hvm"):
            from_builder: DomainType | None = DomainType.HVM
        elif _prefix_of(builder, "generic"):
            from_builder = DomainType.PV
        else:
            from_builder = None
            r.error(where, f"invalid builder {builder!r}, expected hvm or generic")
        if from_builder is not None:
            r.warn(
                where, f'"builder" is deprecated since Xen 4.10; use type="{from_builder.value}"'
            )
            if chosen is not None and chosen is not from_builder:
                r.error(where, 'contradicting "builder" and "type" options specified')
            chosen = from_builder
    if chosen is None:
        chosen = DomainType.PVH if arch is Arch.ARM else DomainType.PV
    return chosen


def _positive(r: _Reader, name: str, what: str) -> int | None:
    value = r.number(name)
    if value is not None and value <= 0:
        r.error(r.setting(name), f"{name}={value}: {what} must be at least 1")
        return None
    return value


def _cmdline(r: _Reader) -> str | None:
    cmdline, root, extra = r.string("cmdline"), r.string("root"), r.string("extra")
    if cmdline is not None:
        if root is not None or extra is not None:
            r.warn(r.setting("cmdline"), "ignoring root= and extra= in favour of cmdline=")
        return cmdline
    if root is not None and extra is not None:
        return f"root={root} {extra}"
    if root is not None:
        return f"root={root}"
    return extra


def _affinity(r: _Reader, name: str, maxvcpus: int) -> CpuAffinity | None:
    setting = r.setting(name)
    value = r.string_or_list(name)
    if value is None or setting is None:
        return None
    try:
        if isinstance(value, str):
            return parse_cpus(value, source=r.source, line=setting.line, col=setting.col + 1)
        if len(value) > maxvcpus:
            r.warn(
                setting,
                f"{name} has {len(value)} entries but the guest has {maxvcpus} vCPU(s);"
                " xl ignores the extra entries",
            )
            value = value[:maxvcpus]
        sets: list[CpuSet] = []
        for index, spec in enumerate(value):
            try:
                sets.append(parse_cpus(spec, source=r.source))
            except ConfigError as err:
                for p in err.problems:
                    r.error(setting, f"{name} entry {index} {spec!r}, column {p.col}: {p.message}")
        return tuple(sets)
    except ConfigError as err:
        r.problems.extend(err.problems)
        return None


def _action(r: _Reader, name: str, default: ShutdownAction) -> ShutdownAction:
    text = r.string(name)
    if text is None:
        return default
    try:
        return ShutdownAction(text)
    except ValueError:
        names = ", ".join(a.value for a in ShutdownAction)
        r.error(r.setting(name), f"unknown {name} action {text!r}, expected one of {names}")
        return default


def _info(name: str) -> KeyInfo:
    """What xl, or xenlab for its own keys, expects of ``name``."""
    return KEYS.get(name) or XENLAB_KEYS[name]


def _check_known_keys(r: _Reader, dtype: DomainType) -> None:
    for name, setting in r.latest.items():
        info = KEYS.get(name) or XENLAB_KEYS.get(name)
        if info is None:
            r.warnings.append(ConfigWarning(r.source, setting.name_line, f"unknown key {name!r}"))
            continue
        if dtype.value not in info.types:
            used = "/".join(sorted(info.types))
            r.warn(
                setting, f"{name!r} is ignored for {dtype.value} guests (xl reads it for {used})"
            )
            continue
        if info.notice:
            r.warn(setting, info.notice)


def _check_values(r: _Reader, dtype: DomainType) -> None:
    """Shapes and accepted strings of every other key xl reads for this type."""
    handled = _TYPED_KEYS | {
        "pci_msitranslate", "pci_power_mgmt", "pci_permissive", "pci_seize", "rdm",
        "viridian", "mca_caps", "firmware", "mmio_hole", "bootloader_args", "passthrough",
    }  # fmt: skip
    for name in r.latest:
        info = KEYS.get(name) or XENLAB_KEYS.get(name)
        if info is None or name in handled or dtype.value not in info.types:
            continue
        if info.kind is KeyKind.STRING:
            text = r.string(name)
            if text is not None and info.choices:
                _check_choice(r, info, text)
        elif info.kind in (KeyKind.NUMBER, KeyKind.BOOL):
            r.number(name)
        elif info.kind is KeyKind.LIST:
            r.items(name)
        elif info.kind is KeyKind.NUMBER_OR_STRING:
            _number_or_string(r, info, dtype)
        else:
            r.string_or_list(name)


def _check_choice(r: _Reader, info: KeyInfo, text: str) -> None:
    wanted = text.lower() if info.casefold else text
    if wanted not in info.choices:
        r.error(
            r.setting(info.name),
            f"invalid value {text!r} for {info.name!r}, expected one of {', '.join(info.choices)}",
        )


def _number_or_string(r: _Reader, info: KeyInfo, dtype: DomainType) -> None:
    name = info.name
    setting = r.setting(name)
    if name == "timer_mode" and dtype is DomainType.PV:
        r.error(setting, '"timer_mode" option is not supported for PV guests')
        return
    number = r.number(name, quiet=True)
    if number is not None:
        if name == "gfx_passthru":
            return
        if name in ("tsc_mode", "timer_mode"):
            r.warn(setting, f"specifying {name!r} as an integer is deprecated; use its name")
        if not 0 <= number < len(info.choices):
            r.error(setting, f"invalid value {number} for {name!r}")
        return
    text = r.string(name)
    if text is not None:
        _check_choice(r, info, text)


def _check_hvm(r: _Reader) -> None:
    viridian = r.setting("viridian")
    if viridian is not None and not isinstance(viridian.value, str):
        for item in r.strings_of("viridian", viridian, viridian.value):
            name = item[1:] if item.startswith("!") else item
            if item not in ("all", "defaults") and name not in _VIRIDIAN:
                r.error(viridian, f"unknown viridian enlightenment {name!r}")
    elif viridian is not None and r.number("viridian", quiet=True) is None:
        r.warn(viridian, "viridian is neither a list nor a number; xl ignores it")
    caps = r.setting("mca_caps")
    if caps is not None:
        for item in r.items("mca_caps") or ():
            if item != "lmce":
                r.error(caps, f"unrecognized MCA capability {item!r}, expected lmce")
    hole = r.number("mmio_hole")
    if hole is not None and not _MMIO_HOLE_MIB[0] <= hole <= _MMIO_HOLE_MIB[1]:
        low, high = _MMIO_HOLE_MIB
        r.error(
            r.setting("mmio_hole"),
            f"invalid value {hole} for mmio_hole, expected {low}..{high} MiB",
        )
    if r.setting("bios_path_override") and r.setting("bios") is None:
        r.warn(
            r.setting("bios_path_override"), "bios_path_override given without specific bios name"
        )


def _kernel_and_firmware(
    r: _Reader, dtype: DomainType, kernel: str | None, bootloader: str | None, firmware_dir: str
) -> str | None:
    firmware = r.string("firmware")
    where = r.setting("firmware")
    if dtype is DomainType.HVM:
        if kernel is not None and kernel.rstrip("/").rsplit("/", 1)[-1] == "hvmloader":
            r.warn(
                r.setting("kernel"),
                'you seem to be using "kernel" to override the HVM firmware; ignored,'
                ' use "firmware_override" instead',
            )
            return None
        return kernel
    if firmware is not None:
        if kernel is not None:
            r.error(where, "both kernel and firmware specified")
        elif not _prefix_of(firmware, "pvgrub32", "pvgrub64"):
            r.error(where, f"firmware {firmware!r}: only pvgrub32 or pvgrub64 are supported here")
        else:
            kernel = f"{firmware_dir}/{firmware}.bin"
    if kernel is None and bootloader is None and firmware is None:
        r.error(None, f"neither kernel nor bootloader specified (needed for {dtype.value} guests)")
    return kernel


def _bootloader_args(r: _Reader) -> None:
    value = r.string_or_list("bootloader_args")
    if isinstance(value, str):
        r.warn(
            r.setting("bootloader_args"),
            'specifying "bootloader_args" as a string is deprecated; use a list of arguments',
        )


def _devices(r: _Reader, name: str) -> tuple[str, ...]:
    return r.items(name) or ()


def _replace_errors(r: _Reader, name: str, index: int, spec: str, err: ConfigError) -> None:
    """Place a device spec's problems at the list value, naming the entry and column."""
    setting = r.setting(name)
    for p in err.problems:
        r.error(setting, f"{name} entry {index} {spec!r}, column {p.col}: {p.message}")


def _disks(r: _Reader) -> tuple[DiskSpec, ...]:
    result: list[DiskSpec] = []
    for index, spec in enumerate(_devices(r, "disk")):
        try:
            result.append(parse_disk(spec, source=r.source))
        except ConfigError as err:
            _replace_errors(r, "disk", index, spec, err)
    return tuple(result)


def _vifs(r: _Reader) -> tuple[VifSpec, ...]:
    setting = r.setting("vif")
    result: list[VifSpec] = []
    for index, spec in enumerate(_devices(r, "vif")):
        try:
            # xl numbers the vifs by their place in the list.
            vif, warnings = parse_vif_with_warnings(
                spec, source=r.source, base=VifSpec(devid=index)
            )
        except ConfigError as err:
            _replace_errors(r, "vif", index, spec, err)
            continue
        for w in warnings:
            r.warn(setting, f"vif entry {index}: {w.message}")
        result.append(vif)
    return tuple(result)


def _rdm_policy(r: _Reader) -> RdmPolicy:
    """The ``policy=`` of ``rdm=``, which xl copies into every pci device."""
    text = r.string("rdm")
    policy = RdmPolicy.INVALID
    for item in (text or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "policy" and value.strip() in ("strict", "relaxed"):
            policy = RdmPolicy(value.strip())
    return policy


def _pcis(r: _Reader) -> tuple[PciSpec, ...]:
    # xl seeds every device with the pci_* options and the rdm= policy.
    base = PciSpec(
        msitranslate=bool(r.number("pci_msitranslate")),
        power_mgmt=bool(r.number("pci_power_mgmt")),
        permissive=bool(r.number("pci_permissive")),
        seize=bool(r.number("pci_seize")),
        rdm_policy=_rdm_policy(r),
    )
    result: list[PciSpec] = []
    for index, spec in enumerate(_devices(r, "pci")):
        try:
            result.append(parse_pci(spec, source=r.source, base=base))
        except ConfigError as err:
            _replace_errors(r, "pci", index, spec, err)
    return tuple(result)


def domain_config(
    cfg: ConfigFile, *, arch: Arch = Arch.X86, firmware_dir: str = "/usr/lib/xen/boot"
) -> DomainConfig:
    """Build the DomainConfig of a parsed xl config file, checking it as xl does.

    ``arch`` picks xl's default guest type; ``firmware_dir`` is xl's
    XENFIRMWAREDIR, where ``firmware="pvgrub64"`` points a PV guest's kernel.
    Raises :class:`ConfigError` listing every problem, each at its value's
    place; warnings are returned in :attr:`DomainConfig.warnings`.

    Why one function: it follows libxl's ``parse_config_data`` (xl_parse.c) key by key, in
    xl's order, and later keys are checked against what earlier ones set (type, memory,
    maxvcpus); the order, visible in one place, is what the libxlutil oracle tests check.
    """
    r = _Reader(cfg)
    dtype = _domain_type(r, arch)
    _check_known_keys(r, dtype)

    name = r.string("name")
    if name is None:
        r.error(r.setting("name"), "domain name must be specified (name=)")
    uuid = r.string("uuid")
    if uuid is not None and not _UUID.fullmatch(uuid):
        r.error(r.setting("uuid"), f"failed to parse UUID {uuid!r}, expected 8-4-4-4-12 hex digits")

    # Memory and vCPUs, in xl's order: explicit values, then vnuma, then defaults.
    memory = _positive(r, "memory", "memory (MiB)")
    maxmem = _positive(r, "maxmem", "maxmem (MiB)")
    vcpus = r.number("vcpus")
    if vcpus is not None and vcpus < 1:
        r.error(r.setting("vcpus"), f"vcpus={vcpus}: a guest needs at least one vCPU")
        vcpus = None
    maxvcpus = r.number("maxvcpus")
    if maxvcpus == 0:
        maxvcpus = None  # xl's "not given"
    vnuma: tuple[VnumaNode, ...] = ()
    vnuma_setting = r.setting("vnuma")
    if vnuma_setting is not None:
        if isinstance(vnuma_setting.value, str):
            r.warn(vnuma_setting, "vnuma is a single value but should be a list; xl ignores it")
        elif vnuma_setting.value:
            try:
                vnuma = parse_vnuma(
                    vnuma_setting.value,
                    source=r.source,
                    line=vnuma_setting.line,
                    col=vnuma_setting.col,
                    maxmem_mib=maxmem,
                    maxvcpus=maxvcpus,
                )
            except ConfigError as err:
                r.problems.extend(err.problems)
            if vnuma:
                maxmem = sum(node.size_mib for node in vnuma)
                maxvcpus = sum(len(node.vcpus) for node in vnuma)
                if dtype is DomainType.PV:
                    r.warn(vnuma_setting, "virtual NUMA is not supported for PV guests (xl.cfg(5))")
    if maxmem is None:
        maxmem = memory if memory is not None else _LIBXL_DEFAULT_MEMORY_MIB
    if memory is None:
        memory = maxmem
    if memory > maxmem:
        r.warn(
            r.setting("memory"),
            f"memory={memory} is above maxmem={maxmem}; xl.cfg(5) requires maxmem >= memory",
        )
    if maxvcpus is None:
        maxvcpus = vcpus if vcpus is not None else 1
    if maxvcpus < 0 or (vcpus is not None and maxvcpus < vcpus):
        r.error(
            r.setting("maxvcpus") or r.setting("vcpus"),
            f"maxvcpus={maxvcpus} is below vcpus={vcpus or 0}; maxvcpus must be >= vcpus",
        )
    if vcpus is None:
        vcpus = max(maxvcpus, 1)
    pod = dtype is not DomainType.PV and memory < maxmem
    if pod and vnuma:
        r.error(
            vnuma_setting, "cannot enable vNUMA and populate-on-demand (memory < maxmem) together"
        )

    cpus = _affinity(r, "cpus", maxvcpus)
    cpus_soft = _affinity(r, "cpus_soft", maxvcpus)

    on_poweroff = _action(r, "on_poweroff", ShutdownAction.DESTROY)
    on_reboot = _action(r, "on_reboot", ShutdownAction.RESTART)
    on_watchdog = _action(r, "on_watchdog", ShutdownAction.DESTROY)
    on_crash = _action(r, "on_crash", ShutdownAction.DESTROY)
    on_soft_reset = _action(r, "on_soft_reset", ShutdownAction.SOFT_RESET)

    kernel = r.string("kernel")
    ramdisk = r.string("ramdisk")
    cmdline = _cmdline(r)
    bootloader = r.string("bootloader")
    _bootloader_args(r)
    kernel = _kernel_and_firmware(r, dtype, kernel, bootloader, firmware_dir)

    disks = _disks(r)
    vifs = _vifs(r)
    pcis = _pcis(r)
    vfb = _devices(r, "vfb")
    passthrough = r.string("passthrough")
    if pod and (pcis or r.setting("dtdev")) and passthrough != "disabled":
        r.error(
            r.setting("pci") or r.setting("dtdev"),
            "device passthrough needs an IOMMU, which cannot be used together with"
            " populate-on-demand (memory < maxmem)",
        )

    dm_version: DeviceModelVersion | None = None
    text = r.string("device_model_version")
    if text is not None:
        try:
            dm_version = DeviceModelVersion(text)
        except ValueError:
            r.error(
                r.setting("device_model_version"),
                f"unknown device_model_version {text!r}, expected qemu-xen or qemu-xen-traditional",
            )
    elif r.setting("device_model_override") is not None:
        r.warn(
            r.setting("device_model_override"),
            "device model override given without specific DM version",
        )

    vnc = r.boolean("vnc")
    vnclisten = r.string("vnclisten")
    vncdisplay = r.number("vncdisplay")
    vncpasswd = r.string("vncpasswd")
    sdl = r.boolean("sdl")
    if dtype is DomainType.PV and vfb and r.setting("vnc") is not None:
        r.warn(r.setting("vnc"), "top-level vnc options are ignored for a PV guest with vfb=")

    hvm = dtype is DomainType.HVM
    boot: str | None = None
    usb = nographic = gfx = None
    gfx_kind: str | None = None
    serial: tuple[str, ...] = ()
    usbdevice: tuple[str, ...] = ()
    if hvm:
        boot = r.string("boot")
        usb = r.boolean("usb")
        nographic = r.boolean("nographic")
        serial_text = r.string_or_list("serial")
        serial = (serial_text,) if isinstance(serial_text, str) else serial_text or ()
        usbdevice_value = r.string_or_list("usbdevice")
        usbdevice = (
            (usbdevice_value,) if isinstance(usbdevice_value, str) else usbdevice_value or ()
        )
        gfx_number = r.number("gfx_passthru", quiet=True)
        if gfx_number is not None:
            gfx = gfx_number != 0
        elif (gfx_kind := r.string("gfx_passthru")) is not None:
            gfx = True
            _check_choice(r, KEYS["gfx_passthru"], gfx_kind)
        if vnclisten and vncdisplay and ":" in vnclisten:
            r.error(r.setting("vncdisplay"), "display specified both in vnclisten and vncdisplay")
        _check_hvm(r)

    _check_values(r, dtype)

    if r.problems:
        raise ConfigError(sorted(r.problems, key=lambda p: (p.line, p.col)))
    assert name is not None
    extra = {
        key: setting.value
        for key, setting in r.latest.items()
        if (key in KEYS or key in XENLAB_KEYS) and key not in _TYPED_KEYS
    }
    return DomainConfig(
        name=name,
        type=dtype,
        memory_mib=memory,
        maxmem_mib=maxmem,
        vcpus=vcpus,
        maxvcpus=maxvcpus,
        uuid=uuid,
        cpus=cpus,
        cpus_soft=cpus_soft,
        kernel=kernel,
        ramdisk=ramdisk,
        cmdline=cmdline,
        bootloader=bootloader,
        on_poweroff=on_poweroff,
        on_reboot=on_reboot,
        on_crash=on_crash,
        on_watchdog=on_watchdog,
        on_soft_reset=on_soft_reset,
        boot=boot,
        serial=serial,
        vfb=vfb,
        vnc=vnc,
        vnclisten=vnclisten,
        vncdisplay=vncdisplay,
        vncpasswd=vncpasswd,
        sdl=sdl,
        usb=usb,
        usbdevice=usbdevice,
        gfx_passthru=gfx,
        gfx_passthru_kind=gfx_kind,
        nographic=nographic,
        device_model_version=dm_version,
        disks=disks,
        vifs=vifs,
        pcis=pcis,
        vnuma=vnuma,
        extra=MappingProxyType(extra),
        warnings=tuple(sorted(r.warnings, key=lambda w: w.line)),
    )


def _affinity_json(value: CpuAffinity | None) -> object:
    if value is None:
        return None
    if isinstance(value, CpuSet):
        return format_cpus(value)
    return [format_cpus(item) for item in value]


def domain_config_to_json(dc: DomainConfig) -> dict[str, object]:
    """Return the DomainConfig as JSON-ready data (enums as xl's names, devices as libxl JSON)."""
    return {
        "name": dc.name,
        "type": dc.type.value,
        "uuid": dc.uuid,
        "memory_mib": dc.memory_mib,
        "maxmem_mib": dc.maxmem_mib,
        "vcpus": dc.vcpus,
        "maxvcpus": dc.maxvcpus,
        "cpus": _affinity_json(dc.cpus),
        "cpus_soft": _affinity_json(dc.cpus_soft),
        "kernel": dc.kernel,
        "ramdisk": dc.ramdisk,
        "cmdline": dc.cmdline,
        "bootloader": dc.bootloader,
        "on_poweroff": dc.on_poweroff.value,
        "on_reboot": dc.on_reboot.value,
        "on_crash": dc.on_crash.value,
        "on_watchdog": dc.on_watchdog.value,
        "on_soft_reset": dc.on_soft_reset.value,
        "boot": dc.boot,
        "serial": list(dc.serial),
        "vfb": list(dc.vfb),
        "vnc": dc.vnc,
        "vnclisten": dc.vnclisten,
        "vncdisplay": dc.vncdisplay,
        "vncpasswd": dc.vncpasswd,
        "sdl": dc.sdl,
        "usb": dc.usb,
        "usbdevice": list(dc.usbdevice),
        "gfx_passthru": dc.gfx_passthru,
        "gfx_passthru_kind": dc.gfx_passthru_kind,
        "nographic": dc.nographic,
        "device_model_version": dc.device_model_version.value if dc.device_model_version else None,
        "disks": [disk_to_libxl_json(disk) for disk in dc.disks],
        "vifs": [vif_to_libxl_json(vif) for vif in dc.vifs],
        "pcis": [pci_to_libxl_json(pci) for pci in dc.pcis],
        "vnuma": vnuma_to_libxl_json(dc.vnuma),
        "extra": {key: value_to_json(value) for key, value in dc.extra.items()},
        "warnings": [str(w) for w in dc.warnings],
    }
