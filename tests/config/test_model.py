"""Tests of xenlab.config.model: DomainConfig built from xl config files as xl does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlab.config.errors import ConfigError
from xenlab.config.keys import KEYS, KeyKind, Severity
from xenlab.config.model import (
    Arch,
    DeviceModelVersion,
    DomainConfig,
    DomainType,
    ShutdownAction,
    domain_config,
    domain_config_to_json,
    strtol0,
)
from xenlab.config.parser import parse
from xenlab.config.specs.cpus import CpuTerm, CpuTermKind, parse_cpus
from xenlab.config.specs.disk import parse_disk
from xenlab.config.specs.pci import PciSpec, RdmPolicy
from xenlab.config.specs.vnuma import VnumaNode
from xenlab.config.values import ConfigFile, Op, Setting, Value

PV = 'name = "g"\nkernel = "/boot/vmlinuz"\n'


def build(text: str, **kw: Arch) -> DomainConfig:
    return domain_config(parse(text, source="g.cfg"), **kw)


def failures(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(text)
    return [str(p) for p in info.value.problems]


def warnings(dc: DomainConfig) -> list[str]:
    return [str(w) for w in dc.warnings]


def load(shared_data: Path, name: str) -> DomainConfig:
    path = shared_data / "xlcfg" / name
    return domain_config(parse(path.read_bytes(), source=name))


# --- real example configs ---------------------------------------------------


def test_xlexample_pvlinux(shared_data: Path) -> None:
    dc = load(shared_data, "xen-project__xen__xlexample.pvlinux.cfg")
    assert (dc.name, dc.type, dc.kernel) == ("example.pvlinux", DomainType.PV, "/boot/vmlinuz")
    assert (dc.memory_mib, dc.maxmem_mib, dc.vcpus, dc.maxvcpus) == (128, 128, 2, 2)
    assert dc.cmdline == "root=/dev/xvda1"  # from extra=, as xl merges it
    assert dc.on_poweroff is ShutdownAction.DESTROY and dc.on_reboot is ShutdownAction.RESTART
    (disk,) = dc.disks
    assert (disk.vdev, disk.pdev_path, disk.readwrite) == ("xvda", "/dev/vg/guest-volume", True)
    assert len(dc.vifs) == 1 and dc.vifs[0].devid == 0
    assert dc.warnings == ()


def test_xlexample_hvm(shared_data: Path) -> None:
    dc = load(shared_data, "xen-project__xen__xlexample.hvm.cfg")
    assert (dc.name, dc.type, dc.memory_mib, dc.vcpus) == ("example.hvm", DomainType.HVM, 128, 2)
    assert dc.vnc is None and dc.kernel is None and dc.warnings == ()


def test_xlexample_pvh(shared_data: Path) -> None:
    dc = load(shared_data, "xen-project__xen__xlexample.pvhlinux.cfg")
    assert (dc.type, dc.memory_mib, dc.vcpus, dc.cmdline) == (
        DomainType.PVH,
        512,
        4,
        "root=/dev/xvda1",
    )


def test_xmexample_hvm_keeps_xl_warnings(shared_data: Path) -> None:
    dc = load(shared_data, "xen-project__xen__xmexample.hvm.cfg")
    assert dc.type is DomainType.HVM  # from builder="hvm"
    assert dc.kernel is None  # kernel=".../hvmloader" is dropped by xl
    assert (dc.name, dc.memory_mib, dc.boot, dc.serial) == ("ExampleHVMDomain", 128, None, ("pty",))
    assert (dc.vnc, dc.sdl, dc.vncpasswd) == (True, False, "")
    assert [(d.vdev, d.pdev_path, d.is_cdrom) for d in dc.disks] == [
        ("hda", "/var/images/min-el3-i386.img", False),
        ("hdc", "", True),
    ]
    assert dict(dc.extra) == {
        "opengl": "1",
        "stdvga": "0",
        "tsc_mode": "0",
        "device_model": "qemu-dm",
    }
    assert warnings(dc) == [
        "xen-project__xen__xmexample.hvm.cfg:11: warning: you seem to be using"
        ' "kernel" to override the HVM firmware; ignored, use "firmware_override" instead',
        'xen-project__xen__xmexample.hvm.cfg:14: warning: "builder" is deprecated'
        ' since Xen 4.10; use type="hvm"',
        "xen-project__xen__xmexample.hvm.cfg:128: warning: ignoring device_model directive;"
        ' use "device_model_override" if you really want a non-default device model',
        "xen-project__xen__xmexample.hvm.cfg:194: warning: specifying 'tsc_mode' as an"
        " integer is deprecated; use its name",
    ]


def test_pv_grub_cmdline_comes_from_extra(shared_data: Path) -> None:
    dc = load(shared_data, "xen-project__xen__xmexample.pv-grub.cfg")
    assert dc.type is DomainType.PV
    assert dc.cmdline == "(hd0,0)/boot/grub/menu.lst"


def test_libvirt_vnuma(shared_data: Path) -> None:
    dc = load(shared_data, "libvirt__libvirt__test-fullvirt-vnuma.cfg")
    assert (dc.type, dc.memory_mib, dc.maxmem_mib, dc.vcpus, dc.maxvcpus) == (
        DomainType.HVM,
        8192,
        8192,
        8,
        8,
    )
    assert dc.vnuma[1] == VnumaNode(1, 2048, (2, 3), (21, 10, 21, 31))
    assert len(dc.vnuma) == 4
    assert (dc.on_crash, dc.vnc, dc.vnclisten, dc.sdl, dc.boot, dc.serial) == (
        ShutdownAction.RESTART,
        True,
        "127.0.0.1",
        False,
        "d",
        ("none",),
    )
    assert "unknown key 'parallel'" in warnings(dc)[1]
    assert warnings(dc)[1].startswith("libvirt__libvirt__test-fullvirt-vnuma.cfg:21:")


def test_libvirt_paravirt_cmdline(shared_data: Path) -> None:
    dc = load(shared_data, "libvirt__libvirt__test-paravirt-cmdline.cfg")
    assert (dc.type, dc.memory_mib, dc.maxmem_mib) == (DomainType.PV, 394, 579)
    assert (dc.kernel, dc.ramdisk, dc.cmdline) == (
        "/tmp/vmlinuz",
        "/tmp/initrd",
        "root=/dev/xvda1 console=hvc0",
    )
    assert dc.uuid == "c7a5fdb2-cdaf-9455-926a-d65c16db1809"
    assert dc.extra == {"localtime": "0"}


def test_libvirt_pci_with_populate_on_demand_is_refused(shared_data: Path) -> None:
    # memory=394 < maxmem=579 on HVM means PoD, which libxl refuses with passthrough.
    path = shared_data / "xlcfg" / "libvirt__libvirt__test-fullvirt-pci.cfg"
    with pytest.raises(ConfigError) as info:
        domain_config(parse(path.read_bytes(), source="pci.cfg"))
    assert str(info.value) == (
        "pci.cfg:20:7: device passthrough needs an IOMMU, which cannot be used"
        " together with populate-on-demand (memory < maxmem)"
    )


def test_aarch64_guest_defaults_to_pvh(shared_data: Path) -> None:
    path = shared_data / "xlcfg" / "buildroot__buildroot__aarch64-dom1.cfg"
    dc = domain_config(parse(path.read_bytes(), source="dom1"), arch=Arch.ARM)
    assert (dc.name, dc.type, dc.memory_mib, dc.vcpus) == ("dom1", DomainType.PVH, 256, 1)
    assert dc.disks == (parse_disk("phy:/dev/vda3,xvda,w"),)
    assert dc.vifs[0].bridge == "br0"


def test_cpupool_file_is_not_a_domain(shared_data: Path) -> None:
    path = shared_data / "xlcfg" / "xen-project__xen__cpupool.cfg"
    with pytest.raises(ConfigError) as info:
        domain_config(parse(path.read_bytes(), source="cpupool.cfg"))
    assert str(info.value) == (
        "cpupool.cfg:1:1: neither kernel nor bootloader specified (needed for pv guests)"
    )


def test_xl_conf_is_not_a_domain(shared_data: Path) -> None:
    path = shared_data / "xlcfg" / "xen-project__xen__xl.conf"
    with pytest.raises(ConfigError) as info:
        domain_config(parse(path.read_bytes(), source="xl.conf"))
    assert [p.message for p in info.value.problems] == [
        "domain name must be specified (name=)",
        "neither kernel nor bootloader specified (needed for pv guests)",
    ]


def test_template_placeholder_in_cpus_is_placed(shared_data: Path) -> None:
    path = shared_data / "xlcfg" / "xen-troops__meta-xt-prod-devel__domf.cfg"
    with pytest.raises(ConfigError) as info:
        domain_config(parse(path.read_bytes(), source="domf.cfg"), arch=Arch.ARM)
    assert str(info.value).startswith("domf.cfg:18:7: invalid cpus term 'DOMF_ALLOWED_PCPUS'")


def test_every_example_builds_or_fails_with_places(shared_data: Path) -> None:
    built = 0
    for path in sorted((shared_data / "xlcfg").iterdir()):
        cfg = parse(path.read_bytes(), source=path.name)
        try:
            dc = domain_config(cfg, arch=Arch.ARM if "xen-troops" in path.name else Arch.X86)
        except ConfigError as err:
            assert all(p.source == path.name and p.line >= 1 for p in err.problems)
            continue
        built += 1
        json.dumps(domain_config_to_json(dc))
    assert built == 18


# --- type and builder ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "dtype"),
    [
        ('type = "hvm"', DomainType.HVM),
        ('type = "pvh"', DomainType.PVH),
        ('type = "pv"', DomainType.PV),
        ('builder = "generic"', DomainType.PV),
        ('builder = "hvm"', DomainType.HVM),
        ("", DomainType.PV),
    ],
)
def test_type(line: str, dtype: DomainType) -> None:
    assert build(f"{PV}{line}\n").type is dtype


def test_type_prefixes_are_read_as_xl_does() -> None:
    # strncmp(buf, "hvm", strlen(buf)): "" and "h" are hvm, "p" is pv.
    assert build(f'{PV}type = "p"\n').type is DomainType.PV
    dc = build(f'{PV}type = ""\n')
    assert dc.type is DomainType.HVM
    assert warnings(dc) == ["g.cfg:3: warning: type='' is read by xl as 'hvm'"]


def test_bad_and_contradicting_types() -> None:
    assert failures(f'{PV}type = "kvm"\n') == [
        "g.cfg:3:8: invalid domain type 'kvm', expected pv, pvh or hvm"
    ]
    assert failures(f'{PV}type = "pv"\nbuilder = "hvm"\n') == [
        'g.cfg:4:11: contradicting "builder" and "type" options specified'
    ]


def test_arm_default_is_pvh() -> None:
    assert build(PV, arch=Arch.ARM).type is DomainType.PVH


# --- memory and vCPUs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "memory", "maxmem"),
    [
        ("", 32, 32),  # libxl's default
        ("memory = 512", 512, 512),
        ("maxmem = 1024", 1024, 1024),
        ("memory = 512\nmaxmem = 1024", 512, 1024),
        ("memory = 0x200", 512, 512),  # strtol base 0
        ("memory = 010", 8, 8),  # ... so a leading 0 is octal
    ],
)
def test_memory_defaults(lines: str, memory: int, maxmem: int) -> None:
    dc = build(f"{PV}{lines}\n")
    assert (dc.memory_mib, dc.maxmem_mib) == (memory, maxmem)


def test_memory_above_maxmem_is_kept_with_a_warning() -> None:
    dc = build(f"{PV}memory = 2048\nmaxmem = 1024\n")
    assert (dc.memory_mib, dc.maxmem_mib) == (2048, 1024)
    assert warnings(dc) == [
        "g.cfg:3: warning: memory=2048 is above maxmem=1024; xl.cfg(5) requires maxmem >= memory"
    ]


def test_nonpositive_memory_is_an_error() -> None:
    assert failures(f"{PV}memory = 0\n") == [
        "g.cfg:3:10: memory=0: memory (MiB) must be at least 1"
    ]


@pytest.mark.parametrize(
    ("lines", "vcpus", "maxvcpus"),
    [
        ("", 1, 1),
        ("vcpus = 4", 4, 4),
        ("maxvcpus = 4", 4, 4),  # libxl brings every vCPU online
        ("vcpus = 2\nmaxvcpus = 8", 2, 8),
        ("vcpus = 2\nmaxvcpus = 0", 2, 2),  # 0 means "not given" to xl
    ],
)
def test_vcpu_defaults(lines: str, vcpus: int, maxvcpus: int) -> None:
    dc = build(f"{PV}{lines}\n")
    assert (dc.vcpus, dc.maxvcpus) == (vcpus, maxvcpus)


def test_vcpus_above_maxvcpus_is_an_error() -> None:
    assert failures(f"{PV}vcpus = 4\nmaxvcpus = 2\n") == [
        "g.cfg:4:12: maxvcpus=2 is below vcpus=4; maxvcpus must be >= vcpus"
    ]
    assert failures(f"{PV}vcpus = 0\n") == ["g.cfg:3:9: vcpus=0: a guest needs at least one vCPU"]


# --- shapes of values: warn where xl warns, fail where xl exits ---------------


def test_unknown_key_warns_with_its_line() -> None:
    dc = build(f"{PV}\nfoo = 1\n")
    assert warnings(dc) == ["g.cfg:4: warning: unknown key 'foo'"]
    assert "foo" not in dc.extra


def test_xenlab_keys_are_known_to_xenlab_not_to_xl() -> None:
    # vga_rom/vga_rom_device are xenlab's (xl ignores keys it does not know).
    hvm = 'name = "g"\ntype = "hvm"\n'
    dc = build(f'{hvm}vga_rom = "/roms/v.bin"\nvga_rom_device = "VGA"\n')
    assert warnings(dc) == []
    assert dc.extra["vga_rom"] == "/roms/v.bin" and dc.extra["vga_rom_device"] == "VGA"
    assert "vga_rom" not in KEYS
    dc = build(f'{hvm}vga_rom = ["a"]\n')
    assert warnings(dc) == [
        "g.cfg:3: warning: parameter 'vga_rom' is a list but should be a single value; ignored"
    ]


def test_list_for_a_string_key_is_ignored_with_a_warning() -> None:
    dc = build(f'{PV}ramdisk = ["a"]\n')
    assert dc.ramdisk is None
    assert warnings(dc) == [
        "g.cfg:3: warning: parameter 'ramdisk' is a list but should be a single value; ignored"
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('memory = "lots"', "parameter 'memory' is not a valid number: 'lots'"),
        ("memory = [1]", "parameter 'memory' is a list but should be a single value"),
        ("memory = 08", "parameter 'memory' is not a valid number: '08'"),
        ("memory = 99999999999999999999", "parameter 'memory' is out of range"),
    ],
)
def test_bad_numbers_are_ignored_with_a_warning(line: str, message: str) -> None:
    dc = build(f"{PV}{line}\n")
    assert dc.memory_mib == 32
    (got,) = warnings(dc)
    assert got.startswith(f"g.cfg:3: warning: {message}")


def test_plus_equals_on_a_number_is_refused_as_libxlutil_does() -> None:
    dc = build(f"{PV}memory = 256\nmemory += 256\n")
    assert dc.memory_mib == 32
    assert warnings(dc) == [
        "g.cfg:4: warning: can't use += with numbers for parameter 'memory'; ignored"
    ]


def test_bounded_numbers_make_xl_exit() -> None:
    assert failures(f'{PV}max_grant_frames = "-1"\n') == [
        "g.cfg:3:20: value -1 of 'max_grant_frames' is outside 0..2147483647"
    ]
    assert failures(f"{PV}max_grant_frames += 64\n") == [
        "g.cfg:3:21: can't use += with numbers for parameter 'max_grant_frames'"
    ]


def test_nested_list_entry_stops_the_device_list() -> None:
    dc = build(f'{PV}disk = ["a,raw,xvda,rw", ["b"], "c,raw,xvdc,rw"]\n')
    assert dc.disks == (parse_disk("a,raw,xvda,rw"),)
    assert warnings(dc) == [
        "g.cfg:3: warning: disk: entry 1 is a list; xl ignores it and every entry after it"
    ]


def test_key_for_another_guest_type_is_ignored_with_a_warning() -> None:
    dc = build(f'{PV}boot = "c"\n')
    assert dc.boot is None
    assert warnings(dc) == [
        "g.cfg:3: warning: 'boot' is ignored for pv guests (xl reads it for hvm)"
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            'vga = "vesa"',
            "invalid value 'vesa' for 'vga', expected one of stdvga, cirrus, none, qxl",
        ),
        ('hdtype = "scsi"', "invalid value 'scsi' for 'hdtype', expected one of ide, ahci"),
        ("tsc_mode = 7", "invalid value 7 for 'tsc_mode'"),
        ('viridian = ["base", "!nope"]', "unknown viridian enlightenment 'nope'"),
        ('mca_caps = ["lmce", "x"]', "unrecognized MCA capability 'x', expected lmce"),
        ("mmio_hole = 100", "invalid value 100 for mmio_hole, expected 256..3840 MiB"),
        ('device_model_version = "qemu"', "unknown device_model_version 'qemu'"),
        ('on_crash = "reboot"', "unknown on_crash action 'reboot'"),
        ('uuid = "1234"', "failed to parse UUID '1234'"),
    ],
)
def test_values_xl_refuses(line: str, message: str) -> None:
    (got,) = failures(f'name = "g"\ntype = "hvm"\n{line}\n')
    assert got.startswith("g.cfg:3:")
    assert message in got


def test_hdtype_is_compared_ignoring_case_as_libxl_does() -> None:
    assert build('name = "g"\ntype = "hvm"\nhdtype = "AHCI"\n').extra["hdtype"] == "AHCI"


def test_timer_mode_is_refused_for_pv() -> None:
    assert failures(f'{PV}timer_mode = "no_missed_ticks_pending"\n') == [
        'g.cfg:3:14: "timer_mode" option is not supported for PV guests'
    ]


def test_vnclisten_with_display_and_vncdisplay_conflict() -> None:
    assert failures('name = "g"\ntype = "hvm"\nvnclisten = "0.0.0.0:1"\nvncdisplay = 2\n') == [
        "g.cfg:4:14: display specified both in vnclisten and vncdisplay"
    ]


# --- boot: kernel, firmware, cmdline ------------------------------------------


def test_cmdline_wins_over_root_and_extra_with_xl_warning() -> None:
    dc = build(f'{PV}cmdline = "console=hvc0"\nroot = "/dev/xvda"\nextra = "ro"\n')
    assert dc.cmdline == "console=hvc0"
    assert warnings(dc) == ["g.cfg:3: warning: ignoring root= and extra= in favour of cmdline="]


@pytest.mark.parametrize(
    ("lines", "cmdline"),
    [
        ('root = "/dev/xvda"\nextra = "ro quiet"', "root=/dev/xvda ro quiet"),
        ('root = "/dev/xvda"', "root=/dev/xvda"),
        ('extra = "ro"', "ro"),
        ("", None),
    ],
)
def test_root_and_extra_merge(lines: str, cmdline: str | None) -> None:
    assert build(f"{PV}{lines}\n").cmdline == cmdline


def test_pv_firmware_becomes_the_kernel() -> None:
    dc = domain_config(parse('name = "g"\nfirmware = "pvgrub64"\n', source="g"), firmware_dir="/fw")
    assert dc.kernel == "/fw/pvgrub64.bin"
    assert failures(f'{PV}firmware = "pvgrub64"\n') == [
        "g.cfg:3:12: both kernel and firmware specified"
    ]
    assert failures('name = "g"\nfirmware = "ovmf"\n') == [
        "g.cfg:2:12: firmware 'ovmf': only pvgrub32 or pvgrub64 are supported here"
    ]


def test_bootloader_is_enough_for_pv() -> None:
    dc = build('name = "g"\nbootloader = "pygrub"\nbootloader_args = "-q"\n')
    assert (dc.bootloader, dc.kernel) == ("pygrub", None)
    assert warnings(dc) == [
        'g.cfg:3: warning: specifying "bootloader_args" as a string is deprecated;'
        " use a list of arguments"
    ]


# --- cpus and vnuma in a file ---------------------------------------------------


def test_cpus_string_and_list() -> None:
    dc = build(f'{PV}vcpus = 2\ncpus = "all,^0"\ncpus_soft = ["3", "4-5"]\n')
    assert dc.cpus == parse_cpus("all,^0", source="x")
    assert dc.cpus_soft == (parse_cpus("3", source="x"), parse_cpus("4-5", source="x"))


def test_cpus_list_longer_than_the_vcpus_is_cut_as_xl_does() -> None:
    dc = build(f'{PV}cpus = ["1", "2", "junk"]\n')
    assert dc.cpus == (parse_cpus("1", source="x"),)
    assert warnings(dc) == [
        "g.cfg:3: warning: cpus has 3 entries but the guest has 1 vCPU(s);"
        " xl ignores the extra entries"
    ]


def test_cpus_errors_are_placed_in_the_file() -> None:
    assert failures(f'{PV}cpus = "0-3,^x"\n') == [
        "g.cfg:3:13: invalid cpus term '^x' (expected a number); expected N, A-B, 'all',"
        " or 'node:'/'nodes:' before one of those, optionally after '^'"
    ]
    (got,) = failures(f'{PV}vcpus = 2\ncpus = ["1", "2-"]\n')
    assert got.startswith("g.cfg:4:8: cpus entry 1 '2-', column 1: invalid cpus term '2-'")


VNUMA = (
    'vnuma = [ ["pnode=0", "size=512", "vcpus=0", "vdistances=10,20"],\n'
    '          ["pnode=0", "size=512", "vcpus=1", "vdistances=20,10"] ]\n'
)


def test_vnuma_defines_maxmem_and_maxvcpus() -> None:
    dc = build(f'name = "g"\ntype = "hvm"\n{VNUMA}')
    assert (dc.memory_mib, dc.maxmem_mib, dc.vcpus, dc.maxvcpus) == (1024, 1024, 2, 2)
    assert dc.vnuma[0] == VnumaNode(0, 512, (0,), (10, 20))
    assert domain_config_to_json(dc)["vnuma"] == [
        {"memkb": 524288, "distances": [10, 20], "pnode": 0, "vcpus": [0]},
        {"memkb": 524288, "distances": [20, 10], "pnode": 0, "vcpus": [1]},
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            "maxmem = 2048",
            "g.cfg:3:9: maxmem=2048 does not match the vnode sizes, which sum to 1024",
        ),
        ("maxvcpus = 4", "g.cfg:3:9: the vnodes name 2 vCPUs but maxvcpus=4"),
        ("vcpus = 4", "g.cfg:5:9: maxvcpus=2 is below vcpus=4; maxvcpus must be >= vcpus"),
        (
            "memory = 512",
            "g.cfg:3:9: cannot enable vNUMA and populate-on-demand (memory < maxmem) together",
        ),
    ],
)
def test_vnuma_against_memory_and_vcpus(lines: str, message: str) -> None:
    assert message in failures(f'name = "g"\ntype = "hvm"\n{VNUMA}{lines}\n')


def test_vnuma_as_a_string_is_ignored_by_xl() -> None:
    dc = build(f'{PV}vnuma = "pnode=0"\n')
    assert dc.vnuma == ()
    assert warnings(dc) == [
        "g.cfg:3: warning: vnuma is a single value but should be a list; xl ignores it"
    ]


# --- devices --------------------------------------------------------------------


def test_pci_devices_are_seeded_with_the_pci_options() -> None:
    dc = build(
        'name = "g"\ntype = "hvm"\npci_permissive = 1\nrdm = "strategy=host,policy=strict"\n'
        'pci = ["01:00.0", "0000:02:00.1,seize=1"]\n'
    )
    assert dc.pcis == (
        PciSpec(bus=1, vfunc_mask=1, permissive=True, rdm_policy=RdmPolicy.STRICT),
        PciSpec(
            bus=2, func=1, vfunc_mask=1, permissive=True, seize=True, rdm_policy=RdmPolicy.STRICT
        ),
    )
    assert domain_config_to_json(dc)["pcis"] == [
        {"bus": 1, "vfunc_mask": 1, "permissive": True, "rdm_policy": "strict"},
        {
            "bus": 2,
            "func": 1,
            "vfunc_mask": 1,
            "permissive": True,
            "seize": True,
            "rdm_policy": "strict",
        },
    ]


def test_device_errors_are_placed_at_the_list_with_entry_and_column() -> None:
    (disk,) = failures(f'{PV}disk = ["/x,raw,xvda,rw,bogus=1"]\n')
    assert disk.startswith("g.cfg:3:8: disk entry 0 '/x,raw,xvda,rw,bogus=1', column ")
    (pci,) = failures('name = "g"\ntype = "hvm"\npci = ["zz:00.0"]\n')
    assert pci.startswith("g.cfg:3:7: pci entry 0 'zz:00.0', column 1: ")
    (vif,) = failures(f'{PV}vif = ["rate=fast"]\n')
    assert vif.startswith("g.cfg:3:7: vif entry 0 'rate=fast', column 6: ")


# --- everything at once, and JSON ------------------------------------------------


def test_every_problem_is_reported_in_file_order() -> None:
    text = 'type = "hvm"\non_reboot = "again"\nvcpus = 3\nmaxvcpus = 2\nvga = "ega"\n'
    assert [p.split(": ", 1)[0] for p in failures(text)] == [
        "g.cfg:1:1",
        "g.cfg:2:13",
        "g.cfg:4:12",
        "g.cfg:5:7",
    ]


def test_json() -> None:
    dc = build(
        'name = "g"\ntype = "hvm"\ndevice_model_version = "qemu-xen"\ncpus = "nodes:0"\n'
        'vif = ["mac=00:16:3e:00:00:01,bridge=br0"]\nserial = "pty"\nacpi = 1\n'
    )
    assert dc.device_model_version is DeviceModelVersion.QEMU_XEN
    assert dc.cpus is not None and not isinstance(dc.cpus, tuple)
    assert dc.cpus.terms == (CpuTerm(CpuTermKind.NODES, 0, 0),)
    data = domain_config_to_json(dc)
    assert json.loads(json.dumps(data)) == data
    assert data["type"] == "hvm"
    assert data["on_soft_reset"] == "soft-reset"
    assert data["device_model_version"] == "qemu-xen"
    assert data["cpus"] == "node:0"
    assert data["serial"] == ["pty"]
    assert data["extra"] == {"acpi": "1"}
    vifs = data["vifs"]
    assert isinstance(vifs, list) and vifs[0]["bridge"] == "br0"


# --- the key table ---------------------------------------------------------------


def test_key_table_covers_what_xl_reads() -> None:
    # Every key parse_config_data reads in xl 4.17 (156 by name, plus the
    # device_model_args_pv/_hvm its macro builds).
    assert len(KEYS) == 158
    assert KEYS["memory"].kind is KeyKind.NUMBER
    assert KEYS["cpus"].kind is KeyKind.STRING_OR_LIST
    assert KEYS["disk"].kind is KeyKind.LIST
    assert KEYS["name"].on_bad is Severity.ERROR
    assert KEYS["boot"].types == frozenset({"hvm"})


@pytest.mark.parametrize(
    ("text", "value"),
    [("12", 12), (" -0x1F", -31), ("017", 15), ("0", 0), ("+5", 5), ("0x", "not a valid number")],
)
def test_strtol0(text: str, value: int | str) -> None:
    assert strtol0(text) == value


# --- agreement with the real libxlutil ----------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "rhs",
    [
        "512",
        '"512"',
        '" 0x200"',
        "010",
        '"08"',
        '"-3"',
        '"+7"',
        '"0x"',
        '"12 "',
        '""',
        '"9223372036854775807"',
        '"9223372036854775808"',
        '"-9223372036854775809"',
        '["1"]',
    ],
)
def test_number_reading_agrees_with_libxlutil(libxlu: Any, rhs: str) -> None:
    data = f'name = "g"\nkernel = "k"\nmemory = 1\nmemory = {rhs}\n'.encode()
    oracle = libxlu.parse_cfg(data).get_long("memory")
    if oracle.rc == 0 and oracle.value <= 0:
        # libxlutil reads it; our own check refuses a memory size below 1 MiB.
        with pytest.raises(ConfigError, match="must be at least 1"):
            domain_config(parse(data, source="config"))
        return
    dc = domain_config(parse(data, source="config"))
    if oracle.rc == 0:
        assert dc.memory_mib == oracle.value
        assert not [w for w in dc.warnings if "memory" in w.message]
    else:
        assert dc.memory_mib == 32  # ignored, as xl ignores it
        (warning,) = [w for w in dc.warnings if "memory" in w.message]
        assert warning.line == 4 and "warning" in oracle.report


@pytest.mark.integration
def test_plus_equals_agrees_with_libxlutil(libxlu: Any) -> None:
    oracle = libxlu.parse_cfg(b"memory = 1\nmemory += 2\n").get_long("memory")
    assert oracle.rc != 0 and "can't use += with numbers" in oracle.report


# --- robustness ---------------------------------------------------------------------

_core = ["name", "kernel", "type", "memory", "maxmem", "vcpus", "maxvcpus", "cpus", "vnuma", "pci"]
_names = st.sampled_from(_core) | st.sampled_from([*sorted(KEYS), "foo"])
_atoms = st.sampled_from(
    ["", "0", "1", "-1", "2", "0x10", "hvm", "pv", "pvh", "all", "0-3,^1", "nodes:0",
     "pnode=0", "size=1", "vcpus=0", "vdistances=10", "destroy", "xvda", "/k", "x=y", "01:00.0"]
) | st.text(max_size=8)  # fmt: skip
_values: st.SearchStrategy[Value] = st.recursive(
    _atoms, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=10
)


@st.composite
def _files(draw: st.DrawFn) -> ConfigFile:
    settings = []
    for line, (name, value, add) in enumerate(
        draw(st.lists(st.tuples(_names, _values, st.booleans()), max_size=12)), start=1
    ):
        settings.append(Setting(name, Op.ADD if add else Op.ASSIGN, value, line, 5, line, 1))
    return ConfigFile("fuzz.cfg", tuple(settings))


@settings(max_examples=300)
@given(_files(), st.sampled_from(Arch))
def test_arbitrary_files_raise_only_config_error(cfg: ConfigFile, arch: Arch) -> None:
    try:
        dc = domain_config(cfg, arch=arch)
    except ConfigError as err:
        assert all(p.source == "fuzz.cfg" for p in err.problems)
        return
    assert dc.vcpus <= dc.maxvcpus and dc.memory_mib >= 1
    json.dumps(domain_config_to_json(dc))
