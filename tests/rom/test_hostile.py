"""Hostile paths and bytes for every ``xenlab rom`` entry point (inspect, check, fix, dump, boot).

Whatever a user names as input (``/dev/zero``, ``/dev/urandom``, a FIFO with
no writer or an endless one, a directory, a socket, a 64 GiB sparse file, a
symlink loop, a dangling link, an unreadable file, a file truncated under the
reader, a name with a newline, an escape sequence or a byte that is not
UTF-8) or as output (a symlink to a file elsewhere or to nothing, a
directory, ``/dev/full``, a file that exists, the input itself, a full
disk), the command ends within seconds with exit 1 and one line that names
the file as :func:`xenlab.cli.output.printable` shows it, or does the right
thing; never a hang, a traceback or a crash.  Then the parser: the worst
64 MiB files in bounded time, and Hypothesis over mutated real ROMs.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.clirun import run_cli
from tests.rom import builders as b
from tests.rom.test_sysfs import BDF, FakeKernelRom, device
from tests.test_files_safety import writer
from xenlab.errors import FormatError, XenlabError
from xenlab.files import InputTooLargeError
from xenlab.formats.optionrom import MAX_IMAGES, OptionRom, parse_rom
from xenlab.rom.check import check_vga_bios
from xenlab.rom.files import ROM_LIMIT, read_rom_file
from xenlab.rom.fix import fix_rom
from xenlab.rom.inspect import inspect_file, rom_to_json

MIB = 1 << 20
XENLAB = str(Path(sys.executable).with_name("xenlab"))
# A good ROM and a bad one (the checksum): `rom boot` refuses the bad one before
# QEMU starts, so a test of its paths never boots a guest even if a check fails.
GOOD = b.x86_image()
BAD = b.x86_image(checksum=False)


def xenlab(capsys: pytest.CaptureFixture[str], *args: str,
           limit_s: float = 5.0) -> tuple[int, str, str]:
    """``xenlab ARGS`` in-process, which must end within ``limit_s`` seconds."""
    t0 = time.perf_counter()
    code, out, err = run_cli(capsys, *args)
    elapsed = time.perf_counter() - t0
    assert elapsed < limit_s, f"{args}: {elapsed:.1f} s"
    return code, out, err


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def shown(path: Path | str) -> str:
    from xenlab.cli.output import printable

    return printable(str(path))


# -- inputs ------------------------------------------------------------------------------------

INPUT_COMMANDS = ("inspect", "check", "fix", "boot")


def argv(command: str, path: Path | str, tmp: Path) -> list[str]:
    """The command line that reads ``path`` as its FILE."""
    if command == "fix":
        return ["rom", "fix", str(path), "-o", str(tmp / "out.rom")]
    if command == "boot":
        return ["rom", "boot", str(path), "--check", "--out", str(tmp / "boot"),
                "--state-dir", str(tmp / "state")]
    return ["rom", command, str(path)]


@contextlib.contextmanager
def endless_writer(fifo: Path) -> Iterator[None]:
    """A writer that fills ``fifo`` until its reader goes."""
    with writer(fifo, b"\x55\xaa" * 32768, endless=True):
        yield


@contextlib.contextmanager
def hostile(kind: str, tmp: Path) -> Iterator[Path]:
    """A path of ``kind``; what it needs (a writer thread, a socket) lives as long as it."""
    path = tmp / f"{kind}.rom"
    if kind in ("dev-zero", "dev-urandom"):
        yield Path("/dev/" + kind[4:])
    elif kind in ("fifo", "endless-fifo"):
        os.mkfifo(path)
        with endless_writer(path) if kind == "endless-fifo" else contextlib.nullcontext():
            yield path
    elif kind == "directory":
        path.mkdir()
        yield path
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
            sock.listen()
            yield path
    elif kind == "sparse-64g":
        with open(path, "wb") as f:
            f.write(GOOD)
            f.truncate(64 << 30)
        yield path
    elif kind == "loop":
        (tmp / "a.rom").symlink_to("b.rom")
        (tmp / "b.rom").symlink_to("a.rom")
        yield tmp / "a.rom"
    elif kind == "dangling":
        path.symlink_to("nowhere.rom")
        yield path
    elif kind == "missing":
        yield path
    elif kind == "empty":
        path.write_bytes(b"")
        yield path
    else:
        raise AssertionError(kind)


TOO_LARGE = "ROM file larger than 64 MiB: not read"
EXPECTED = {
    "dev-zero": TOO_LARGE,
    "dev-urandom": TOO_LARGE,
    "fifo": "no data for 3 s at +0x0 (a FIFO without a writer, or a terminal?): save the ROM "
            "to a file first",
    "endless-fifo": TOO_LARGE,
    "directory": "is a directory",
    "socket": "is a socket, not a file",
    "sparse-64g": TOO_LARGE,
    "loop": "cannot read: a symlink loop (too many levels of symbolic links)",
    "dangling": "cannot read: a dangling symlink (to 'nowhere.rom', which does not exist)",
    "missing": "cannot read: No such file or directory",
}
# rom boot reads a regular file only: QEMU opens the ROM again itself.
EXPECTED_BOOT = {
    "dev-zero": "is a character device, not a regular file",
    "dev-urandom": "is a character device, not a regular file",
    "fifo": "is a FIFO, not a regular file",
    "endless-fifo": "is a FIFO, not a regular file",
}


@pytest.mark.parametrize("command", INPUT_COMMANDS)
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_hostile_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     kind: str, command: str) -> None:
    with hostile(kind, tmp_path) as path:
        code, out, err = xenlab(capsys, *argv(command, path, tmp_path))
    want = EXPECTED_BOOT.get(kind, EXPECTED[kind]) if command == "boot" else EXPECTED[kind]
    if kind == "missing" and command == "inspect":
        want = "no such file, and not a PCI address ([DDDD:]BB:DD.F)"
    assert (code, out) == (1, "")
    assert one_line(err) == f"{path}: {want}"
    assert not (tmp_path / "out.rom").exists() and not (tmp_path / "boot").exists()


@pytest.mark.parametrize("command", ["inspect", "check", "fix"])
def test_an_empty_file_is_placed(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 command: str) -> None:
    with hostile("empty", tmp_path) as path:
        code, _, err = xenlab(capsys, *argv(command, path, tmp_path))
    assert code == 1 and one_line(err).startswith(f"{path}+0x0: signature: ")


def test_dev_zero_costs_the_limit_and_no_more(capsys: pytest.CaptureFixture[str]) -> None:
    tracemalloc.start()
    try:
        code, _, err = xenlab(capsys, "rom", "inspect", "/dev/zero")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert code == 1 and one_line(err) == f"/dev/zero: {TOO_LARGE}"
    # The chunks read, never joined: the limit plus a little.
    assert peak < ROM_LIMIT + 8 * MIB, f"{peak / MIB:.0f} MiB"


@contextlib.contextmanager
def as_nobody() -> Iterator[None]:
    """Root reads any file: as root, act as nobody (effective ids) for a while."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_an_unreadable_file(capsys: pytest.CaptureFixture[str]) -> None:
    top = Path(tempfile.mkdtemp(prefix="xenlab-rom-"))  # not under root's 0700 tmp_path
    try:
        top.chmod(0o777)
        rom = top / "secret.rom"
        rom.write_bytes(GOOD)
        rom.chmod(0)
        xenlab(capsys, "rom", "fix", "--dry-run", str(rom), "-o", str(top / "o.rom"))  # imports
        for args in (["inspect", str(rom)], ["check", str(rom)],
                     ["fix", str(rom), "-o", str(top / "out.rom")]):
            with as_nobody():
                code, out, err = xenlab(capsys, "rom", *args)
            assert (code, out) == (1, "")
            assert one_line(err) == f"{rom}: cannot read: Permission denied"
    finally:
        for p in sorted(top.iterdir()):
            p.unlink()
        top.rmdir()


def test_a_file_truncated_while_it_is_walked(tmp_path: Path) -> None:
    # A mapping of a file another process truncates dies of SIGBUS on the next
    # page it touches (-7 here, before); a file read whole only got its bytes.
    rom = tmp_path / "shrinks.rom"
    rom.write_bytes(b.rom(b.x86_image(size=64 * 1024, last=False), b.efi_image(size=64 * 1024)))
    script = f"""
import os, sys
import xenlab.rom.inspect as ins
walk = ins.parse_rom
def truncating(buf, *, source):
    os.truncate({str(rom)!r}, 0)  # another process, between the open and the walk
    return walk(buf, source=source)
ins.parse_rom = truncating
rom = ins.inspect_file(sys.argv[1])
print(len(rom.images), rom.ok)
"""
    proc = subprocess.run([sys.executable, "-c", script, str(rom)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "2 True\n", "")
    assert rom.stat().st_size == 0


def test_a_file_larger_than_its_size_says() -> None:
    # /proc files say size 0 and hold more: the bound is on what is read.
    with pytest.raises(InputTooLargeError, match=r"/proc/self/maps: ROM file larger than 64 "
                                                 r"bytes: not read"):
        read_rom_file(Path("/proc/self/maps"), limit=64)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """``backing`` as a block device (losetup), detached after."""
    try:
        proc = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                              text=True, timeout=30, check=False)
    except FileNotFoundError:
        pytest.skip("no losetup on this machine")
    if proc.returncode != 0:
        pytest.skip(f"this machine gives no loop device: {proc.stderr.strip()}")
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", str(dev)], timeout=30, check=True)


def test_block_devices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # fstat says 0 for a block device; its size is where a seek to the end lands.
    big = tmp_path / "disk.img"
    with open(big, "wb") as f:
        f.write(GOOD)
        f.truncate(ROM_LIMIT + MIB)
    with loop_device(big) as disk:
        code, out, err = xenlab(capsys, "rom", "inspect", str(disk), limit_s=1.5)
    assert (code, out) == (1, "") and one_line(err) == f"{disk}: {TOO_LARGE}"
    small = tmp_path / "rom.img"
    small.write_bytes(GOOD)
    with loop_device(small) as disk:
        code, out, err = xenlab(capsys, "rom", "inspect", "--json", str(disk))
    assert code == 0 and err == "" and json.loads(out)["images"][0]["checksum_ok"]


def test_a_stalled_writer_is_given_up_on(tmp_path: Path) -> None:
    fifo = tmp_path / "stalled.rom"
    os.mkfifo(fifo)
    ready = threading.Event()
    done = threading.Event()

    def stall() -> None:
        with open(fifo, "wb") as f:
            f.write(GOOD[:100])
            f.flush()
            ready.set()
            done.wait(10)

    t = threading.Thread(target=stall, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(XenlabError, match=r"stalled.rom: no data for 0.5 s at \+0x64 "):
            read_rom_file(fifo, wait=0.5)
    finally:
        done.set()
        t.join(5)
    assert ready.is_set() and time.perf_counter() - t0 < 3


def test_a_fifo_with_a_rom_is_read(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fifo = tmp_path / "piped.rom"
    os.mkfifo(fifo)
    t = threading.Thread(target=fifo.write_bytes, args=(GOOD,), daemon=True)
    t.start()
    code, out, err = xenlab(capsys, "rom", "inspect", "--json", str(fifo))
    t.join(5)
    assert code == 0 and err == "" and json.loads(out)["size"] == len(GOOD)


# -- names -------------------------------------------------------------------------------------

ODD = os.fsdecode(b"odd\nname\x1b[31m\xff.rom")


@pytest.mark.parametrize("command", ["inspect", "check", "fix", "boot"])
def test_an_odd_name_is_shown_escaped(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      command: str) -> None:
    bad = tmp_path / ODD
    bad.write_bytes(bytes(4096))  # no ROM: the error names the file
    code, out, err = xenlab(capsys, *argv(command, bad, tmp_path))
    assert code == 1 and out == ""
    line = one_line(err)
    if command == "boot":  # refused by the pre-boot check, after reading it
        assert line == f"{str(bad)!r}: a ROM path with control characters cannot go into an " \
                       "xl config"
    else:
        assert line.startswith(f"{tmp_path}/odd\\x0aname\\x1b[31m\\xff.rom+0x0: signature: ")


def test_an_odd_name_in_the_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = tmp_path / ODD
    good.write_bytes(BAD)
    out = tmp_path / (ODD + ".fixed")
    code, text, err = xenlab(capsys, "rom", "inspect", str(good))
    assert code == 0 and err == "" and "\x1b" not in text and "\\x1b[31m" in text
    code, text, err = xenlab(capsys, "rom", "fix", str(good), "-o", str(out))
    assert code == 0 and err == "" and "\x1b" not in text
    assert f"wrote 1024 bytes to {shown(out)}: 1 image(s)" in text
    assert parse_rom(out.read_bytes()).ok


# -- outputs -----------------------------------------------------------------------------------


def write_out(capsys: pytest.CaptureFixture[str], tmp: Path, command: str,
              out: Path) -> tuple[int, str, str]:
    """``rom fix BAD -o OUT`` or ``rom dump BDF -o OUT`` (a fake device serving BAD)."""
    if command == "fix":
        src = tmp / "in.rom"
        src.write_bytes(BAD)
        return xenlab(capsys, "rom", "fix", str(src), "-o", str(out))
    sysfs = tmp / "sys"
    kernel = FakeKernelRom(device(sysfs) / "rom", GOOD)
    result = xenlab(capsys, "rom", "dump", BDF, "-o", str(out), "--sysfs", str(sysfs))
    kernel.done()
    return result


def written(command: str) -> bytes:
    return fix_rom(BAD).data if command == "fix" else GOOD


@pytest.mark.parametrize("command", ["fix", "dump"])
def test_output_through_a_symlink_to_its_target(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path, command: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / "card.rom"
    target.write_bytes(b"old")
    target.chmod(0o640)
    links = tmp_path / "links"
    links.mkdir()
    (links / "hop.rom").symlink_to(Path("..") / "real" / "card.rom")
    link = links / "card.rom"
    link.symlink_to("hop.rom")  # a chain of two, the second relative to its directory
    code, _, err = write_out(capsys, tmp_path, command, link)
    assert code == 0, err
    assert target.read_bytes() == written(command)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.readlink(link) == "hop.rom" and (links / "hop.rom").is_symlink()
    assert sorted(p.name for p in real.iterdir()) == ["card.rom"]  # no temporary file left
    assert sorted(p.name for p in links.iterdir()) == ["card.rom", "hop.rom"]


@pytest.mark.parametrize("command", ["fix", "dump"])
def test_an_existing_output_is_replaced_atomically(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path, command: str) -> None:
    out = tmp_path / "out.rom"
    out.write_bytes(b"old")
    out.chmod(0o600)
    before = out.stat().st_ino
    code, _, err = write_out(capsys, tmp_path, command, out)
    assert code == 0, err
    assert out.read_bytes() == written(command) and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.stat().st_ino != before  # renamed over, never rewritten in place


def refused_output(tmp: Path, kind: str) -> tuple[Path, str]:
    """An output path of ``kind`` and why it is refused."""
    if kind == "dangling":
        link = tmp / "dangling.rom"
        link.symlink_to(tmp / "elsewhere" / "made.rom")
        return link, (f"cannot write: a dangling symlink (to '{tmp}/elsewhere/made.rom'); not "
                      "created through it")
    if kind == "directory":
        (tmp / "adir").mkdir()
        return tmp / "adir", "cannot write: is a directory, not a regular file (only files are " \
                             "replaced)"
    if kind == "dev-full":
        return Path("/dev/full"), "cannot write: is a character device, not a regular file " \
                                  "(only files are replaced)"
    if kind == "link-to-device":
        (tmp / "null.rom").symlink_to("/dev/null")
        return tmp / "null.rom", "cannot write: is a character device, not a regular file " \
                                 "(only files are replaced)"
    if kind == "loop":
        (tmp / "a.rom").symlink_to("b.rom")
        (tmp / "b.rom").symlink_to("a.rom")
        return tmp / "a.rom", "cannot write: a symlink loop (too many levels of symbolic links)"
    if kind == "no-directory":
        return tmp / "no" / "out.rom", "cannot write: No such file or directory"
    raise AssertionError(kind)


@pytest.mark.parametrize("command", ["fix", "dump"])
@pytest.mark.parametrize("kind", ["dangling", "directory", "dev-full", "link-to-device", "loop",
                                  "no-directory"])
def test_a_refused_output_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      command: str, kind: str) -> None:
    out, why = refused_output(tmp_path, kind)
    code, text, err = write_out(capsys, tmp_path, command, out)
    assert (code, text) == (1, "") and one_line(err) == f"{out}: {why}"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert not (tmp_path / "elsewhere").exists()
    assert not [p for p in tmp_path.rglob(".*.tmp")]


def test_a_symlink_planted_in_a_sticky_directory(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    # As the kernel's fs.protected_symlinks: another user's link in /tmp is not followed.
    if os.geteuid() != 0:
        pytest.skip("making a link owned by another user needs root")
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"precious")
    link = shared / "out.rom"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)
    code, _, err = write_out(capsys, tmp_path, "fix", link)
    assert code == 1 and one_line(err) == (
        f"{link}: cannot write: a symlink in a sticky world-writable directory owned by "
        "another user (the kernel would not follow it either)")
    assert victim.read_bytes() == b"precious"
    os.lchown(link, 0, 0)  # one's own link is followed
    code, _, err = write_out(capsys, tmp_path, "fix", link)
    assert code == 0 and victim.read_bytes() == fix_rom(BAD).data


def test_fix_in_place(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rom = tmp_path / "card.rom"
    rom.write_bytes(BAD)
    code, _, err = xenlab(capsys, "rom", "fix", str(rom), "-o", str(rom))
    assert code == 0, err
    assert rom.read_bytes() == fix_rom(BAD).data and parse_rom(rom.read_bytes()).ok


def test_a_write_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    # A disk that fills up: the file size limit makes write() fail (EFBIG) for real.
    src = tmp_path / "in.rom"
    src.write_bytes(b.rom(b.x86_image(size=8192, checksum=False)))
    out = tmp_path / "out.rom"
    out.write_bytes(b"old")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run([XENLAB, "rom", "fix", str(src), "-o", str(out)], capture_output=True,
                          text=True, timeout=60, check=False, preexec_fn=small_files)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert one_line(proc.stderr) == f"{out}: cannot write: File too large"
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.rom", "out.rom"]


# -- rom boot's output directory, and sysfs ------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dangling", "dev-full"])
def test_boot_refuses_an_output_directory_that_is_not_one(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    rom = tmp_path / "bad.rom"
    rom.write_bytes(BAD)  # refused before boot anyway, should a check here let it through
    out, why = {
        "file": (tmp_path / "bad.rom", "is a regular file, not a directory"),
        "dangling": (tmp_path / "out", f"cannot write: a dangling symlink (to "
                                       f"'{tmp_path}/gone')"),
        "dev-full": (Path("/dev/full"), "is a character device, not a directory"),
    }[kind]
    if kind == "dangling":
        out.symlink_to(tmp_path / "gone")
    code, text, err = xenlab(capsys, "rom", "boot", str(rom), "--check", "--out", str(out),
                             "--state-dir", str(tmp_path / "state"))
    assert (code, text) == (1, "") and one_line(err) == f"{out}: {why}"
    assert not (tmp_path / "gone").exists()


def test_a_hostile_sysfs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = device(tmp_path, rom=False)
    (d / "rom").symlink_to("/dev/zero")  # enable and disable writes go nowhere
    code, _, err = xenlab(capsys, "rom", "inspect", BDF, "--sysfs", str(tmp_path))
    assert code == 1 and one_line(err) == f"{d}/rom: ROM larger than 16 MiB: not read"
    (d / "rom").unlink()
    os.mkfifo(d / "rom")  # a kernel that never answers
    code, _, err = xenlab(capsys, "rom", "dump", BDF, "-o", str(tmp_path / "o.rom"),
                          "--sysfs", str(tmp_path))
    assert code == 1 and one_line(err) == (
        f"{d}/rom: cannot enable the ROM: nobody reads it (waited 3 s)")
    (d / "vendor").unlink()
    (d / "vendor").symlink_to("/dev/urandom")
    code, _, err = xenlab(capsys, "rom", "inspect", BDF, "--sysfs", str(tmp_path))
    assert code == 1 and one_line(err) == (
        f"{d}/vendor: cannot read a hex number: {d}/vendor: attribute file larger than 4 KiB: "
        "not read")
    assert not (tmp_path / "o.rom").exists()


# -- the parser's worst files --------------------------------------------------------------------


def test_64_mib_of_candidates_in_bounded_time(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    # Every other byte starts a 55 aa whose pointer must be followed (17 s at
    # 16 MiB, one at a time), then once more behind the image.
    rom = tmp_path / "candidates.rom"
    rom.write_bytes(b"\x55\xaa" * (ROM_LIMIT // 2))
    code, out, _ = xenlab(capsys, "rom", "inspect", "--json", str(rom))
    assert code == 0 and len(json.loads(out)["images"]) == 1
    code, _, err = xenlab(capsys, "rom", "fix", str(rom), "-o", str(tmp_path / "o.rom"))
    assert code == 1 and one_line(err).startswith(
        f"{rom}+0x18: fix: refused: the ROM is damaged beyond a checksum or header fix: ")


def test_a_chain_of_131072_images_stops(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    rom = tmp_path / "chain.rom"
    one = b.x86_image(size=512, last=False, devices=tuple(range(1, 200)))
    rom.write_bytes(one * (ROM_LIMIT // 512))
    code, out, _ = xenlab(capsys, "rom", "inspect", str(rom))
    assert code == 0
    assert f"the walk stops after {MAX_IMAGES} images (real ROMs hold a handful)" in out
    code, _, err = xenlab(capsys, "rom", "fix", str(rom), "-o", str(tmp_path / "o.rom"))
    assert code == 1 and one_line(err).startswith(
        f"{rom}+{MAX_IMAGES * 512:#x}: fix: refused: the ROM is damaged beyond")


def test_a_64_mib_flash_dump_is_read_and_more_is_not(tmp_path: Path) -> None:
    flash = tmp_path / "flash.bin"
    with open(flash, "wb") as f:
        f.truncate(ROM_LIMIT - len(GOOD))
        f.seek(ROM_LIMIT - len(GOOD))
        f.write(GOOD)
    assert inspect_file(flash).header_offset == ROM_LIMIT - len(GOOD)
    with open(flash, "ab") as f:
        f.write(b"\xff")
    with pytest.raises(InputTooLargeError, match=f"{flash}: {TOO_LARGE}"):
        inspect_file(flash)


# -- Hypothesis: mutated real ROMs -------------------------------------------------------------


@pytest.fixture(scope="session")
def real_roms(shared_data: Path) -> list[bytes]:
    """QEMU's ROMs from shared/data (x86, x86 + EFI, ISA), and the builders' odd layouts."""
    roms = [p.read_bytes() for p in sorted((shared_data / "rom").iterdir())]
    assert len(roms) >= 5
    return [*roms, b.multi(), b.nvidia(), b.isa_image(size=1024),
            b.rom(b.x86_image(pnp=True, devices=(1, 2, 3)), header=b"NVGI" + bytes(0x7C))]


def _headers(data: bytes) -> list[int]:
    found, at = [], data.find(b"\x55\xaa")
    while at >= 0 and len(found) < 16:
        found.append(at)
        at = data.find(b"\x55\xaa", at + 1)
    return found or [0]


@st.composite
def mutated(draw: st.DrawFn, roms: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(roms)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["field", "field", "byte", "cut", "insert", "splice"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "field":  # a header, PCIR, $PnP or EFI field of some image
            base = draw(st.sampled_from(_headers(bytes(data))))
            at = min(base + draw(st.integers(0, 0x80)), max(len(data) - 2, 0))
            data[at : at + 2] = draw(st.sampled_from([0, 1, 0x18, 0x80, 0xFF, 0x7FFF, 0xFFFF,
                                                      len(data) // 512, len(data)])
                                     ).to_bytes(4, "little")[:2]
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=64))
        else:  # another image's start, or a signature, somewhere
            data[pos:pos] = draw(st.sampled_from([b"\x55\xaa", b"PCIR", b"NPDS", b"NPDE",
                                                  b"$PnP", b"\xf1\x0e", GOOD[:0x60]]))
    return bytes(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.data_too_large])
@given(st.data())
def test_mutated_roms_raise_only_format_errors(real_roms: list[bytes], data: st.DataObject) -> None:
    rom = data.draw(mutated(real_roms))
    t0 = time.perf_counter()
    try:
        walked = parse_rom(rom, source="m.rom")
    except FormatError as err:
        assert str(err).startswith("m.rom+0x")
        return
    assert isinstance(walked, OptionRom) and walked.size == len(rom)
    json.dumps(rom_to_json(walked))
    check_vga_bios(walked)
    check_vga_bios(walked, vendor_id=0x1234, device_id=0x1111)
    for kwargs in ({}, {"strip_header": True, "keep": {0, -1}},
                   {"set_ids": (0x8086, 0x0412), "checksum_at": 6}):
        try:
            fixed = fix_rom(rom, source="m.rom", **kwargs)  # type: ignore[arg-type]
        except FormatError as err:
            assert str(err).startswith("m.rom")
        else:
            assert fixed.after.ok or all(p.kind.value in ("class-swapped", "trailer",
                                                          "vendor-header")
                                         for p in fixed.after.all_problems())
    assert time.perf_counter() - t0 < 2


# -- rom boot end to end: a comma reaches QEMU whole, a newline is refused -------------------------


@pytest.mark.integration
def test_rom_boot_with_a_comma_and_a_newline_in_the_path(capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    from tests.vm.guests import clear
    from xenlab.vm.domain import Toolstack

    stdvga = Path("/usr/share/seabios/vgabios-stdvga.bin")
    if not stdvga.is_file():
        pytest.fail(f"{stdvga} missing: ./dev.sh installs Debian's seabios package")
    odd = tmp_path / "a,b dir"
    odd.mkdir()
    rom = odd / "vga,bios=x.bin"  # QEMU splits options at commas: romfile= doubles them
    rom.write_bytes(stdvga.read_bytes())
    state = tmp_path / "state"
    try:
        code, out, err = run_cli(capsys, "rom", "boot", str(rom), "--check", "--json",
                                 "--out", str(tmp_path / "out"), "--state-dir", str(state))
        assert code == 0, out + err
        result = json.loads(out)
        assert result["ran"] and result["rom"] == str(rom)
        assert result["firmware"]["vga_rom_at"] == "c000:0003"
    finally:
        clear(Toolstack(state))
    newline = tmp_path / "vga\nbios.bin"
    newline.write_bytes(stdvga.read_bytes())
    code, out, err = xenlab(capsys, "rom", "boot", str(newline), "--check",
                            "--out", str(tmp_path / "out"), "--state-dir", str(state))
    assert (code, out) == (1, "") and one_line(err) == (
        f"{str(newline)!r}: a ROM path with control characters cannot go into an xl config")
    assert Toolstack(state).store.list() == []
