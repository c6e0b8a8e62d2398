"""The keys xl reads from a domain config, as data: :data:`KEYS` and :func:`key_info`.

Each :class:`KeyInfo` records what xl 4.17's ``parse_config_data``
(tools/xl/xl_parse.c) and xl.cfg(5) expect of a key: its kind, what xl does
when the value has the wrong shape, which guest types read it, the strings it
accepts, and the warning xl prints whenever the key is present.  The table is
written by hand from reading those sources; :mod:`xenlab.config.model` uses it
to check a :class:`~xenlab.config.values.ConfigFile`.

Kinds follow libxlutil's getters: ``xlu_cfg_get_long`` (NUMBER; ``strtol``
with base 0, so ``0x10`` and octal ``010`` work, and ``+=`` is refused),
``xlu_cfg_get_defbool`` (BOOL: a number, true when non-zero),
``xlu_cfg_get_string`` (STRING), ``xlu_cfg_get_list`` (LIST), and the keys
xl tries both ways (STRING_OR_LIST, NUMBER_OR_STRING, BOOL_OR_LIST).

``on_bad`` is WARN where libxlutil prints a warning and xl carries on as if
the key were absent, and ERROR where xl exits.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = ["ALL_TYPES", "KEYS", "XENLAB_KEYS", "KeyInfo", "KeyKind", "Severity", "key_info"]


class KeyKind(enum.Enum):
    """The shape of value a key takes."""

    STRING = "string"
    NUMBER = "number"
    BOOL = "bool"
    LIST = "list"
    STRING_OR_LIST = "string-or-list"
    NUMBER_OR_STRING = "number-or-string"
    BOOL_OR_LIST = "bool-or-list"


class Severity(enum.Enum):
    """What xl does with a value it cannot use."""

    WARN = "warn"
    ERROR = "error"


#: xl's names of the guest types.
ALL_TYPES: Final = frozenset({"pv", "pvh", "hvm"})
_HVM: Final = frozenset({"hvm"})
_PV: Final = frozenset({"pv"})
_PVH: Final = frozenset({"pvh"})


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What xl expects of one key.

    ``types`` lists the guest types for which xl reads the key (it ignores it
    silently for the others).  ``choices`` are the only strings xl accepts
    (anything else makes it exit); ``casefold`` when libxl compares them
    ignoring case.  ``notice`` is the warning xl prints whenever the key is
    set.  ``bounds`` are the inclusive limits of a NUMBER.
    """

    name: str
    kind: KeyKind
    on_bad: Severity = Severity.WARN
    types: frozenset[str] = ALL_TYPES
    choices: tuple[str, ...] = ()
    casefold: bool = False
    notice: str = ""
    bounds: tuple[int, int] | None = None


_INT_MAX: Final = 2**31 - 1


def _s(name: str, **kw: object) -> KeyInfo:
    return KeyInfo(name, KeyKind.STRING, **kw)  # type: ignore[arg-type]


def _n(name: str, **kw: object) -> KeyInfo:
    return KeyInfo(name, KeyKind.NUMBER, **kw)  # type: ignore[arg-type]


def _b(name: str, **kw: object) -> KeyInfo:
    return KeyInfo(name, KeyKind.BOOL, **kw)  # type: ignore[arg-type]


def _l(name: str, **kw: object) -> KeyInfo:
    return KeyInfo(name, KeyKind.LIST, **kw)  # type: ignore[arg-type]


_ACTIONS: Final = (
    "destroy",
    "restart",
    "rename-restart",
    "preserve",
    "coredump-destroy",
    "coredump-restart",
    "soft-reset",
)

_TABLE: Final[tuple[KeyInfo, ...]] = (
    # Domain creation.
    _s("name", on_bad=Severity.ERROR),
    _s("type"),
    _s("builder"),
    _s("uuid"),
    _s("pool"),
    _s("seclabel"),
    _s("init_seclabel"),
    _b("hap"),
    _b("oos"),
    _b("driver_domain"),
    _s(
        "passthrough",
        choices=("default", "disabled", "enabled", "sync_pt", "share_pt"),
        casefold=True,
    ),
    _b("xend_suspend_evtchn_compat"),
    # PVH shim.
    _b("pvshim", types=_PVH),
    _s("pvshim_path", types=_PVH),
    _s("pvshim_cmdline", types=_PVH),
    _s("pvshim_extra", types=_PVH),
    # Scheduling.
    _n("cpu_weight"),
    _n("cap"),
    _n("period"),
    _n("slice"),
    _n("latency"),
    _n("extratime"),
    # Memory and CPUs.
    _n("memory"),
    _n("maxmem"),
    _n("vcpus"),
    _n("maxvcpus"),
    KeyInfo("cpus", KeyKind.STRING_OR_LIST),
    KeyInfo("cpus_soft", KeyKind.STRING_OR_LIST),
    _l("vnuma"),
    _n("max_grant_frames", on_bad=Severity.ERROR, bounds=(0, _INT_MAX)),
    _n("max_maptrack_frames", on_bad=Severity.ERROR, bounds=(0, _INT_MAX)),
    _n("max_grant_version", on_bad=Severity.ERROR, bounds=(0, _INT_MAX)),
    _n("max_event_channels"),
    _n("shadow_memory"),
    _n("videoram"),
    _s("vuart", choices=("unknown", "sbsa_uart"), casefold=True),
    # Event actions.
    _s("on_poweroff", choices=_ACTIONS),
    _s("on_reboot", choices=_ACTIONS),
    _s("on_watchdog", choices=_ACTIONS),
    _s("on_crash", choices=_ACTIONS),
    _s("on_soft_reset", choices=_ACTIONS),
    # Booting.
    _s("kernel"),
    _s("ramdisk"),
    _s("device_tree"),
    _s("cmdline"),
    _s("root"),
    _s("extra"),
    _s("bootloader"),
    KeyInfo("bootloader_args", KeyKind.STRING_OR_LIST),
    _s("firmware"),
    # PCI passthrough and other devices.
    _n("pci_msitranslate"),
    _n("pci_power_mgmt"),
    _n("pci_permissive"),
    _n("pci_seize"),
    _s("rdm"),
    _l("pci"),
    _l("dtdev"),
    _l("ioports"),
    _l("irqs"),
    _l("iomem"),
    _l("disk"),
    _l("p9"),
    _l("vtpm"),
    _l("vdispl"),
    _l("pvcalls"),
    _l("vsnd"),
    _l("channel"),
    _l("vif"),
    _l("vif2", notice="vif2: netchannel2 is deprecated and not supported by xl"),
    _l("vfb"),
    _l("usbctrl"),
    _l("usbdev"),
    _l("vkb"),
    _b("e820_host", types=_PV),
    # Time and platform.
    _b("nomigrate"),
    KeyInfo(
        "tsc_mode",
        KeyKind.NUMBER_OR_STRING,
        choices=("default", "always_emulate", "native", "native_paravirt"),
        casefold=True,
    ),
    _n("rtc_timeoffset"),
    _b("localtime"),
    _b("acpi"),
    KeyInfo(
        "timer_mode",
        KeyKind.NUMBER_OR_STRING,
        choices=(
            "delay_for_missed_ticks",
            "no_delay_for_missed_ticks",
            "no_missed_ticks_pending",
            "one_missed_tick_pending",
        ),
        casefold=True,
    ),
    _b("nestedhvm"),
    KeyInfo(
        "altp2m",
        KeyKind.NUMBER_OR_STRING,
        choices=("disabled", "mixed", "external", "limited"),
        casefold=True,
    ),
    _n("vmtrace_buf_kb"),
    KeyInfo("cpuid", KeyKind.STRING_OR_LIST),
    _s("gic_version", choices=("default", "v2", "v3"), casefold=True),
    _s("tee", choices=("none", "optee"), casefold=True),
    _b(
        "msr_relaxed",
        notice="msr_relaxed will be removed in future versions; if it fixes an issue"
        " please report it to xen-devel@lists.xenproject.org",
    ),
    _b("vpmu"),
    # HVM only.
    _s("firmware_override", types=_HVM),
    _s("bios_path_override", types=_HVM),
    _s("bios", types=_HVM, choices=("unknown", "rombios", "seabios", "ovmf"), casefold=True),
    _b("pae", types=_HVM),
    _b("acpi_s3", types=_HVM),
    _b("acpi_s4", types=_HVM),
    _b("acpi_laptop_slate", types=_HVM),
    _b("nx", types=_HVM),
    _b("hpet", types=_HVM),
    _b("vpt_align", types=_HVM),
    _b("apic", types=_HVM),
    KeyInfo("viridian", KeyKind.BOOL_OR_LIST, types=_HVM),
    _n("mmio_hole", types=_HVM),
    _b(
        "altp2mhvm", types=_HVM, notice='specifying "altp2mhvm" is deprecated; use "altp2m" instead'
    ),
    _s("smbios_firmware", types=_HVM),
    _s("acpi_firmware", types=_HVM),
    _s("ms_vm_genid", types=_HVM, choices=("generate", "none")),
    _n("rdm_mem_boundary", types=_HVM),
    _l("mca_caps", types=_HVM, on_bad=Severity.ERROR),
    _s("vga", types=_HVM, choices=("stdvga", "cirrus", "none", "qxl")),
    _n("stdvga", types=_HVM),
    _s("hdtype", types=_HVM, choices=("ide", "ahci"), casefold=True),
    _b("spice", types=_HVM),
    _n("spiceport", types=_HVM),
    _n("spicetls_port", types=_HVM),
    _s("spicehost", types=_HVM),
    _b("spicedisable_ticketing", types=_HVM),
    _s("spicepasswd", types=_HVM),
    _b("spiceagent_mouse", types=_HVM),
    _b("spicevdagent", types=_HVM),
    _b("spice_clipboard_sharing", types=_HVM),
    _n("spiceusbredirection", types=_HVM),
    _s("spice_image_compression", types=_HVM),
    _s("spice_streaming_video", types=_HVM),
    _b("nographic", types=_HVM),
    KeyInfo(
        "gfx_passthru",
        KeyKind.NUMBER_OR_STRING,
        types=_HVM,
        choices=("default", "igd"),
        casefold=True,
    ),
    KeyInfo("serial", KeyKind.STRING_OR_LIST, types=_HVM, on_bad=Severity.ERROR),
    _s("boot", types=_HVM),
    _b("usb", types=_HVM),
    _n("usbversion", types=_HVM),
    KeyInfo("usbdevice", KeyKind.STRING_OR_LIST, types=_HVM, on_bad=Severity.ERROR),
    _b("vkb_device", types=_HVM),
    _s("soundhw", types=_HVM),
    _b("xen_platform_pci", types=_HVM),
    _s("vendor_device", types=_HVM, choices=("none", "xenserver"), casefold=True),
    # Device model.
    _s(
        "device_model",
        notice='ignoring device_model directive; use "device_model_override" if you'
        " really want a non-default device model",
    ),
    _s("device_model_override"),
    _s("device_model_version", choices=("qemu-xen-traditional", "qemu-xen")),
    _b("device_model_stubdomain_override"),
    _s("device_model_stubdomain_seclabel"),
    _s("device_model_user"),
    _s("stubdomain_kernel"),
    _s("stubdomain_cmdline"),
    _s("stubdomain_ramdisk"),
    _n("stubdomain_memory"),
    _l("device_model_args", on_bad=Severity.ERROR),
    _l("device_model_args_pv", on_bad=Severity.ERROR),
    _l("device_model_args_hvm", on_bad=Severity.ERROR),
    _b("dm_restrict"),
    # Display: top-level VNC/SDL (PV guests without vfb=, and HVM guests).
    _b("vnc"),
    _s("vnclisten"),
    _s("vncpasswd"),
    _n("vncdisplay"),
    _b("vncunused"),
    _n(
        "vncviewer",
        notice='ignoring "vncviewer" option; use "-V" of "xl create" to spawn a vncviewer',
    ),
    _b("sdl"),
    _b("opengl"),
    _s("display"),
    _s("xauthority"),
    _s("keymap"),
)

#: Every key xl 4.17 reads from a domain config, by name.
KEYS: Final[Mapping[str, KeyInfo]] = MappingProxyType({info.name: info for info in _TABLE})


#: Keys xenlab reads that xl does not.  xl ignores keys it does not know, so a
#: config that uses them still loads under Xen (without their effect).
XENLAB_KEYS: Final[Mapping[str, KeyInfo]] = MappingProxyType({info.name: info for info in (
    # The VGA BIOS behind the primary display (``xenlab rom boot``): QEMU's
    # romfile= on the emulated VGA device, or on the passed-through one.
    _s("vga_rom", types=_HVM),
    # The QEMU display device that gets vga_rom, when the ROM's PCI ids are
    # those of a device xl's vga= cannot name (ati-vga, vmware-svga, ...).
    _s("vga_rom_device", types=_HVM),
)})


def key_info(name: str) -> KeyInfo | None:
    """Return what xl expects of ``name``, or None when xl does not read it."""
    return KEYS.get(name)
