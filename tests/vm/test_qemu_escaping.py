"""What reaches QEMU's option strings: every config, record and path value escaped or refused.

QEMU reads most options as ``key=value,...`` strings (QemuOpts and keyval:
a comma ends a value, ``,,`` is a comma inside one; a first part without
``=`` is the option's implied key) and ``-blockdev``/``-device``/``-netdev``
also as JSON.  The tests here read the argv back with those rules
(:func:`qemu_split`, written from QEMU's ``get_opt_name_value``, not from
xenlab's builder) and put hostile text in every text-valued key xl reads
(the table in ``xenlab.config.keys``: a key added there is covered), in the
device specs, the run directory, the guest image and the tap names.  A value
either comes back whole, as exactly one value, or is refused with an error
that names its key.  The real QEMU then proves the same for the options a
user names: ``-name`` (query-name), ``-vnc`` (query-vnc), disk files
(query-block), chardev paths (query-chardev) and ``romfile=`` (qom-get).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vm.test_qemu_real import _session
from xenlab.config import parse
from xenlab.config.keys import KEYS, XENLAB_KEYS, KeyKind
from xenlab.config.model import DomainConfig, domain_config
from xenlab.config.writer import quote
from xenlab.errors import XenlabError
from xenlab.vm.backends.qemu import qemuopts
from xenlab.vm.backends.qemu.qemu import QemuOptionError, RuntimePaths, qemu_argv

PATHS = RuntimePaths.under(Path("/run/xl/7"))
BASE = 'name = "g"\ntype = "hvm"\nmemory = 64\n'
MARK = "MK"

# Text that QEMU's option syntax would misread if it went in unescaped, and
# text that no option can carry (NUL is not even writable in xl).
PAYLOADS = [
    f"{MARK}a,evil=1",
    f"{MARK}a,,evil=1",
    f"{MARK},",
    f"{MARK},,",
    f"{MARK}=x=y",
    f'{MARK}q"uo\'te',
    f"{MARK}sp ace\ttab",
    f"{MARK}line\nbreak",
    f"{MARK}é非😀",
    f"{MARK}\udcff\udc80bytes",
    f'{MARK}{{"json":1}}',
]

# Options QEMU parses as option strings (QemuOpts/keyval), or as JSON when
# the text starts with "{".  Every other option with an argument takes it
# as one plain string (-kernel, -append, -pidfile, -D, -uuid...).
OPTION_STRINGS = frozenset({
    "-name", "-vnc", "-spice", "-chardev", "-device", "-netdev", "-blockdev", "-drive",
    "-numa", "-object", "-machine", "-m", "-smp", "-action", "-boot", "-rtc", "-mon",
    "-qmp", "-accel", "-display", "-smbios", "-fw_cfg", "-serial", "-global",
    "-audiodev", "-overcommit", "-msg", "-sandbox",
})  # fmt: skip
PLAIN = frozenset({"-kernel", "-initrd", "-append", "-pidfile", "-D", "-uuid", "-incoming",
                   "-cpu", "-L", "-bios", "-k"})
FLAGS = frozenset({"-S", "-usb", "-no-user-config", "-nodefaults", "-daemonize"})


def _value(text: str, pos: int) -> tuple[str, int]:
    """QEMU's get_opt_value: up to a single comma; ",," is one comma."""
    out = []
    while pos < len(text):
        if text[pos] == ",":
            if text[pos + 1 : pos + 2] != ",":
                break
            pos += 1
        out.append(text[pos])
        pos += 1
    return "".join(out), pos


def qemu_split(text: str) -> list[tuple[str, str]]:
    """An option string as QemuOpts reads it (get_opt_name_value); implied key "<implied>"."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        end = pos
        while end < len(text) and text[end] not in "=,":
            end += 1
        if end < len(text) and text[end] == "=":
            name = text[pos:end]
            value, pos = _value(text, end + 1)
        elif not out:
            name = "<implied>"
            value, pos = _value(text, pos)
        else:
            name, value, pos = text[pos:end], "on", end
        out.append((name, value))
        pos += 1  # the separating comma
    return out


def _leaves(obj: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}{k}")
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v, prefix)
    else:
        yield prefix, obj if isinstance(obj, str) else json.dumps(obj)


def option_values(argv: list[str], *, passthrough: int = 0) -> list[tuple[str, str, str]]:
    """(option, key, value) for every value QEMU would see in ``argv[1:]``.

    The last ``passthrough`` elements (device_model_args) are skipped: they
    are the user's own QEMU arguments, passed on as they are.
    """
    out = []
    args = argv[1 : len(argv) - passthrough]
    i = 0
    while i < len(args):
        opt = args[i]
        assert opt.startswith("-"), (opt, args)
        if opt in FLAGS:
            i += 1
            continue
        assert opt in OPTION_STRINGS | PLAIN, f"unknown option {opt}: add it to the tables here"
        arg = args[i + 1]
        if opt in PLAIN:
            out.append((opt, "", arg))
        elif arg.startswith("{"):
            out += [(opt, k, v) for k, v in _leaves(json.loads(arg))]
        else:
            out += [(opt, k, v) for k, v in qemu_split(arg)]
        i += 2
    return out


def check_argv(argv: list[str], payload: str, *, passthrough: int = 0) -> list[str]:
    """No key was injected, and each value holding the payload's mark holds all of it."""
    found = []
    for opt, key, value in option_values(argv, passthrough=passthrough):
        assert "evil" not in key, (opt, key, value)
        assert not key.startswith(MARK), (opt, key, value)
        if MARK in value:
            assert payload in value, (opt, key, value)
            found.append(opt)
    return found


def dc_of(text: str) -> DomainConfig:
    return domain_config(parse(text, source="inline.cfg"))


# --- the reader used here --------------------------------------------------------


def test_qemu_split_follows_qemus_rules() -> None:
    assert qemu_split("guest=a,,b,debug-threads=on") == [("guest", "a,b"), ("debug-threads", "on")]
    assert qemu_split("unix:/x,password=on") == [("<implied>", "unix:/x"), ("password", "on")]
    # An implied first value with "=" before any comma is read as key=value.
    assert qemu_split("unix:/a=b") == [("unix:/a", "b")]
    assert qemu_split("a=1,,,b=2") == [("a", "1,"), ("b", "2")]
    assert qemu_split("x=,y") == [("x", ""), ("y", "on")]


# --- every text key xl reads --------------------------------------------------------

TEXT_KINDS = {KeyKind.STRING, KeyKind.STRING_OR_LIST, KeyKind.NUMBER_OR_STRING}
TEXT_KEYS = sorted(
    name for name, info in {**KEYS, **XENLAB_KEYS}.items()
    if info.kind in TEXT_KINDS and name not in ("name", "type")
)  # fmt: skip
# Keys whose value is a list of QEMU arguments, passed on as they are (documented).
PASSTHROUGH = ("device_model_args", "device_model_args_hvm", "device_model_args_pv")


def _attempt(text: str, key: str, **kwargs: Any) -> list[str] | None:
    """The argv of config ``text``, or None when it was refused naming ``key``."""
    try:
        return qemu_argv(dc_of(text), PATHS, **kwargs)
    except XenlabError as err:
        message = str(err)
        assert "\n" not in message.strip() or "inline.cfg" in message, message
        names = {key, "cmdline"} if key in ("root", "extra") else {key}
        assert any(n in message for n in names) or "inline.cfg:" in message, message
        return None


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
@pytest.mark.parametrize("key", TEXT_KEYS)
def test_every_text_key(key: str, payload: str) -> None:
    text = BASE + f"boot = \"c\"\nvnc = 1\n{key} = {quote(payload)}\n"
    argv = _attempt(text, key)
    if argv is not None:
        found = check_argv(argv, payload)
        if key in ("vncpasswd", "spicepasswd"):
            assert not found  # secrets go over QMP, never on argv


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_domain_name(payload: str) -> None:
    argv = _attempt(f'name = {quote(payload)}\ntype = "hvm"\nboot = "c"\n', "name")
    if "\n" in payload or "\t" in payload:
        assert argv is None
        return
    assert argv is not None
    assert check_argv(argv, payload) == ["-name"]
    (name,) = [argv[i + 1] for i, a in enumerate(argv) if a == "-name"]
    assert dict(qemu_split(name)) == {"guest": payload, "debug-threads": "on"}


@pytest.mark.parametrize("key", PASSTHROUGH)
def test_device_model_args_pass_through_verbatim(key: str) -> None:
    args = ["-global", "kvm-pit.lost_tick_policy=discard,evil=1", f"{MARK}\udcff\n"]
    text = BASE + f"boot = \"c\"\n{key} = [ {', '.join(quote(a) for a in args)} ]\n"
    argv = qemu_argv(dc_of(text), PATHS)
    if key == "device_model_args_pv":
        assert args[0] not in argv  # an HVM guest
        return
    assert argv[-3:] == args  # deliberate: the user's own QEMU arguments
    check_argv(argv, "\0", passthrough=3)


def test_a_nul_in_a_passthrough_argument_is_refused() -> None:
    dc = dc_of(BASE + 'boot = "c"\n')
    dc = replace(dc, extra={**dc.extra, "device_model_args": ("-name", "a\0b")})
    with pytest.raises(QemuOptionError, match=r"^device_model_args: 'a\\x00b' contains a NUL"):
        qemu_argv(dc, PATHS)


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_disk_targets(payload: str) -> None:
    disks = ", ".join(quote(f"format={fmt},vdev={vdev},target={payload}{n}")
                      for n, (fmt, vdev) in enumerate(
                          [("raw", "xvda"), ("qcow2", "hda"), ("vhd", "sda"), ("raw", "hdc")]))
    # (xl strips commas at the end of a target, so every target ends in a letter.)
    cdrom = quote(f"vdev=hdd,devtype=cdrom,target={payload}c")
    text = BASE + f'boot = "c"\ndisk = [ {disks}, {cdrom} ]\n'
    argv = _attempt(text, "disk")
    if "\n" in payload or "\t" in payload:
        assert argv is None
        return
    assert argv is not None
    assert check_argv(argv, payload).count("-blockdev") == 4 + 1
    files = [v for opt, key, v in option_values(argv) if key == "filename"]
    assert sorted(files) == sorted([f"{payload}{n}" for n in range(4)] + [f"{payload}c"])


@pytest.mark.parametrize("payload", [p for p in PAYLOADS if "," not in p])
def test_vfb_and_vif_fields(payload: str) -> None:
    # xl splits vfb= and vif= specs at commas, so their fields hold none.
    pv = f'name = "p"\nkernel = "/k"\nvfb = [ {quote("vnc=1,vnclisten=" + payload)} ]\n'
    argv = _attempt(pv, "vnclisten")
    if argv is not None:
        check_argv(argv, payload)
    for field in ("bridge", "script", "ip", "model", "gatewaydev", "type", "vifname"):
        text = BASE + f'boot = "c"\nvif = [ {quote(field + "=" + payload)} ]\n'
        try:
            dc_of(text)
        except XenlabError:
            continue  # the vif spec itself is refused
        argv = _attempt(text, "vif 0", taps={0: "vif7.0"})
        if argv is not None:
            check_argv(argv, payload)


@pytest.mark.parametrize("payload", [p for p in PAYLOADS if "\n" not in p and "\t" not in p])
def test_tap_names(payload: str) -> None:
    dc = dc_of(BASE + 'boot = "c"\nvif = [ "bridge=br0" ]\n')
    argv = qemu_argv(dc, PATHS, taps={0: payload})
    assert check_argv(argv, payload) == ["-netdev"]


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_run_directory_paths(payload: str) -> None:
    paths = RuntimePaths.under(Path("/r") / payload.replace(MARK, "m", 1)[:20] / MARK)
    dc = dc_of(BASE + 'boot = "c"\nvnc = 1\n')
    try:
        argv = qemu_argv(dc, paths)
    except QemuOptionError as err:
        assert "\n" in payload or "\t" in payload, err
        assert str(err).startswith("run directory: ")
        return
    found = check_argv(argv, str(paths.rundir))
    # Sockets, logs, the pidfile: each path-carrying option holds the whole path.
    assert sorted(set(found)) == ["-D", "-chardev", "-pidfile", "-vnc"]


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    cmdline: str


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_guest_image_and_boot_files(payload: str) -> None:
    image = Image(Path(f"/c/{payload}k"), Path(f"/c/{payload}i"), f"console=ttyS0 {payload}")
    try:
        argv = qemu_argv(dc_of(BASE), PATHS, image=image)
    except QemuOptionError as err:
        assert "\n" in payload or "\t" in payload, err
        return
    assert sorted(check_argv(argv, payload)) == ["-append", "-initrd", "-kernel"]
    # The config's own kernel and ramdisk: a ramdisk with a comma or a space
    # would name several multiboot modules, so it is refused.
    text = BASE + f"kernel = {quote(payload + 'k')}\nramdisk = {quote(payload + 'r')}\n"
    argv = _attempt(text, "kernel" if "\n" in payload or "\t" in payload else "ramdisk")
    if argv is not None:
        assert "," not in payload and " " not in payload
        check_argv(argv, payload)


def test_vnclisten_cannot_add_vnc_options() -> None:
    """The reviewer's case: websocket= and power-control= smuggled in through vnclisten."""
    evil = "0.0.0.0:0,power-control=on,websocket=0.0.0.0:5700"
    with pytest.raises(QemuOptionError, match=r"^vnclisten: '0\.0\.0\.0:0,power-control=on"):
        qemu_argv(dc_of(BASE + f'vnc = 1\nvnclisten = "{evil}"\n'), PATHS)
    pv = 'name = "p"\nkernel = "/k"\nvfb = [ "vnc=1,vnclisten=0.0.0.0:0=x" ]\n'
    with pytest.raises(QemuOptionError, match=r"^vnclisten: "):
        qemu_argv(dc_of(pv), PATHS)


@pytest.mark.parametrize(
    ("settings", "vnc"),
    [
        ('vnclisten = "0.0.0.0"\nvncdisplay = 3\n', "vnc=0.0.0.0:3"),
        ('vnclisten = "192.168.1.5:7"\n', "vnc=192.168.1.5:7"),
        ('vnclisten = "::1"\n', "vnc=[::1]:0"),
        ('vnclisten = "[fe80::1]:4"\n', "vnc=[fe80::1]:4"),
        ('vnclisten = "host-1.example.org"\n', "vnc=host-1.example.org:0"),
        ('vncdisplay = 1\nvncpasswd = "x"\n', "vnc=127.0.0.1:1,password=on"),
    ],
)
def test_vnclisten_forms(settings: str, vnc: str) -> None:
    argv = qemu_argv(dc_of(BASE + "vnc = 1\n" + settings), PATHS)
    assert argv[argv.index("-vnc") + 1] == vnc


@pytest.mark.parametrize("listen", ["a b", "1.2.3.4:x", "1.2.3.4:99999", "[::1", "-h", "a_b:1"])
def test_bad_vnclisten_is_refused(listen: str) -> None:
    with pytest.raises(QemuOptionError, match=r"^vnclisten: "):
        qemu_argv(dc_of(BASE + f"vnc = 1\nvnclisten = {quote(listen)}\n"), PATHS)


def test_a_percent_in_the_log_path_is_refused() -> None:
    # -D reads "%d" as the pid and refuses any other "%".
    with pytest.raises(QemuOptionError, match=r"^run directory: .*'%'"):
        qemu_argv(dc_of(BASE), RuntimePaths.under(Path("/run/50%off")), image=None)


def test_unencodable_text_is_refused() -> None:
    dc = replace(dc_of(BASE + 'boot = "c"\n'), name="a\ud800b")
    with pytest.raises(QemuOptionError, match=r"^name: 'a\\ud800b' .*encoded"):
        qemu_argv(dc, PATHS)


def test_non_utf8_disk_names_use_the_keyval_form() -> None:
    # QEMU's JSON parser takes UTF-8 only: a file name with other bytes goes
    # in the key=value form, commas doubled.
    argv = qemu_argv(dc_of(BASE + "disk = [ 'format=raw,vdev=xvda,target=/i/\udcff,x' ]\n"),
                     PATHS)
    blockdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs[0] == "driver=file,filename=/i/\udcff,,x,node-name=xvda-file,read-only=off"
    assert json.loads(blockdevs[1])["driver"] == "raw"


# --- the real QEMU -------------------------------------------------------------

real = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                          reason="QEMU is not installed (./dev.sh setup installs it)")


@pytest.fixture
def rundir() -> Iterator[Path]:
    # Short, and with the characters QEMU's syntax cares about: "=" broke the
    # implied path of -qmp and -vnc unix:, "," must be doubled.
    top = Path(tempfile.mkdtemp(prefix="xq-"))
    run = top / "r=,é"
    run.mkdir()
    try:
        yield run
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _run(dc: DomainConfig, paths: RuntimePaths, *commands: Any) -> list[Any]:
    argv = qemu_argv(dc, paths, paused=True)
    return asyncio.run(_session(argv, paths, list(commands)))


REAL_NAMES = ["web,prod", "a,,b", ",debug-threads=off", "x=y", 'q"u\'o', "sp ace", "é非😀",
              "a,evil=1", "\udcffraw"]


@real
def test_real_names_and_paths(rundir: Path) -> None:
    paths = RuntimePaths.under(rundir)
    for name in REAL_NAMES:
        dc = replace(dc_of(BASE + 'boot = "c"\nvnc = 1\n'), name=name)
        got, vnc, chardevs = _run(dc, paths, "query-name", "query-vnc", "query-chardev")
        # QEMU answers in JSON, which carries UTF-8: other bytes come back as U+FFFD.
        assert got["name"] == os.fsencode(name).decode("utf-8", "replace"), name
        assert vnc["family"] == "unix" and vnc["service"] == str(paths.vnc)
        files = {c["label"]: c["filename"] for c in chardevs}
        assert files["console0"] == f"disconnected:unix:{paths.console},server=on"
        assert files["qmp0"].endswith(f"unix:{paths.qmp},server=on")


@real
def test_real_disk_files_and_romfile(rundir: Path) -> None:
    paths = RuntimePaths.under(rundir)
    names = ["d,evil=1.raw", "d,,2.raw", 'd"3=x.raw', "d é4.raw", "d\udcff5.raw"]
    disks = []
    for i, n in enumerate(names):
        (rundir / n).write_bytes(bytes(1 << 20))
        disks.append(quote(f"format=raw,vdev=xvd{'abcde'[i]},target={rundir / n}"))
    rom = rundir / "vga,romfile=x.bin"
    shutil.copy("/usr/share/seabios/vgabios-stdvga.bin", rom)
    text = (BASE + f'boot = "c"\nvga_rom = {quote(str(rom))}\n'
            f"disk = [ {', '.join(disks)} ]\n")
    blocks, romfile = _run(dc_of(text), paths, "query-block",
                           ("qom-get", {"path": "/machine/peripheral/video0",
                                        "property": "romfile"}))
    got = {b["qdev"].split("/")[3]: b["inserted"]["image"]["filename"] for b in blocks
           if "inserted" in b}
    want = {f"xvd{'abcde'[i]}": os.fsencode(str(rundir / n)).decode("utf-8", "replace")
            for i, n in enumerate(names)}
    assert got == want
    assert romfile == str(rom)


@real
def test_real_vnclisten_and_display(rundir: Path) -> None:
    with socket.socket() as s:  # a free port; QEMU's display N listens on 5900 + N
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if port < 5900:
        pytest.skip(f"no free port above 5900 picked by the kernel ({port})")
    dc = dc_of(BASE + f'boot = "c"\nvnc = 1\nvnclisten = "127.0.0.1:{port - 5900}"\n')
    (vnc,) = _run(dc, RuntimePaths.under(rundir), "query-vnc")
    assert (vnc["host"], vnc["service"], vnc["family"]) == ("127.0.0.1", str(port), "ipv4")


@real
def test_real_vfio_options_parse(rundir: Path) -> None:
    """vfio-pci's JSON -device is read as options: QEMU fails on the host device, not the syntax."""
    dc = dc_of(BASE + 'boot = "c"\ngfx_passthru = 1\nvga_rom = "/r,x=1.rom"\n'
               "pci = [ '01:00.0@5' ]\n")
    argv = qemu_argv(dc, RuntimePaths.under(rundir), paused=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 1
    assert "0000:01:00.0" in done.stderr and "JSON" not in done.stderr, done.stderr


def test_the_option_builder_refuses_bad_names() -> None:
    with pytest.raises(QemuOptionError, match=r"^vga_rom_device: 'a,b' "):
        qemuopts.qemu_opts([("a,b", "x")], key="vga_rom_device")
    assert qemuopts.qemu_opts([("path", "/a,b"), ("server", True), ("n", 3)], key="k") == (
        "path=/a,,b,server=on,n=3")


_names = st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True)
_values = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_names, _values), min_size=1, max_size=6))
def test_option_strings_read_back_as_built(pairs: list[tuple[str, str]]) -> None:
    """QEMU's reading of what qemu_opts builds gives the same pairs, whatever the values."""
    assert qemu_split(qemuopts.qemu_opts(pairs, key="k")) == pairs
