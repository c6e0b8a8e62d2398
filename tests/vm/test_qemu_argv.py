"""qemu_argv: xl configs (examples, real public ones, inline) to QEMU argv, and refusals."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.vm.test_qemu_escaping import qemu_split
from xenlab.config import parse
from xenlab.config.model import DomainConfig, domain_config
from xenlab.errors import XenlabError
from xenlab.vm.backends.qemu.accel import probe_kernel
from xenlab.vm.backends.qemu.qemu import (
    GUEST_AGENT_PORT,
    Accel,
    RuntimePaths,
    balloon_target_mib,
    nics,
    qemu_argv,
)

REPO = Path(__file__).resolve().parents[2]
PATHS = RuntimePaths.under(Path("/run/xl/7"))


@dataclass(frozen=True)
class Image:
    kernel: Path = Path("/cache/img/vmlinuz")
    initrd: Path = Path("/cache/img/initrd.gz")
    cmdline: str = "console=ttyS0 quiet"


def dc_of(text: str, source: str = "inline.cfg") -> DomainConfig:
    return domain_config(parse(text, source=source))


def opts(argv: list[str], name: str) -> list[str]:
    """Every value given to option ``name`` (``-device`` -> all device strings)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def one(argv: list[str], name: str) -> str:
    values = opts(argv, name)
    assert len(values) == 1, (name, values)
    return values[0]


def _text(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def parsed(option: str) -> dict[str, str]:
    """An option's settings, from its JSON or its key=value form (",," is a comma)."""
    if option.startswith("{"):
        return {k: _text(v) for k, v in json.loads(option).items()}
    return dict(qemu_split(option))


def devices(argv: list[str], driver: str) -> list[dict[str, str]]:
    """The -device options of one driver, as dicts without the driver."""
    out = []
    for d in opts(argv, "-device"):
        settings = parsed(d)
        if settings.pop("driver") == driver:
            out.append(settings)
    return out


def blockdevs(argv: list[str]) -> list[dict[str, str]]:
    return [parsed(b) for b in opts(argv, "-blockdev")]


def node(driver: str, **settings: str) -> dict[str, str]:
    """A -blockdev node as :func:`parsed` gives it (``node_name`` for ``node-name``)."""
    return {"driver": driver, **{k.replace("_", "-"): v for k, v in settings.items()}}


def taps_for(dc: DomainConfig) -> dict[int, str]:
    """Tap names for the vifs that need one, as the toolstack would make them for domain 7."""
    return {n.devid: f"vif7.{n.devid}" for n in nics(dc) if n.tap}


def refused(text: str, key_prefix: str, **kwargs: object) -> str:
    with pytest.raises(XenlabError) as err:
        qemu_argv(dc_of(text), PATHS, **kwargs)  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith(key_prefix), message
    return message


BASE = 'name = "g"\ntype = "hvm"\nmemory = 256\n'


# --- the examples -------------------------------------------------------------


def test_pv_guest_example() -> None:
    dc = dc_of((REPO / "examples/pv-guest.cfg").read_text(), "pv-guest.cfg")
    argv = qemu_argv(dc, PATHS, taps=taps_for(dc))
    assert argv[0] == "qemu-system-x86_64"
    assert argv[1:3] == ["-no-user-config", "-nodefaults"]
    assert one(argv, "-name") == "guest=pv-guest,debug-threads=on"
    assert one(argv, "-machine") == "type=pc"
    assert one(argv, "-accel") == "tcg"
    assert one(argv, "-cpu") == "max"
    # The guest sees maxmem; xl's memory is the balloon target at start.
    assert one(argv, "-m") == "size=1024M"
    assert balloon_target_mib(dc) == 512
    assert one(argv, "-smp") == "cpus=2,maxcpus=4"
    assert one(argv, "-kernel") == "/boot/vmlinuz-guest"
    assert one(argv, "-initrd") == "/boot/initrd-guest.img"
    assert one(argv, "-append") == "console=hvc0 root=/dev/xvda1 ro"
    assert blockdevs(argv) == [
        node("file", filename="/var/lib/xenlab/pv-guest.qcow2", node_name="xvda-file",
             read_only="off"),
        node("qcow2", file="xvda-file", node_name="xvda-fmt", read_only="off"),
    ]
    # xvda-xvdh sit at fixed slots 0x08-0x0f (a hot-added disk keeps its place).
    assert devices(argv, "virtio-blk-pci") == [
        {"drive": "xvda-fmt", "id": "xvda", "serial": "xvda", "addr": "0x8"}
    ]
    # bridge=xenbr0 names a bridge: a tap on it, opened by name (made by hotplug).
    assert parsed(one(argv, "-netdev")) == {"type": "tap", "id": "net0", "ifname": "vif7.0",
                                            "script": "no", "downscript": "no", "vhost": "off"}
    assert devices(argv, "virtio-net-pci") == [
        {"netdev": "net0", "mac": "00:16:3e:00:00:01", "id": "vif0", "addr": "0x10"}
    ]
    # Without its tap the argv cannot be made: the toolstack brings vifs online first.
    with pytest.raises(XenlabError, match=r"^vif 0: needs a tap"):
        qemu_argv(dc, PATHS)
    assert one(argv, "-display") == "none"
    assert "-vnc" not in argv
    assert one(argv, "-serial") == "chardev:console0"
    assert ("backend=socket,id=console0,path=/run/xl/7/console.sock,server=on,wait=off,"
            "logfile=/run/xl/7/console.log,logappend=on") in opts(argv, "-chardev")
    assert ("backend=socket,id=qga0,path=/run/xl/7/qga.sock,server=on,wait=off"
            in opts(argv, "-chardev"))
    assert devices(argv, "virtserialport") == [
        {"bus": "vser0.0", "chardev": "qga0", "name": GUEST_AGENT_PORT, "id": "qga-port0"}
    ]
    assert devices(argv, "virtio-balloon-pci") == [{"id": "balloon0"}]
    assert ("backend=socket,id=qmp0,path=/run/xl/7/qmp.sock,server=on,wait=off"
            in opts(argv, "-chardev"))
    assert one(argv, "-mon") == "chardev=qmp0,mode=control"
    assert one(argv, "-pidfile") == "/run/xl/7/qemu.pid"
    # on_crash=coredump-restart: QEMU keeps running, the toolstack restarts.
    assert one(argv, "-action") == "reboot=reset,shutdown=poweroff,panic=none"
    assert "-S" not in argv and "-incoming" not in argv


def test_hvm_vnuma_example() -> None:
    text = (REPO / "examples/hvm-vnuma.cfg").read_text()
    dc = dc_of(text)
    argv = qemu_argv(dc, PATHS, taps=taps_for(dc))
    # pci= is VFIO passthrough (permissive= is pciback's, nothing to do here).
    assert devices(argv, "vfio-pci") == [{"host": "0000:03:00.0", "id": "hostdev0"}]
    assert one(argv, "-m") == "size=2048M"
    assert balloon_target_mib(dc) is None
    assert one(argv, "-smp") == "cpus=4,maxcpus=4"
    assert opts(argv, "-object") == [
        "qom-type=memory-backend-ram,id=vnode0,size=1024M",
        "qom-type=memory-backend-ram,id=vnode1,size=1024M",
    ]
    assert opts(argv, "-numa") == [
        "type=node,nodeid=0,cpus=0-1,memdev=vnode0",
        "type=node,nodeid=1,cpus=2-3,memdev=vnode1",
        "type=dist,src=0,dst=1,val=20",
        "type=dist,src=1,dst=0,val=20",
    ]
    # hda on IDE 0/0, the empty-prefixed ISO as a read-only cdrom on IDE 1/0.
    assert devices(argv, "ide-hd") == [
        {"bus": "ide.0", "unit": "0", "id": "hda", "drive": "hda-fmt"}
    ]
    assert devices(argv, "ide-cd") == [
        {"bus": "ide.1", "unit": "0", "id": "hdc", "drive": "hdc-fmt"}
    ]
    assert node("file", filename="/srv/install.iso", node_name="hdc-file",
                read_only="on") in blockdevs(argv)
    assert devices(argv, "e1000")[0]["netdev"] == "net0"
    assert one(argv, "-vnc") == "vnc=127.0.0.1:0"
    assert devices(argv, "VGA") == [{"id": "video0"}]
    assert "-display" not in argv
    assert "-usb" in argv and devices(argv, "usb-tablet") == [{}]
    # No kernel and no image: SeaBIOS boots the disks in xl's boot= order.
    assert one(argv, "-boot") == "order=dc"


# --- real public configs -------------------------------------------------------

SHARED_EXPECT = {
    "xen-project__xen__xlexample.pvlinux.cfg": None,
    "xen-project__xen__xlexample.pvhlinux.cfg": None,
    "xen-project__xen__xmexample.hvm.cfg": None,
    "xen-project__xen__xlexample.hvm.cfg": "sdl:",
    "libvirt__libvirt__test-fullvirt-ovmf.cfg": "bios:",
    "libvirt__libvirt__test-spice-features.cfg": "spice:",
    "libvirt__libvirt__test-usbctrl.cfg": "usbctrl:",
    "libvirt__libvirt__test-paravirt-cmdline.cfg": None,
    "buildroot__buildroot__aarch64-dom1.cfg": None,
    "xen-project__xen__xmexample.pv-grub.cfg": "disk: vdev 'hda1'",
    "xen-troops__meta-xt-prod-devel__doma-generic-h3.cfg": "iomem:",
}


@pytest.mark.parametrize("name", sorted(SHARED_EXPECT))
def test_shared_configs(shared_data: Path, name: str) -> None:
    dc = dc_of((shared_data / "xlcfg" / name).read_text(), name)
    expected = SHARED_EXPECT[name]
    if expected is None:
        argv = qemu_argv(dc, PATHS, taps=taps_for(dc))
        assert argv[0] == "qemu-system-x86_64"
        assert one(argv, "-m") == f"size={dc.maxmem_mib}M"
        assert one(argv, "-smp") == f"cpus={dc.vcpus},maxcpus={dc.maxvcpus}"
    else:
        with pytest.raises(XenlabError) as err:
            qemu_argv(dc, PATHS, taps=taps_for(dc))
        assert str(err.value).startswith(expected), str(err.value)


def test_shared_pvlinux_details(shared_data: Path) -> None:
    name = "xen-project__xen__xlexample.pvlinux.cfg"
    argv = qemu_argv(dc_of((shared_data / "xlcfg" / name).read_text(), name), PATHS)
    assert one(argv, "-kernel") == "/boot/vmlinuz"
    assert one(argv, "-append") == "root=/dev/xvda1"
    # A target under /dev/ is a block device for QEMU.
    assert blockdevs(argv)[0]["driver"] == "host_device"
    assert blockdevs(argv)[0]["filename"].startswith("/dev/vg/guest-volume")
    # vif = [ '' ]: one default vif with a stable made-up MAC under Xen's OUI.
    (nic,) = devices(argv, "virtio-net-pci")
    assert re.fullmatch(r"00:16:3e:[0-7][0-9a-f](:[0-9a-f]{2}){2}", nic["mac"])


def test_shared_xm_hvm_is_a_firmware_boot(shared_data: Path) -> None:
    name = "xen-project__xen__xmexample.hvm.cfg"
    dc = dc_of((shared_data / "xlcfg" / name).read_text(), name)
    argv = qemu_argv(dc, PATHS, taps=taps_for(dc))
    assert "-kernel" not in argv  # kernel = "hvmloader" is Xen's firmware
    assert one(argv, "-boot") == "order=cd"
    assert devices(argv, "ide-cd") == [{"bus": "ide.1", "unit": "0", "id": "hdc"}]  # empty
    assert one(argv, "-vnc") == "vnc=unix:/run/xl/7/vnc.sock"


# --- inline configs -------------------------------------------------------------


def test_defaults_and_switches() -> None:
    dc = dc_of('name = "a,b"\ntype = "pvh"\nkernel = "/k"\n')
    argv = qemu_argv(
        dc,
        PATHS,
        accel=Accel.KVM,
        paused=True,
        incoming="defer",
        binary="/opt/qemu/bin/qemu-system-x86_64",
    )
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert one(argv, "-name") == "guest=a,,b,debug-threads=on"  # QEMU's comma escape
    assert one(argv, "-accel") == "kvm" and one(argv, "-cpu") == "host"
    assert one(argv, "-m") == "size=32M"  # libxl's default memory
    assert one(argv, "-smp") == "cpus=1,maxcpus=1"
    assert "-S" in argv and one(argv, "-incoming") == "defer"
    assert "-uuid" not in argv and "-initrd" not in argv and "-append" not in argv
    argv = qemu_argv(dc_of(BASE + 'uuid = "12345678-1234-1234-1234-123456789abc"\n'), PATHS)
    assert one(argv, "-uuid") == "12345678-1234-1234-1234-123456789abc"


def test_paths_with_commas_are_escaped() -> None:
    paths = RuntimePaths.under(Path("/run/a,b"))
    # A target with a comma only fits xl's syntax as target=, the last item.
    argv = qemu_argv(dc_of(BASE + "disk = ['vdev=xvda, target=/img/x,y.raw']\n"), paths)
    assert "backend=socket,id=qmp0,path=/run/a,,b/qmp.sock,server=on,wait=off" in opts(
        argv, "-chardev")
    assert blockdevs(argv)[0]["filename"] == "/img/x,y.raw"  # JSON: no escape needed
    assert one(argv, "-pidfile") == "/run/a,b/qemu.pid"  # a plain argument: no escape


def test_long_socket_path_is_refused() -> None:
    paths = RuntimePaths.under(Path("/" + "d" * 120))
    with pytest.raises(XenlabError, match="longer than 107 bytes"):
        qemu_argv(dc_of(BASE), paths)


def test_image_gives_kernel_initrd_and_cmdline() -> None:
    argv = qemu_argv(dc_of(BASE), PATHS, image=Image())
    assert one(argv, "-kernel") == "/cache/img/vmlinuz"
    assert one(argv, "-initrd") == "/cache/img/initrd.gz"
    assert one(argv, "-append") == "console=ttyS0 quiet"
    assert "-boot" not in argv
    # The config's cmdline (here extra=) is appended to the image's.
    argv = qemu_argv(dc_of(BASE + 'extra = "xenlab.mkfs=1"\n'), PATHS, image=Image())
    assert one(argv, "-append") == "console=ttyS0 quiet xenlab.mkfs=1"
    # The config's own kernel wins over the image.
    argv = qemu_argv(dc_of(BASE + 'kernel = "/k"\n'), PATHS, image=Image())
    assert one(argv, "-kernel") == "/k"


def test_memory_and_vcpus() -> None:
    dc = dc_of('name = "p"\nkernel = "/k"\nmemory = 300\nmaxmem = 800\nvcpus = 3\nmaxvcpus = 8\n')
    argv = qemu_argv(dc, PATHS)
    assert one(argv, "-m") == "size=800M" and balloon_target_mib(dc) == 300
    assert one(argv, "-smp") == "cpus=3,maxcpus=8"
    dc = dc_of('name = "p"\nkernel = "/k"\nmaxmem = 640\n')
    assert one(qemu_argv(dc, PATHS), "-m") == "size=640M" and balloon_target_mib(dc) is None


def test_vnuma_non_contiguous_vcpus_and_three_nodes() -> None:
    dc = dc_of(
        BASE.replace("memory = 256", "memory = 768")
        + "vnuma = [ ['pnode=0','size=256','vcpus=0,2,4-5','vdistances=10,21,31'],\n"
        "          ['pnode=0','size=256','vcpus=1','vdistances=21,10,20'],\n"
        "          ['pnode=0','size=256','vcpus=3','vdistances=31,20,10'] ]\n"
    )
    argv = qemu_argv(dc, PATHS)
    assert one(argv, "-smp") == "cpus=6,maxcpus=6"
    assert opts(argv, "-numa")[:3] == [
        "type=node,nodeid=0,cpus=0,cpus=2,cpus=4-5,memdev=vnode0",
        "type=node,nodeid=1,cpus=1,memdev=vnode1",
        "type=node,nodeid=2,cpus=3,memdev=vnode2",
    ]
    assert "type=dist,src=0,dst=2,val=31" in opts(argv, "-numa")
    assert len(opts(argv, "-numa")) == 3 + 6


def test_single_vnode_has_no_distances() -> None:
    dc = dc_of(BASE + "vnuma = [ ['pnode=0','size=256','vcpus=0','vdistances=10'] ]\n")
    assert opts(qemu_argv(dc, PATHS), "-numa") == ["type=node,nodeid=0,cpus=0,memdev=vnode0"]


def test_disks_by_vdev_kind_format_and_access() -> None:
    dc = dc_of(
        BASE + "disk = [ 'format=qcow2,vdev=xvdb,target=/i/b.qcow2',\n"
        "  'format=raw,vdev=xvda,access=ro,target=/i/a.raw',\n"
        "  'format=vhd,vdev=sdb,target=/i/c.vhd',\n"
        "  'format=qed,vdev=xvdaa,discard,target=/i/d.qed',\n"
        "  'format=qcow,vdev=hdb,target=/i/e.qcow',\n"
        "  'vdev=hdd,devtype=cdrom' ]\n"
    )
    argv = qemu_argv(dc, PATHS)
    nodes = blockdevs(argv)
    assert node("raw", file="xvda-file", node_name="xvda-fmt", read_only="on") in nodes
    assert node("qcow2", file="xvdb-file", node_name="xvdb-fmt", read_only="off") in nodes
    assert node("vpc", file="sdb-file", node_name="sdb-fmt", read_only="off") in nodes
    assert node("qcow", file="hdb-file", node_name="hdb-fmt", read_only="off") in nodes
    assert node("file", filename="/i/d.qed", node_name="xvdaa-file", read_only="off",
                discard="unmap") in nodes
    # virtio disks in vdev order, whatever the config order: xvda is the guest's vda.
    assert [d["id"] for d in devices(argv, "virtio-blk-pci")] == ["xvda", "xvdb", "xvdaa"]
    assert devices(argv, "virtio-scsi-pci") == [{"id": "scsi0"}]
    assert devices(argv, "scsi-hd") == [
        {"bus": "scsi0.0", "scsi-id": "1", "lun": "0", "drive": "sdb-fmt", "id": "sdb"}
    ]
    assert devices(argv, "ide-hd") == [
        {"bus": "ide.0", "unit": "1", "id": "hdb", "drive": "hdb-fmt"}
    ]
    assert devices(argv, "ide-cd") == [{"bus": "ide.1", "unit": "1", "id": "hdd"}]


def test_xvd_cdrom_goes_to_ide_like_libxl() -> None:
    argv = qemu_argv(dc_of(BASE + "disk = [ '/i/x.iso,raw,xvdc:cdrom,r' ]\n"), PATHS)
    assert devices(argv, "ide-cd") == [
        {"bus": "ide.1", "unit": "0", "id": "xvdc", "drive": "xvdc-fmt"}
    ]
    assert devices(argv, "virtio-blk-pci") == []


def test_vifs_models_macs_and_mtu() -> None:
    dc = dc_of(
        BASE + "vif = [ 'model=rtl8139', 'mac=00:16:3e:aa:bb:cc,model=e1000',"
        " 'mtu=9000', 'devid=7,bridge=xenbr0' ]\n"
    )
    taps = {7: "vif9.7"}
    argv = qemu_argv(dc, PATHS, taps=taps)
    # No bridge and no script: user mode; an explicit bridge (xenbr0 too): a tap.
    assert [parsed(n) for n in opts(argv, "-netdev")] == [
        {"type": "user", "id": "net0"}, {"type": "user", "id": "net1"},
        {"type": "user", "id": "net2"},
        {"type": "tap", "id": "net7", "ifname": "vif9.7", "script": "no", "downscript": "no",
         "vhost": "off"},
    ]
    assert devices(argv, "rtl8139")[0]["id"] == "vif0"
    assert devices(argv, "e1000") == [
        {"netdev": "net1", "mac": "00:16:3e:aa:bb:cc", "id": "vif1", "addr": "0x11"}
    ]
    found = devices(argv, "virtio-net-pci")
    assert found[0]["host_mtu"] == "9000"
    assert [n["id"] for n in found] == ["vif2", "vif7"]
    # Each vif has its own PCI slot, 0x10 + devid, whatever the order of the list.
    assert [n["addr"] for n in found] == ["0x12", "0x17"]
    # Made-up MACs are stable for one domain and differ between vifs and domains.
    again = devices(qemu_argv(dc, PATHS, taps=taps), "virtio-net-pci")
    assert [n["mac"] for n in found] == [n["mac"] for n in again]
    assert found[0]["mac"] != found[1]["mac"]
    other = dc_of(BASE.replace('"g"', '"h"') + "vif = [ 'mtu=9000' ]\n")
    assert devices(qemu_argv(other, PATHS), "virtio-net-pci")[0]["mac"] != found[0]["mac"]
    # Which vifs need a tap: a bridge or a script (vif-route too), nothing else.
    tapped = dc_of(BASE + "vif = [ '', 'bridge=br-lan', 'script=vif-route,ip=10.0.0.2',"
                   " 'script=/x/my-vif,gatewaydev=eth0' ]\n")
    assert [n.tap for n in nics(tapped)] == [False, True, True, True]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ("vnc = 1\n", ["-vnc", "vnc=unix:/run/xl/7/vnc.sock"]),
        ("vnc = 1\nvncdisplay = 3\n", ["-vnc", "vnc=127.0.0.1:3"]),
        ('vnc = 1\nvnclisten = "0.0.0.0:5"\n', ["-vnc", "vnc=0.0.0.0:5"]),
        ('vnc = 1\nvncpasswd = "s3cret"\n',
         ["-vnc", "vnc=unix:/run/xl/7/vnc.sock,password=on"]),
        ("vnc = 1\nnographic = 1\n", ["-display", "none"]),
        ("vnc = 0\n", ["-display", "none"]),
    ],
)
def test_vnc(settings: str, expected: list[str]) -> None:
    argv = qemu_argv(dc_of(BASE + settings), PATHS)
    i = argv.index(expected[0])
    assert argv[i : i + 2] == expected
    assert "s3cret" not in " ".join(argv)  # the password goes over QMP


def test_vga_choice_and_pv_vfb() -> None:
    argv = qemu_argv(dc_of(BASE + 'vnc = 1\nvga = "cirrus"\n'), PATHS)
    assert devices(argv, "cirrus-vga") == [{"id": "video0"}] and devices(argv, "VGA") == []
    argv = qemu_argv(dc_of(BASE + 'vnc = 1\nvga = "none"\n'), PATHS)
    assert "VGA" not in " ".join(opts(argv, "-device"))
    pv = dc_of('name = "p"\nkernel = "/k"\nvfb = [ "vnc=1,vncdisplay=2" ]\n')
    assert one(qemu_argv(pv, PATHS), "-vnc") == "vnc=127.0.0.1:2"


def test_serial_actions_and_extra_keys() -> None:
    argv = qemu_argv(dc_of(BASE + 'serial = "none"\n'), PATHS)
    assert one(argv, "-serial") == "none"
    assert not any("id=console0" in c for c in opts(argv, "-chardev"))
    argv = qemu_argv(
        dc_of(
            BASE + 'on_reboot = "destroy"\non_poweroff = "preserve"\non_crash = "preserve"\n'
            "acpi = 0\nlocaltime = 1\nhap = 1\nshadow_memory = 8\n"
            "device_model_args_hvm = [ '-global', 'kvm-pit.lost_tick_policy=discard' ]\n"
            "device_model_args_pv = [ '-ignored' ]\n"
        ),
        PATHS,
    )
    assert one(argv, "-action") == "reboot=shutdown,shutdown=pause,panic=pause"
    assert one(argv, "-machine") == "type=pc,acpi=off"
    assert one(argv, "-rtc") == "base=localtime"
    assert argv[-2:] == ["-global", "kvm-pit.lost_tick_policy=discard"]
    assert "-ignored" not in argv


@pytest.mark.parametrize(
    ("settings", "prefix"),
    [
        ('type = "pv"\nbootloader = "pygrub"\n', "bootloader: 'pygrub' is not supported"),
        ("sdl = 1\n", "sdl:"),
        ('soundhw = "hda"\n', "soundhw:"),
        ('bios = "ovmf"\n', "bios: 'ovmf'"),
        ("gfx_passthru = 1\n", "gfx_passthru:"),
        ('serial = "/dev/ttyS0"\n', "serial: '/dev/ttyS0'"),
        ('serial = [ "pty", "pty" ]\n', "serial: only one"),
        ('usb = 1\nusbdevice = "disk:/x"\n', "usbdevice: 'disk:/x'"),
        ("maxvcpus = 200\n", "maxvcpus: 200"),
        ("vif = [ 'bridge=br-lan' ]\n", "vif 0: needs a tap"),
        ("vif = [ 'script=vif-route' ]\n", "vif 0: needs a tap"),
        ("vif = [ 'rate=10Mb/s' ]\n", "vif 0: rate="),
        ("vif = [ 'model=virtio','devid=0' ]\n", "vif 0: devid given twice"),
        ("vif = [ 'model=i82551' ]\n", "vif 0: model='i82551' (expected one of"),
        ("vif = [ 'model=e1000,mtu=9000' ]\n", "vif 0: mtu="),
        ("vif = [ 'gatewaydev=eth0' ]\n", "vif 0: gatewaydev="),
        ("disk = [ '/x,raw,hda,ro' ]\n", "disk hda: a read-only IDE hard disk"),
        ("disk = [ '/x,raw,hde,rw' ]\n", "disk hde: only the first 4 emulated IDE"),
        ("disk = [ '/x,raw,hda', '/y,raw,xvda:cdrom' ]\n", "disk xvda: IDE slot 0 is already"),
        ("disk = [ '/x,raw,xvda', '/y,raw,xvda' ]\n", "disk xvda: vdev given twice"),
        ("disk = [ '/x,raw,vda' ]\n", "disk: vdev 'vda' is not supported"),
        ("disk = [ 'iscsi:iqn.x,xvda' ]\n", "disk xvda: script='block-iscsi'"),
        ("disk = [ 'backend=dd,vdev=xvda,target=/x' ]\n", "disk xvda: backend="),
        ("disk = [ 'format=empty,vdev=xvdb,target=/x' ]\n", "disk xvdb: no target"),
        ("disk = [ 'vdev=xvda,colo,colo-host=h,colo-port=1,colo-export=e,"
         "active-disk=a,hidden-disk=h,target=/x' ]\n", "disk xvda: colo"),
        (
            "vnuma = [ ['pnode=0','size=128','vcpus=0','vdistances=10,20'],"
            " ['pnode=0','size=128','vcpus=1','vdistances=20,20'] ]\n",
            "vnuma: vnode 1: local distance 20",
        ),
        ('ramdisk = "/r"\n', "ramdisk: a ramdisk needs kernel="),
        ('boot = "x"\n', "boot: 'x'"),
        ('type = "pv"\nfirmware = "pvgrub64"\n', "firmware:"),
        ('vtpm = [ "backend=0" ]\n', "vtpm:"),
    ],
)  # fmt: skip
def test_unsupported_is_refused_naming_the_key(settings: str, prefix: str) -> None:
    text = BASE + settings
    if "type = " in settings:
        text = text.replace('type = "hvm"\n', "")
    refused(text, prefix)


def test_pv_without_kernel_needs_the_image() -> None:
    # xl itself refuses such a config; a caller may still build one.
    dc = replace(dc_of('name = "p"\ntype = "pvh"\nkernel = "/k"\n'), kernel=None)
    with pytest.raises(XenlabError, match=r"^kernel: a pvh guest needs kernel="):
        qemu_argv(dc, PATHS)
    assert one(qemu_argv(dc, PATHS, image=Image()), "-kernel") == "/cache/img/vmlinuz"


def test_vnuma_distances_at_or_below_local_are_refused() -> None:
    # libxl allows a remote distance equal to the local one; QEMU does not.
    refused(
        BASE.replace("memory = 256", "memory = 256")
        + "vnuma = [ ['pnode=0','size=128','vcpus=0','vdistances=10,10'],"
        " ['pnode=0','size=128','vcpus=1','vdistances=10,10'] ]\n",
        "vnuma: vnode 0: distance 10 to vnode 1",
    )


def test_probe_kernel_is_a_valid_multiboot_header() -> None:
    blob = probe_kernel()
    words = [int.from_bytes(blob[i : i + 4], "little") for i in range(0, 32, 4)]
    assert words[0] == 0x1BADB002
    assert (words[0] + words[1] + words[2]) & 0xFFFFFFFF == 0
    assert words[1] & 0x10000  # load addresses in the header
    assert words[7] == words[4] + 32  # entry right after the header


# --- firmware, VGA BIOS, passthrough ------------------------------------------


def test_every_domain_logs_its_firmware_and_qemu_stderr() -> None:
    argv = qemu_argv(dc_of(BASE), PATHS, image=Image())
    assert one(argv, "-D") == "/run/xl/7/qemu.log"
    assert "backend=file,id=fwlog,path=/run/xl/7/firmware.log" in opts(argv, "-chardev")
    assert devices(argv, "isa-debugcon") == [{"iobase": str(0x402), "chardev": "fwlog"}]


def test_boot_order_means_a_firmware_boot_without_the_image() -> None:
    from xenlab.vm.backends.qemu.qemu import boots_firmware, needs_image

    plain, fw = dc_of(BASE), dc_of(BASE + 'boot = "c"\n')
    assert needs_image(plain) and not boots_firmware(plain)
    assert boots_firmware(fw) and not needs_image(fw)
    argv = qemu_argv(fw, PATHS, image=Image())  # an image given anyway is not used
    assert "-kernel" not in argv and one(argv, "-boot") == "order=c"
    pv = dc_of('name = "g"\ntype = "pv"\nkernel = "/k"\nboot = "c"\n')
    assert not boots_firmware(pv)  # boot= is an HVM key: xl ignores it for PV
    # xl drops an HVM kernel= (Xen's hvmloader in xm-era configs): boot= decides.
    assert boots_firmware(dc_of(BASE + 'kernel = "hvmloader"\nboot = "d"\n'))


def test_vga_rom_goes_on_the_display_device_even_without_vnc() -> None:
    argv = qemu_argv(dc_of(BASE + 'boot = "c"\nvga_rom = "/roms/a,b.bin"\n'), PATHS)
    assert one(argv, "-display") == "none"
    assert devices(argv, "VGA") == [{"id": "video0", "romfile": "/roms/a,b.bin"}]
    assert "driver=VGA,id=video0,romfile=/roms/a,,b.bin" in opts(argv, "-device")
    argv = qemu_argv(dc_of(BASE + 'vga = "cirrus"\nvga_rom = "/r.bin"\nvnc = 1\n'), PATHS,
                     image=Image())
    assert devices(argv, "cirrus-vga") == [{"id": "video0", "romfile": "/r.bin"}]
    argv = qemu_argv(dc_of(BASE + 'vga_rom = "/r.bin"\nvga_rom_device = "ati-vga,model=rv100"\n'),
                     PATHS, image=Image())
    assert devices(argv, "ati-vga") == [{"id": "video0", "model": "rv100", "romfile": "/r.bin"}]
    assert devices(argv, "VGA") == []
    refused(BASE + 'vga = "none"\nvga_rom = "/r.bin"\n', "vga_rom: a VGA BIOS needs",
            image=Image())
    refused(BASE + 'vga_rom = "/r.bin"\nvga_rom_device = "VGA,romfile=/x"\n',
            "vga_rom_device: 'VGA,romfile=/x'", image=Image())
    refused(BASE + 'vga_rom = "/r.bin"\nvga_rom_device = "VGA -x"\n', "vga_rom_device:",
            image=Image())


def test_gfx_passthru_makes_the_first_pci_device_the_primary_vga() -> None:
    text = (BASE + 'boot = "c"\ngfx_passthru = 1\nvga_rom = "/roms/card.rom"\n'
            "pci = [ '01:00.0@5', '01:00.1' ]\n")
    argv = qemu_argv(dc_of(text), PATHS)
    assert devices(argv, "vfio-pci") == [
        {"host": "0000:01:00.0", "id": "hostdev0", "addr": "0x5", "x-vga": "on",
         "romfile": "/roms/card.rom"},
        {"host": "0000:01:00.1", "id": "hostdev1"},
    ]
    assert devices(argv, "VGA") == []  # the GPU is the display
    refused(BASE + "gfx_passthru = 1\n", "gfx_passthru: it needs the GPU", image=Image())
    refused(BASE + 'gfx_passthru = "igd"\npci = [ "00:02.0" ]\n', "gfx_passthru: 'igd'",
            image=Image())
    refused(BASE + "pci = [ '01:00.*' ]\n", "pci 0000:01:00.0: all functions", image=Image())
    refused(BASE + "pci = [ '01:00.0,seize=1' ]\n", "pci 0000:01:00.0: seize=1",
            image=Image())
