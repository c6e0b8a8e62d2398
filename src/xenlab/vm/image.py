"""The project's guest image, built once and cached: :func:`build_image`.

A guest is Debian's own kernel (the newest ``linux-image-6.1.0-N-amd64``
apt knows, fetched with ``apt-get download`` and unpacked with ``dpkg -x``,
never installed) and an initramfs xenlab packs itself with
:func:`xenlab.formats.cpio.write_newc`: the host's static busybox, the
virtio, ext4 and ACPI button modules from the kernel package, the host's
real ``qemu-ga`` with every shared library it loads, and :data:`INIT`.

The result lives in ``$XDG_CACHE_HOME/xenlab/images/<key>/`` where ``key``
hashes every input (kernel package version, the busybox, qemu-ga and library
bytes, the init text, :data:`BUILDER_VERSION`), so a changed input builds a
new image and an unchanged one costs a few hashes.  A directory appears
whole or not at all (built beside it, then renamed), and a file lock keeps
two processes from building at once.

Facts the image relies on (Debian bookworm's 6.1 kernel, QEMU 7.2):

* The package ships no ``modules.dep`` (``depmod`` runs at install time), so
  the load order comes from each module's own ``depends=`` field in its
  ``.modinfo`` section, the list depmod itself is built from.  Modules are
  uncompressed (``CONFIG_MODULE_COMPRESS_NONE``); busybox ``insmod`` loads
  them as they are.
* ``CONFIG_EXT2_FS`` is off: ``ext4`` mounts the ext2 file system busybox
  ``mke2fs`` makes.  ``CONFIG_DEVTMPFS_MOUNT`` is off too: /init mounts it.
* ``ext4`` asks the crypto API for ``crc32c`` at mount time and fails
  without it, so ``crc32c_generic`` comes along though nothing depends on it.
* The power button reaches user space only as an input device of the
  ``button`` module (``KEY_POWER``, read through ``evdev``, also a module);
  busybox ``acpid`` reads it and runs ``/etc/acpi/PWRF/00000080``, which
  signals PID 1 like busybox ``poweroff``.  ``acpid`` exits at once when it
  cannot open its log, so it logs to ``/run``.
* Nothing names virtio-serial ports without udev: devtmpfs makes
  ``/dev/vportNpM`` and /init links ``/dev/virtio-ports/<name>`` from sysfs.
* QEMU boots the bzImage's payload, an ELF ``vmlinux`` with a PVH note
  (``CONFIG_PVH``), directly: the xz decompression the bzImage would do
  costs about 3 s per boot under TCG.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from xenlab.errors import BackendError, NotFoundError

if TYPE_CHECKING:
    from xenlab.formats.cpio import CpioMember

#: Bumped whenever the builder's output changes for the same inputs.
BUILDER_VERSION = 2

#: apt package names the kernel is chosen among (the newest ABI number wins).
KERNEL_PACKAGE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")

#: The modules /init loads, by name; their dependencies are added before them.
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_balloon",
    "virtio_net",
    "ext4",
    "crc32c_generic",
    "button",
    "evdev",
)

#: The kernel command line the image expects; QEMU's serial port is ttyS0.
CMDLINE = "console=ttyS0 quiet panic=1"

#: The line /init prints on the console once qemu-ga holds its port.
READY_MARKER = "XENLAB-READY"

#: The virtio-serial port name qemu-ga is started on.
AGENT_PORT = "org.qemu.guest_agent.0"

BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")

#: The guest's PID 1.  Busybox ``poweroff``/``reboot``/``halt`` signal PID 1
#: (USR2/TERM/USR1) when it is not busybox init, so the traps below are the
#: one clean way down: stop the agent, unmount the disk, then the syscall.
INIT = r"""#!/bin/sh
# xenlab guest init: devices, modules, disk, qemu-ga, then wait for a signal.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /run /tmp /mnt/disk
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
hostname xenlab

cmdline=$(cat /proc/cmdline)
agent_loop=
while read -r mod; do
    insmod "/lib/modules/$mod" || echo "xenlab-init: insmod $mod failed"
done </etc/xenlab/modules

down() {
    trap '' USR1 USR2 TERM
    echo "xenlab-init: going down ($1)"
    [ -n "$agent_loop" ] && kill "$agent_loop" 2>/dev/null
    kill $(pidof acpid qemu-ga) 2>/dev/null
    sync
    umount /mnt/disk 2>/dev/null
    sync
    "$1" -f
}
trap 'down poweroff' USR2
trap 'down halt' USR1
trap 'down reboot' TERM

# The disk: mount it if it holds a file system; a blank one (all zeros in
# its first 64 KiB) is formatted first when the command line asks.
# virtio_blk adds /dev/vda while insmod runs, so there is nothing to wait for.
if [ -b /dev/vda ]; then
    if ! mount -t ext4 /dev/vda /mnt/disk 2>/dev/null; then
        case " $cmdline " in
        *" xenlab.mkfs=1 "*)
            if [ "$(dd if=/dev/vda bs=65536 count=1 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]
            then
                mke2fs -q /dev/vda >/dev/null && mount -t ext4 /dev/vda /mnt/disk
            fi ;;
        esac
    fi
fi
grep -q " /mnt/disk " /proc/mounts && echo "xenlab-init: /dev/vda on /mnt/disk"

acpid -c /etc/acpi -l /run/acpid.log

# No udev: name the virtio-serial ports the way its rules do.  The host
# announces ports (and their names) after the driver binds, so wait a little
# when there is a virtio-serial device at all.
port=/dev/virtio-ports/org.qemu.guest_agent.0
mkdir -p /dev/virtio-ports
n=0
while [ $n -lt 50 ] && ls /sys/bus/virtio/drivers/virtio_console 2>/dev/null | grep -q virtio; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        name=$(cat "$p/name")
        link="/dev/virtio-ports/$name"
        [ -n "$name" ] && [ ! -e "$link" ] && ln -s "../${p##*/}" "$link"
    done
    [ -e $port ] && break
    sleep 0.1; n=$((n + 1))
done
if [ -e $port ]; then
    ( while :; do qemu-ga -m virtio-serial -p $port -t /run; sleep 1; done ) &
    agent_loop=$!
    # Ready once the agent holds the port open.
    n=0
    while [ $n -lt 100 ]; do
        pid=$(pidof qemu-ga)
        if [ -n "$pid" ] && ls -l /proc/$pid/fd 2>/dev/null | grep -q /dev/vport; then
            break
        fi
        sleep 0.05; n=$((n + 1))
    done
else
    echo "xenlab-init: no $port, qemu-ga not started"
fi
echo XENLAB-READY
# A root shell on the serial console, for `xenlab vm console` (a test image).
( while :; do setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'; sleep 1; done ) &
while :; do
    sleep 3600 &
    wait $!
done
"""

#: busybox acpid runs this on the power button (event ``PWRF/00000080``).
_POWER_BUTTON = "#!/bin/sh\nexec poweroff\n"

#: qemu-ga's guest-shutdown runs ``/sbin/shutdown -P|-H|-r +0 message``;
#: busybox has no ``shutdown``, so this maps it onto the applets above.
# qemu-ga runs `shutdown -h -P|-H|-r +0 "message"`: the mode is not the first
# argument, so every argument is looked at.
_SHUTDOWN = """#!/bin/sh
for a in "$@"; do
  case "$a" in
  -r) exec reboot ;;
  -H) exec halt ;;
  esac
done
exec poweroff
"""

_DIRS = (
    "bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "etc/xenlab", "lib", "lib64",
    "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin",
    "var",
)  # fmt: skip

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest image: boot ``kernel`` with ``initrd`` and ``cmdline``.

    ``kernel`` is the uncompressed ELF ``vmlinux`` taken out of Debian's
    bzImage; QEMU's ``-kernel`` boots it through its PVH entry point, which
    skips the in-guest xz decompression (about 3 s of TCG per boot).
    ``bzimage`` is Debian's ``vmlinuz`` itself, which boots the same way.
    """

    kernel: Path
    initrd: Path
    kernel_version: str
    cmdline: str
    key: str
    bzimage: Path


@dataclass(frozen=True, slots=True)
class KernelPackage:
    """A Debian kernel package apt can download: ``name`` at ``version``."""

    name: str
    version: str

    @property
    def kernel_version(self) -> str:
        """The kernel release the package installs (``6.1.0-56-amd64``)."""
        return self.name.removeprefix("linux-image-")


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/xenlab/images``, or ``~/.cache/xenlab/images``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xenlab" / "images"


def build_image(
    cache: Path | None = None, *, force: bool = False, progress: Progress | None = None
) -> GuestImage:
    """Return the guest image for the current inputs, building it if it is not cached.

    ``force`` rebuilds even when the cached image exists.  ``progress`` gets
    one short line per step that takes time.

    :raise BackendError: apt, dpkg or ldd failed, or the kernel package lacks
        a file the image needs.
    :raise XenlabError: busybox or qemu-ga is not installed on this host.
    """
    say = progress or (lambda _msg: None)
    cache = Path(cache) if cache is not None else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    for tool in (BUSYBOX, QEMU_GA):
        if not tool.is_file():
            raise NotFoundError("tool", str(tool),
                                f"{tool} is needed for the guest image; install it")
    package = _kernel_package_cached(cache)
    libs = shared_libraries(QEMU_GA)
    key = _image_key(package, [BUSYBOX, QEMU_GA, *libs])
    final = cache / key
    image = GuestImage(
        kernel=final / "vmlinux",
        initrd=final / "initrd.img",
        kernel_version=package.kernel_version,
        cmdline=CMDLINE,
        key=key,
        bzimage=final / "vmlinuz",
    )
    if not force and (final / "image.json").is_file():
        return image
    with _locked(cache / ".lock"):
        if not force and (final / "image.json").is_file():
            return image  # another process built it while we waited
        deb = _download(package, cache / "debs", say)
        work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=cache))
        try:
            _build(package, deb, libs, work, say)
            work.chmod(0o755)
            if final.exists():
                shutil.rmtree(final)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    say(f"guest image {key[:12]} ready in {final}")
    return image


# ---------------------------------------------------------------- inputs


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BackendError(f"{argv[0]} failed: {err}") from err
    if proc.returncode != 0:
        raise BackendError(
            f"{' '.join(argv)} failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    return proc.stdout


_APT_LISTS = Path("/var/lib/apt/lists")


def _kernel_package_cached(cache: Path) -> KernelPackage:
    """:func:`newest_kernel_package`, remembered until apt's package lists change.

    Asking apt-cache takes most of a second; every ``vm create`` asks, so the
    answer is kept next to the images, keyed by the lists directory's mtime.
    """
    memo = cache / "kernel-package.json"
    try:
        stamp = _APT_LISTS.stat().st_mtime_ns
    except OSError:
        stamp = -1
    try:
        data = json.loads(memo.read_text())
        if data.get("lists_mtime_ns") == stamp and stamp != -1:
            return KernelPackage(str(data["name"]), str(data["version"]))
    except (OSError, ValueError, KeyError):
        pass
    package = newest_kernel_package()
    try:
        stamp = _APT_LISTS.stat().st_mtime_ns  # apt-get update may have run
        tmp = memo.with_suffix(".tmp")
        tmp.write_text(json.dumps(
            {"name": package.name, "version": package.version, "lists_mtime_ns": stamp}
        ))
        tmp.replace(memo)
    except OSError:
        pass
    return package


def newest_kernel_package() -> KernelPackage:
    """The newest ``linux-image-6.1.0-N-amd64`` apt can download, and its version.

    :raise BackendError: apt knows none (after ``apt-get update``).
    """
    for attempt in range(2):
        names = _run(["apt-cache", "pkgnames", "linux-image-6.1.0-"]).split()
        found = [(int(m.group(1)), n) for n in names if (m := KERNEL_PACKAGE.match(n))]
        for _abi, name in sorted(found, reverse=True):
            policy = _run(["apt-cache", "policy", name])
            m = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.M)
            if m and m.group(1) != "(none)":
                return KernelPackage(name, m.group(1))
        if attempt == 0:
            _run(["apt-get", "update"])
    raise BackendError("apt knows no linux-image-6.1.0-N-amd64 package (is this Debian 12?)")


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def shared_libraries(binary: Path) -> list[Path]:
    """Every shared object ``binary`` loads, the dynamic loader included (from ``ldd``).

    The paths are the ones the loader searches, as ``ldd`` prints them;
    their bytes are the resolved files.
    """
    out = _run(["ldd", str(binary)])
    libs = []
    for line in out.splitlines():
        m = _LDD_LINE.match(line)
        if m:
            libs.append(Path(m.group(1)))
        elif "not found" in line:
            raise BackendError(f"ldd {binary}: {line.strip()}")
    return libs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _image_key(package: KernelPackage, files: Iterable[Path]) -> str:
    inputs = {
        "builder": BUILDER_VERSION,
        "kernel": [package.name, package.version],
        "files": {str(p): _sha256(p) for p in files},
        "init": INIT,
        "power_button": _POWER_BUTTON,
        "shutdown": _SHUTDOWN,
        "modules": MODULES,
        "cmdline": CMDLINE,
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _download(package: KernelPackage, debs: Path, say: Progress) -> Path:
    """The package's .deb under ``debs``, downloaded unless it is already there."""
    debs.mkdir(parents=True, exist_ok=True)
    # apt names the file name_version_arch.deb with the epoch's colon escaped.
    stem = f"{package.name}_{package.version.replace(':', '%3a')}_"
    for deb in debs.glob(f"{stem}*.deb"):
        return deb
    say(f"downloading {package.name} {package.version}")
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=debs))
    try:
        _run(["apt-get", "download", f"{package.name}={package.version}"], cwd=tmp)
        got = sorted(tmp.glob(f"{stem}*.deb"))
        if not got:
            raise BackendError(f"apt-get download {package.name} left no {stem}*.deb")
        target = debs / got[0].name
        os.rename(got[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- kernel


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF ``vmlinux`` inside an x86 bzImage (xz, zstd or gzip payload).

    The setup header's ``payload_offset``/``payload_length`` (boot protocol
    2.08+) locate the compressed kernel after the real-mode setup sectors.

    :raise ValueError: not a bzImage, or a payload that is not one of these
        formats or does not decompress to an ELF file.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS setup header)")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise ValueError(f"boot protocol {version:#x} has no payload fields (needs 2.08)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if len(payload) != length:
        raise ValueError(f"payload at {start:#x} runs past the end of the file")
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x28\xb5\x2f\xfd"):
            elf = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            raise ValueError(f"payload at {start:#x} is not xz, zstd or gzip")
    except (lzma.LZMAError, zstandard.ZstdError, zlib.error) as err:
        raise ValueError(f"payload at {start:#x} does not decompress: {err}") from err
    if not elf.startswith(b"\x7fELF"):
        raise ValueError("the payload is not an ELF file")
    return elf


# ---------------------------------------------------------------- modules


def modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of an ELF64 module's ``.modinfo`` section.

    :raise ValueError: ``data`` is not a little-endian ELF64 file with one.
    """
    try:
        return _modinfo(data)
    except (struct.error, IndexError) as err:
        raise ValueError(f"malformed ELF: {err}") from err


def _modinfo(data: bytes) -> dict[str, str]:
    if data[:6] != b"\x7fELF\x02\x01" or len(data) < 64:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            pairs = data[off : off + size].split(b"\0")
            info: dict[str, str] = {}
            for pair in pairs:
                k, sep, v = pair.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(k, v)
            return info
    raise ValueError("no .modinfo section")


def _module_name(path: Path) -> str:
    return path.name.removesuffix(".ko").replace("-", "_")


def load_order(wanted: Iterable[str], depends: Mapping[str, Iterable[str]]) -> list[str]:
    """``wanted`` and everything they depend on, each after its dependencies.

    :raise BackendError: a module is unknown or the dependencies form a cycle.
    """
    order: list[str] = []
    state: dict[str, bool] = {}  # False while visiting, True when placed

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) is True:
            return
        if name in state:
            raise BackendError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in depends:
            raise BackendError(f"module {name} (needed by {chain or 'the image'}) not found")
        state[name] = False
        for dep in depends[name]:
            visit(dep, (*chain, name))
        state[name] = True
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order


# ---------------------------------------------------------------- build


def _build(package: KernelPackage, deb: Path, libs: list[Path], work: Path, say: Progress) -> None:
    # Imported here: the cpio writer pulls in numpy, which a cached image never needs
    # (every create looks the image up; importing numpy there cost 80 ms).
    from xenlab.formats.cpio import CpioMember, write_newc

    say(f"unpacking {deb.name}")
    unpacked = work / "deb"
    _run(["dpkg", "-x", str(deb), str(unpacked)])
    release = package.kernel_version
    vmlinuz = unpacked / "boot" / f"vmlinuz-{release}"
    moddir = unpacked / "lib" / "modules" / release
    if not vmlinuz.is_file() or not moddir.is_dir():
        raise BackendError(f"{deb.name} has no boot/vmlinuz-{release} or lib/modules/{release}")
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    try:
        elf = extract_vmlinux(vmlinuz.read_bytes())
    except ValueError as err:
        raise BackendError(f"{vmlinuz.name}: {err}") from err
    (work / "vmlinux").write_bytes(elf)

    paths = {_module_name(p): p for p in moddir.rglob("*.ko")}
    depends: dict[str, list[str]] = {}
    pending = [m.replace("-", "_") for m in MODULES]
    while pending:
        name = pending.pop()
        if name in depends or name not in paths:
            continue
        try:
            info = modinfo(paths[name].read_bytes())
        except ValueError as err:
            raise BackendError(f"{paths[name]}: {err}") from err
        deps = [d.replace("-", "_") for d in info.get("depends", "").split(",") if d]
        depends[name] = deps
        pending.extend(deps)
    order = load_order(MODULES, depends)

    say(f"packing the initramfs ({len(order)} modules, qemu-ga and {len(libs)} libraries)")
    members: list[CpioMember] = [CpioMember.directory(d) for d in _DIRS]
    members.append(CpioMember.symlink("var/run", "/run"))
    members.append(CpioMember("bin/busybox", BUSYBOX.read_bytes(), 0o755))
    members += _applet_links()
    members.append(CpioMember("init", INIT.encode(), 0o755))
    members.append(CpioMember("etc/acpi/PWRF/00000080", _POWER_BUTTON.encode(), 0o755))
    members.append(CpioMember("sbin/shutdown", _SHUTDOWN.encode(), 0o755))
    members.append(CpioMember("usr/sbin/qemu-ga", QEMU_GA.read_bytes(), 0o755))
    seen = {"bin", "lib", "lib64", "usr", "usr/sbin"}
    for lib in libs:
        rel = str(lib).lstrip("/")
        for parent in reversed(Path(rel).parents[:-1]):
            if str(parent) not in seen:
                seen.add(str(parent))
                members.append(CpioMember.directory(str(parent)))
        members.append(CpioMember(rel, lib.read_bytes(), 0o755))
    members.append(CpioMember.directory("lib/modules"))
    listing = []
    for name in order:
        rel = f"{name}.ko"
        members.append(CpioMember(f"lib/modules/{rel}", paths[name].read_bytes(), 0o644))
        listing.append(rel)
    members.append(CpioMember("etc/xenlab/modules", "".join(f"{r}\n" for r in listing).encode()))
    archive = write_newc(members, align=512)
    packed = zstandard.ZstdCompressor(level=10).compress(archive)
    (work / "initrd.img").write_bytes(packed)
    shutil.rmtree(unpacked)
    meta = {
        "kernel_package": package.name,
        "kernel_package_version": package.version,
        "kernel_version": release,
        "cmdline": CMDLINE,
        "modules": order,
        "libraries": [str(p) for p in libs],
        "initramfs_bytes": len(archive),
        "initrd_bytes": len(packed),
        "builder": BUILDER_VERSION,
    }
    (work / "image.json").write_text(json.dumps(meta, indent=2) + "\n")


def _applet_links() -> list[CpioMember]:
    """Links to busybox for every applet it has, at the paths it lists."""
    from xenlab.formats.cpio import CpioMember
    out = _run([str(BUSYBOX), "--list-full"])
    links = []
    for line in out.split():
        rel = line.strip("/")
        if rel and rel != "bin/busybox" and not rel.endswith("/init") and rel != "init":
            links.append(CpioMember.symlink(rel, "/bin/busybox"))
    return links
