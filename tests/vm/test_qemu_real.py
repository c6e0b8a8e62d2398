"""qemu_argv against the real QEMU: started paused (-S), inspected over QMP.

Each test writes an xl config, builds the argv with :func:`qemu_argv`, starts
``qemu-system-x86_64`` (TCG) and checks through QMP that QEMU accepted it and
built what the config says.  Disks are real images made by ``qemu-img``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError, QMPClient

from xenlab.config import parse
from xenlab.config.model import DomainConfig, domain_config
from xenlab.vm.backends.qemu import qemu
from xenlab.vm.backends.qemu.accel import boots, probe_accel, probe_kernel
from xenlab.vm.backends.qemu.qemu import GUEST_AGENT_PORT, Accel, RuntimePaths, qemu_argv

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="QEMU is not installed (./dev.sh setup installs it)",
)

MiB = 1 << 20


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    cmdline: str


@pytest.fixture
def paths() -> Iterator[RuntimePaths]:
    # Short: pytest's tmp_path can overflow a unix socket's 108 bytes.
    rundir = Path(tempfile.mkdtemp(prefix="xq-"))
    try:
        yield RuntimePaths.under(rundir)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def dc_of(text: str) -> DomainConfig:
    return domain_config(parse(text, source="test.cfg"))


def img(path: Path, fmt: str, size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


async def _session(argv: list[str], paths: RuntimePaths, commands: list[Any]) -> list[Any]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not paths.qmp.exists():
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise AssertionError(f"QEMU refused the argv: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("QEMU made no QMP socket in 20 s")
            await asyncio.sleep(0.02)
        # The socket exists from bind() on, before QEMU serves it: retry.
        while True:
            client = QMPClient("test")
            try:
                await client.connect(str(paths.qmp))
                break
            except (ConnectError, EOFError):
                await client.disconnect()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        try:
            results = []
            for command in commands:
                name, args = command if isinstance(command, tuple) else (command, None)
                results.append(await client.execute(name, args))
            await client.execute("quit")
        finally:
            # After quit QEMU may close first; qemu.qmp then reports the EOF here.
            with contextlib.suppress(EOFError):
                await client.disconnect()
        proc.wait(timeout=10)
        return results
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def run(dc: DomainConfig, paths: RuntimePaths, *commands: Any, **kwargs: Any) -> list[Any]:
    """Start QEMU paused with dc's argv, run the QMP commands, quit; their results."""
    argv = qemu_argv(dc, paths, paused=True, **kwargs)
    return asyncio.run(_session(argv, paths, list(commands)))


def hmp(command: str) -> tuple[str, dict[str, str]]:
    return ("human-monitor-command", {"command-line": command})


def qom_get(path: str, prop: str) -> tuple[str, dict[str, str]]:
    return ("qom-get", {"path": path, "property": prop})


def test_cpus_memory_balloon_agent_port_and_identity(paths: RuntimePaths) -> None:
    dc = dc_of(
        'name = "real-1"\ntype = "hvm"\nuuid = "0b5e1f3c-1111-4222-8333-944455566677"\n'
        "memory = 96\nmaxmem = 160\nvcpus = 2\nmaxvcpus = 4\n"
    )
    status, cpus, hotpluggable, summary, balloon, name, uuid, port, peripherals, chardevs = run(
        dc,
        paths,
        "query-status",
        "query-cpus-fast",
        "query-hotpluggable-cpus",
        "query-memory-size-summary",
        "query-balloon",
        "query-name",
        "query-uuid",
        qom_get("/machine/peripheral/qga-port0", "name"),
        ("qom-list", {"path": "/machine/peripheral"}),
        "query-chardev",
    )
    assert status["status"] == "prelaunch" and not status["running"]
    assert len(cpus) == 2
    assert len(hotpluggable) == 4
    assert sum(1 for c in hotpluggable if "qom-path" in c) == 2  # two plugged, two free
    assert summary["base-memory"] == 160 * MiB  # the guest sees maxmem...
    assert balloon["actual"] == 160 * MiB  # ...and the balloon device is there
    assert qemu.balloon_target_mib(dc) == 96
    assert name["name"] == "real-1"
    assert uuid["UUID"] == "0b5e1f3c-1111-4222-8333-944455566677"
    assert port == GUEST_AGENT_PORT
    ids = {p["name"] for p in peripherals}
    assert {"balloon0", "vser0", "qga-port0"} <= ids
    sockets = {c["label"]: c["filename"] for c in chardevs}
    # "disconnected:": listening, nobody attached yet.
    assert sockets["qga0"] == f"disconnected:unix:{paths.qga},server=on"
    assert sockets["console0"] == f"disconnected:unix:{paths.console},server=on"


def test_vnuma_nodes_memdevs_and_cpu_placement(paths: RuntimePaths) -> None:
    dc = dc_of(
        'name = "numa"\ntype = "hvm"\nmemory = 192\nvcpus = 3\n'
        "vnuma = [ ['pnode=0','size=128','vcpus=0,2','vdistances=10,20'],\n"
        "          ['pnode=0','size=64','vcpus=1','vdistances=20,10'] ]\n"
    )
    memdevs, info, cpus = run(dc, paths, "query-memdev", hmp("info numa"), "query-cpus-fast")
    sizes = {m["id"]: m["size"] for m in memdevs}
    assert sizes == {"vnode0": 128 * MiB, "vnode1": 64 * MiB}
    assert "2 nodes" in info
    assert "node 0 cpus: 0 2" in info and "node 0 size: 128 MB" in info
    assert "node 1 cpus: 1" in info and "node 1 size: 64 MB" in info
    assert {c["cpu-index"]: c["props"]["node-id"] for c in cpus} == {0: 0, 1: 1, 2: 0}


def test_disks_formats_access_and_cdroms(paths: RuntimePaths, tmp_path: Path) -> None:
    a = img(tmp_path / "a.qcow2", "qcow2", "64M")
    b = img(tmp_path / "b.raw", "raw")
    c = img(tmp_path / "c.vhd", "vpc")
    d = img(tmp_path / "d.raw", "raw")
    iso = img(tmp_path / "x.iso", "raw", "1M")
    e = img(tmp_path / "e.raw", "raw")
    dc = dc_of(
        'name = "disks"\ntype = "hvm"\nmemory = 64\n'
        f"disk = [ 'format=qcow2,vdev=xvda,target={a}',\n"
        f"         'format=raw,vdev=xvdb,access=ro,target={b}',\n"
        f"         'format=vhd,vdev=sda,target={c}',\n"
        f"         '{d},raw,hda,w',\n"
        f"         '{iso},raw,hdc:cdrom,r',\n"
        "         ',,hdd:cdrom,r',\n"
        f"         'format=raw,vdev=sdb,access=ro,target={e}' ]\n"
    )
    (blocks,) = run(dc, paths, "query-block")
    # qdev is the device id, or its QOM path (/machine/peripheral/ID/virtio-backend).
    by_dev = {b["qdev"].removeprefix("/machine/peripheral/").split("/")[0]: b for b in blocks}
    assert set(by_dev) == {"xvda", "xvdb", "sda", "sdb", "hda", "hdc", "hdd"}
    expect = {  # vdev: (driver, image, read-only, removable)
        "xvda": ("qcow2", a, False, False),
        "xvdb": ("raw", b, True, False),
        "sda": ("vpc", c, False, False),
        "sdb": ("raw", e, True, False),
        "hda": ("raw", d, False, False),
        "hdc": ("raw", iso, True, True),
    }
    for vdev, (drv, path, ro, removable) in expect.items():
        inserted = by_dev[vdev]["inserted"]
        assert inserted["drv"] == drv, vdev
        assert inserted["image"]["filename"] == str(path), vdev
        assert inserted["ro"] is ro, vdev
        assert inserted["node-name"] == f"{vdev}-fmt"
        assert by_dev[vdev]["removable"] is removable, vdev
    assert by_dev["xvda"]["inserted"]["image"]["virtual-size"] == 64 * MiB
    # The cdrom without a target is an empty drive, ready for a medium.
    assert "inserted" not in by_dev["hdd"] and by_dev["hdd"]["removable"]


def test_vifs_user_network_and_macs(paths: RuntimePaths) -> None:
    dc = dc_of(
        'name = "net"\ntype = "hvm"\nmemory = 64\n'
        "vif = [ 'mac=00:16:3e:12:34:56', 'model=e1000' ]\n"
    )
    mac0, model1, mac1, info = run(
        dc,
        paths,
        qom_get("/machine/peripheral/vif0", "mac"),
        qom_get("/machine/peripheral/vif1", "type"),
        qom_get("/machine/peripheral/vif1", "mac"),
        hmp("info network"),
    )
    assert mac0 == "00:16:3e:12:34:56"
    assert model1 == "e1000"
    assert mac1.startswith("00:16:3e:")
    assert "net0: index=0,type=user" in info and "net1: index=0,type=user" in info


def test_vnc_on_a_unix_socket(paths: RuntimePaths) -> None:
    dc = dc_of('name = "vnc"\ntype = "hvm"\nmemory = 64\nvnc = 1\n')
    (vnc,) = run(dc, paths, "query-vnc")
    assert vnc["enabled"] is True
    assert vnc["family"] == "unix" and vnc["service"] == str(paths.vnc)


def test_no_vnc_means_no_display(paths: RuntimePaths) -> None:
    dc = dc_of('name = "novnc"\ntype = "hvm"\nmemory = 64\n')
    (vnc,) = run(dc, paths, "query-vnc")
    assert vnc["enabled"] is False


def test_direct_kernel_boot_runs_guest_code(paths: RuntimePaths, tmp_path: Path) -> None:
    """The image's kernel really runs: a multiboot stub exits QEMU through isa-debug-exit."""
    kernel = tmp_path / "stub.bin"
    kernel.write_bytes(probe_kernel())
    initrd = tmp_path / "module.bin"
    initrd.write_bytes(b"module")
    image = Image(kernel=kernel, initrd=initrd, cmdline="xenlab-test")
    dc = dc_of(
        'name = "boot"\ntype = "hvm"\nmemory = 32\n'
        "device_model_args_hvm = [ '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04' ]\n"
    )
    argv = qemu_argv(dc, paths, image=image)
    assert "-S" not in argv
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert done.returncode == (0x2A << 1) | 1, done.stderr.decode()


def test_plain_arguments_keep_their_commas(paths: RuntimePaths, tmp_path: Path) -> None:
    """-kernel and -append are never split at commas: a config kernel named a,b=c.bin boots."""
    kernel = tmp_path / "stub,x=1 y.bin"
    kernel.write_bytes(probe_kernel())
    dc = dc_of(
        f'name = "k,1"\ntype = "pvh"\nmemory = 32\nkernel = "{kernel}"\n'
        'cmdline = "a=1,b=2 c,,d"\n'
        "device_model_args = [ '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04' ]\n"
    )
    argv = qemu_argv(dc, paths)
    assert argv[argv.index("-kernel") + 1] == str(kernel)
    assert argv[argv.index("-append") + 1] == "a=1,b=2 c,,d"
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert done.returncode == (0x2A << 1) | 1, done.stderr.decode()


def test_incoming_defer_waits_for_migration(paths: RuntimePaths) -> None:
    dc = dc_of('name = "in"\ntype = "hvm"\nmemory = 64\n')
    (status,) = run(dc, paths, "query-status", incoming="defer")
    assert status["status"] == "inmigrate"


def test_probe_stub_boots_under_tcg() -> None:
    assert boots("qemu-system-x86_64", Accel.TCG, timeout=20)


def test_probe_accel_answers_quickly() -> None:
    start = time.monotonic()
    accel = probe_accel(timeout=10)
    assert time.monotonic() - start < 10
    # Here /dev/kvm opens but QEMU aborts setting MSRs under -cpu host, so the
    # answer must be TCG; a host with working KVM would boot the stub.
    with contextlib.suppress(OSError):
        if not boots("qemu-system-x86_64", Accel.KVM, timeout=10):
            assert accel is Accel.TCG
            return
    assert accel in (Accel.TCG, Accel.KVM)


def test_hvm_vnuma_example_runs(paths: RuntimePaths, tmp_path: Path) -> None:
    """examples/hvm-vnuma.cfg with its images made here, without the pci device."""
    text = (Path(__file__).resolve().parents[2] / "examples/hvm-vnuma.cfg").read_text()
    disk = img(tmp_path / "hvm-vnuma.img", "raw")
    iso = img(tmp_path / "install.iso", "raw", "1M")
    text = text.replace("/srv/hvm-vnuma.img", str(disk)).replace("/srv/install.iso", str(iso))
    text = "\n".join(
        line for line in text.splitlines() if not line.startswith(("pci", "vnclisten"))
    )
    # bridge=xenbr0 would ask for a tap on that bridge (tests/vm/test_network.py);
    # without it the vif runs on QEMU's user network.
    text = text.replace(", bridge=xenbr0", "")
    memdevs, blocks, nic, vnc, usb = run(
        dc_of(text),
        paths,
        "query-memdev",
        "query-block",
        qom_get("/machine/peripheral/vif0", "type"),
        "query-vnc",
        hmp("info usb"),
    )
    assert sorted(m["size"] for m in memdevs) == [1024 * MiB, 1024 * MiB]
    devs = {b["qdev"]: b for b in blocks}
    assert devs["hda"]["inserted"]["image"]["filename"] == str(disk)
    assert devs["hdc"]["inserted"]["ro"] and devs["hdc"]["removable"]
    assert nic == "e1000"
    assert vnc["enabled"] and vnc["family"] == "unix"
    assert "QEMU USB Tablet" in usb
