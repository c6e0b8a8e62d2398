"""The guest image: what the initramfs holds, the cache, and real boots under QEMU TCG.

The boots talk to the guest's real qemu-ga over its virtio-serial socket and
to QEMU over QMP, both with a few lines of raw JSON, so these tests depend on
nothing in xenlab but the image.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

import xenlab.vm.image as image_mod
from xenlab.errors import BackendError
from xenlab.formats.cpio import entry_data, iter_archive
from xenlab.vm.image import (
    AGENT_PORT,
    MODULES,
    READY_MARKER,
    GuestImage,
    build_image,
    extract_vmlinux,
    load_order,
    modinfo,
)

QEMU = "qemu-system-x86_64"
BOOT_BOUND = 20.0  # seconds from QEMU start to XENLAB-READY, generous for shared TCG hosts
DOWN_BOUND = 10.0

needs_qemu = pytest.mark.skipif(
    shutil.which(QEMU) is None or shutil.which("qemu-img") is None,
    reason="qemu-system-x86_64 and qemu-img are needed",
)


# ---------------------------------------------------------------- pure parts


def test_load_order_puts_dependencies_first() -> None:
    deps = {"a": ["b", "c"], "b": ["c"], "c": [], "d": ["c"], "x-y": []}
    order = load_order(["a", "d"], deps)
    assert order == ["c", "b", "a", "d"]


def test_load_order_normalises_dashes() -> None:
    assert load_order(["x-y"], {"x_y": []}) == ["x_y"]


def test_load_order_refuses_cycles_and_unknown_modules() -> None:
    with pytest.raises(BackendError, match="cycle: a -> b -> a"):
        load_order(["a"], {"a": ["b"], "b": ["a"]})
    with pytest.raises(BackendError, match=r"module zz .* not found"):
        load_order(["a"], {"a": ["zz"]})


def test_modinfo_and_extract_vmlinux_refuse_junk() -> None:
    with pytest.raises(ValueError, match="ELF64"):
        modinfo(b"not an elf at all" * 8)
    truncated = b"\x7fELF\x02\x01" + bytes(58) + b"\xff" * 8
    with pytest.raises(ValueError):
        modinfo(truncated)
    with pytest.raises(ValueError, match="HdrS"):
        extract_vmlinux(bytes(0x400))


def test_key_follows_the_init_text(
    guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = image_mod.newest_kernel_package()
    files = [image_mod.BUSYBOX, image_mod.QEMU_GA]
    key = image_mod._image_key(package, files)
    monkeypatch.setattr(image_mod, "INIT", image_mod.INIT + "# changed\n")
    assert image_mod._image_key(package, files) != key
    monkeypatch.setattr(image_mod, "BUILDER_VERSION", image_mod.BUILDER_VERSION + 1)
    assert image_mod._image_key(package, files) != key


# ---------------------------------------------------------------- the built image


def _initramfs(img: GuestImage) -> dict[str, tuple[int, bytes]]:
    archive = zstandard.ZstdDecompressor().decompressobj().decompress(img.initrd.read_bytes())
    return {
        e.name: (e.mode, bytes(entry_data(archive, e)))
        for e in iter_archive(archive, source=str(img.initrd))
        if not e.is_trailer
    }


def test_image_files_and_kernel(guest_image: GuestImage) -> None:
    img = guest_image
    assert img.kernel_version.endswith("-amd64") and img.kernel_version.startswith("6.1.0-")
    assert img.cmdline.startswith("console=ttyS0")
    assert img.key == img.kernel.parent.name
    # the PVH vmlinux is exactly the bzImage's payload
    vmlinux = img.kernel.read_bytes()
    assert vmlinux[:4] == b"\x7fELF"
    assert extract_vmlinux(img.bzimage.read_bytes()) == vmlinux
    assert img.bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    meta = json.loads((img.kernel.parent / "image.json").read_text())
    assert meta["kernel_version"] == img.kernel_version


def test_initramfs_contents(guest_image: GuestImage) -> None:
    files = _initramfs(guest_image)
    mode, init = files["init"]
    assert mode & 0o111 and init.decode() == image_mod.INIT
    assert files["bin/busybox"][1] == image_mod.BUSYBOX.read_bytes()
    assert files["bin/sh"][1] == b"/bin/busybox"  # symlink target
    assert files["usr/sbin/qemu-ga"][1] == image_mod.QEMU_GA.read_bytes()
    # every library qemu-ga loads, the dynamic loader included
    for lib in image_mod.shared_libraries(image_mod.QEMU_GA):
        assert files[str(lib).lstrip("/")][1] == lib.resolve().read_bytes()
    assert "lib64/ld-linux-x86-64.so.2" in files
    # modules: listed in load order, each after everything its .modinfo depends on
    listed = files["etc/xenlab/modules"][1].decode().split()
    names = [m.removesuffix(".ko") for m in listed]
    for want in (*MODULES, "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "failover"):
        assert want in names
    for i, rel in enumerate(listed):
        info = modinfo(files[f"lib/modules/{rel}"][1])
        assert info["name"] == names[i]
        for dep in filter(None, info.get("depends", "").split(",")):
            assert dep.replace("-", "_") in names[:i], f"{names[i]} before its dependency {dep}"
        assert info["vermagic"].startswith(guest_image.kernel_version.split("-")[0])


def test_cached_build_is_reused(guest_image: GuestImage) -> None:
    stamp = (guest_image.kernel.parent / "image.json").stat().st_mtime_ns
    again = build_image()
    assert again == guest_image
    assert (again.kernel.parent / "image.json").stat().st_mtime_ns == stamp


def test_two_builders_at_once_build_once(guest_image: GuestImage, tmp_path: Path) -> None:
    # Reuse the downloaded .deb so this only pays for unpacking and packing.
    debs = tmp_path / "debs"
    debs.mkdir()
    for deb in (guest_image.kernel.parent.parent / "debs").glob("*.deb"):
        os.link(deb, debs / deb.name)
    results: list[GuestImage] = []
    errors: list[BaseException] = []
    said: list[str] = []

    def run() -> None:
        try:
            results.append(build_image(tmp_path, progress=said.append))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results[0] == results[1]
    assert results[0].key == guest_image.key
    built = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert built == sorted(["debs", guest_image.key])  # no half-built directories left over
    assert sum(line.startswith("unpacking") for line in said) == 1  # the lock: one build
    assert results[0].initrd.read_bytes() == guest_image.initrd.read_bytes()


# ---------------------------------------------------------------- boots


class Guest:
    """One QEMU process booting the image, with its serial log, QGA and QMP sockets."""

    def __init__(self, img: GuestImage, rundir: Path, disk: Path, extra: list[str],
                 append: str = "", memory: str = "512") -> None:  # fmt: skip
        self.rundir = rundir
        self.serial = rundir / "serial.log"
        self.qga_path = rundir / "qga.sock"
        self.qmp_path = rundir / "qmp.sock"
        for p in (self.serial, self.qga_path, self.qmp_path):
            p.unlink(missing_ok=True)
        argv = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", "2",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", f"{img.cmdline} {append}".strip(),
            "-chardev", f"file,id=ser,path={self.serial}", "-serial", "chardev:ser",
            "-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={disk}",
            "-device", "virtio-blk-pci,drive=d0",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga,path={self.qga_path},server=on,wait=off",
            "-device", f"virtserialport,chardev=qga,name={AGENT_PORT}",
            "-device", "virtio-balloon-pci",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *extra,
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    def console(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, count: int = 1, bound: float = BOOT_BOUND) -> float:
        """Wait for the ``count``-th ready marker; return seconds since QEMU started."""
        since = time.monotonic()
        while time.monotonic() - since < bound:
            if self.console().count(READY_MARKER) >= count:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                pytest.fail(f"QEMU exited ({self.proc.returncode}): {out}\n{self.console()}")
            time.sleep(0.05)
        pytest.fail(f"no {READY_MARKER} #{count} within {bound} s:\n{self.console()}")

    def wait_exit(self, bound: float = DOWN_BOUND) -> int:
        try:
            return self.proc.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running {bound} s after shutdown:\n{self.console()}")

    def qmp(self, command: str, args: dict[str, Any] | None = None) -> Any:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")
            assert "QMP" in json.loads(f.readline())
            for cmd, a in (("qmp_capabilities", None), (command, args)):
                msg: dict[str, Any] = {"execute": cmd}
                if a:
                    msg["arguments"] = a
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "event" not in reply:
                        break
                assert "return" in reply, reply
            return reply["return"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


class Agent:
    """The guest's qemu-ga, spoken to directly over the virtio-serial socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(15)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")
        # guest-sync-delimited: the reply starts with 0xFF, so anything a
        # previous client left unread is skipped up to it.
        token = random.randrange(1, 1 << 31)
        self.f.write(b"\xff")
        self.send("guest-sync-delimited", {"id": token})
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("qemu-ga closed the channel")
            if b"\xff" in line:
                line = line[line.rindex(b"\xff") + 1 :]
            if line.strip() and json.loads(line).get("return") == token:
                break

    def send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.send(cmd, args)
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("qemu-ga closed the channel")
            if line.strip():
                reply = json.loads(line)
                assert "return" in reply, reply
                return reply["return"]

    def spawn(self, argv: list[str]) -> None:
        """guest-exec without waiting: for commands that take the guest down."""
        self.call("guest-exec", {"path": argv[0], "arg": argv[1:]})

    def sh(self, script: str, timeout: float = 15.0) -> tuple[int, str, str]:
        """guest-exec ``/bin/sh -c script`` and poll guest-exec-status to the end."""
        pid = self.call(
            "guest-exec",
            {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True},
        )["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.call("guest-exec-status", {"pid": pid})
            if st["exited"]:
                out = base64.b64decode(st.get("out-data", "")).decode()
                err = base64.b64decode(st.get("err-data", "")).decode()
                return st["exitcode"], out, err
            time.sleep(0.05)
        pytest.fail(f"guest command did not finish in {timeout} s: {script}")

    def close(self) -> None:
        self.f.close()
        self.sock.close()


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Any]:
    guests: list[Guest] = []

    def start(img: GuestImage, disk: Path, extra: list[str] = [], **kw: Any) -> Guest:  # noqa: B006
        g = Guest(img, tmp_path, disk, list(extra), **kw)
        guests.append(g)
        return g

    yield start
    for g in guests:
        g.kill()


def _disk(tmp_path: Path, size: str = "64M") -> Path:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), size], check=True)
    return disk


@needs_qemu
def test_boot_agent_disk_reboot_and_power_button(
    guest_image: GuestImage, tmp_path: Path, boot: Any
) -> None:
    disk = _disk(tmp_path)
    guest = boot(guest_image, disk, append="xenlab.mkfs=1")
    took = guest.wait_ready()
    print(f"first boot (with mke2fs): {took:.1f} s to {READY_MARKER}")
    assert "xenlab-init: /dev/vda on /mnt/disk" in guest.console()

    agent = Agent(guest.qga_path)
    assert agent.call("guest-ping") == {}
    info = agent.call("guest-info")
    assert info["version"].startswith("7.")
    rc, out, _ = agent.sh("cat /proc/meminfo")
    assert rc == 0
    mem_kib = int(next(line.split()[1] for line in out.splitlines() if line.startswith("MemTotal")))
    assert 384 * 1024 < mem_kib <= 512 * 1024
    rc, out, _ = agent.sh("ls /sys/devices/system/node")
    assert rc == 0 and "node0" in out.split()
    rc, out, _ = agent.sh("grep ' /mnt/disk ' /proc/mounts; lsmod")
    assert rc == 0 and "/dev/vda /mnt/disk ext" in out
    for mod in MODULES:
        assert mod in out
    rc, out, err = agent.sh("echo $$:xenlab > /mnt/disk/marker && cat /mnt/disk/marker")
    assert rc == 0, err
    marker = out.strip()
    assert marker.endswith(":xenlab")
    rc, _, _ = agent.sh("exit 3")
    assert rc == 3
    # reboot from inside the guest: QEMU resets, the guest boots again
    agent.spawn(["/sbin/reboot"])
    agent.close()
    again = guest.wait_ready(count=2)
    print(f"reboot: {again - took:.1f} s from the first {READY_MARKER} to the second")
    assert "going down (reboot)" in guest.console()
    agent = Agent(guest.qga_path)
    rc, out, _ = agent.sh("cat /mnt/disk/marker")
    assert rc == 0 and out.strip() == marker
    agent.close()
    # the ACPI power button: acpid -> PID 1 -> unmount, poweroff; QEMU exits
    pressed = time.monotonic()
    guest.qmp("system_powerdown")
    assert guest.wait_exit() == 0
    print(f"system_powerdown: QEMU gone after {time.monotonic() - pressed:.1f} s")
    assert guest.console().count("going down (poweroff)") == 1


@needs_qemu
@pytest.mark.parametrize("down", ["guest-shutdown", "poweroff"])
def test_boot_vnuma_and_agent_shutdown(
    guest_image: GuestImage, tmp_path: Path, boot: Any, down: str
) -> None:
    disk = _disk(tmp_path)  # blank and no xenlab.mkfs=1: left alone, not mounted
    numa = [
        "-object", "memory-backend-ram,id=m0,size=256M",
        "-object", "memory-backend-ram,id=m1,size=256M",
        "-numa", "node,nodeid=0,cpus=0,memdev=m0",
        "-numa", "node,nodeid=1,cpus=1,memdev=m1",
        "-numa", "dist,src=0,dst=1,val=20",
    ]  # fmt: skip
    guest = boot(guest_image, disk, numa)
    took = guest.wait_ready()
    print(f"vNUMA boot: {took:.1f} s to {READY_MARKER}")
    assert "/mnt/disk" not in guest.console()
    agent = Agent(guest.qga_path)
    rc, out, _ = agent.sh(
        "cd /sys/devices/system/node && ls -d node*; cat online; "
        "cat node0/cpulist node1/cpulist node0/distance; grep MemTotal node*/meminfo"
    )
    assert rc == 0
    lines = out.splitlines()
    assert lines[:2] == ["node0", "node1"]
    assert lines[2] == "0-1"
    assert lines[3:5] == ["0", "1"]
    assert lines[5].split() == ["10", "20"]
    sizes = [int(line.split()[-2]) for line in lines[6:8]]
    assert all(128 * 1024 < kib <= 256 * 1024 for kib in sizes)
    rc, out, _ = agent.sh("grep -c ' /mnt/disk ' /proc/mounts; od -An -tx1 -N16 /dev/vda")
    assert out.split()[0] == "0"
    assert set(out.split()[1:]) == {"00"}  # blank disk untouched without xenlab.mkfs=1
    # the agent's guest-shutdown (no reply on success) and a plain poweroff
    # are as clean as the power button
    if down == "guest-shutdown":
        agent.send("guest-shutdown", {"mode": "powerdown"})
    else:
        agent.spawn(["/sbin/poweroff"])
    agent.close()
    assert guest.wait_exit() == 0
    assert "going down (poweroff)" in guest.console()
