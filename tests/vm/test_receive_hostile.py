"""vm.receiver against hostile peers: `xenlab vm receive` before and after the token.

A real receiver (the CLI, in its own process, on a fresh state directory
with a --disk-dir) is attacked over its socket on 127.0.0.1: junk, lone
surrogates, oversized lines, deep JSON, wrong types, slow and idle peers,
floods, half-closed and reset connections.  After each attack the receiver
must still be there, greet the next connection at once and refuse it
properly, have started nothing and created nothing, and never print a
traceback.  Then, with the token, requests for host files and resources
(item 3 of the hardening issue) are refused the same way.  The last test
migrates a real guest in while the receiver is under attack (QEMU, TCG).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.aio import sync
from tests.vm.guests import boot, clear, config_text, sh
from xenlab.errors import XenlabError
from xenlab.vm.domain import Toolstack
from xenlab.vm.migration import sender as mig
from xenlab.vm.migration.image import SaveHeader, header_to_json
from xenlab.vm.migration.peerconfig import PeerRefusedError, check_request
from xenlab.vm.store import DomainRecord, is_alive

HELLO = {"msg": "hello", "protocol": 2}
# The receiver's own bound on a request's line, and on the time to send it.
LINE_MAX = 1 << 20
AUTH = 5.0


@dataclass
class Receiver:
    """`xenlab vm receive` running in its own process."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    token: str
    state: Path
    disks: Path

    def connect(self, timeout: float = 10) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.settimeout(timeout)
        return s

    def status(self) -> dict[str, int]:
        """VmRSS/VmHWM (KiB) and open descriptors of the receiver."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return out

    def ask(self, line: bytes, timeout: float = 10) -> dict[str, object]:
        """Connect, take the greeting, send ``line``; the answer (the receiver then closes)."""
        with self.connect(timeout) as s:
            f = s.makefile("rb")
            assert json.loads(f.readline()) == HELLO
            s.sendall(line)
            answer = json.loads(f.readline())
            assert f.readline() == b""  # and the connection is closed
            assert isinstance(answer, dict)
            return answer

    def still_serves(self) -> None:
        """Alive, greets at once, refuses a wrong token; nothing started or made."""
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
        t0 = time.monotonic()
        said = self.ask(b'{"msg": "prepare", "token": "nope"}\n')
        assert said["msg"] == "error" and "wrong migration token" in str(said["error"])
        assert time.monotonic() - t0 < 2.0
        assert Toolstack(self.state).store.list() == []


def _prepare(token: str, text: str, **more: object) -> bytes:
    header = header_to_json(SaveHeader(
        name="g1", uuid="0b5e0a4c-1111-2222-3333-444455556666", config_text=text,
        config_path="", qemu_version="7.2.22", created=1.0, state="running", version=3))
    msg: dict[str, object] = {"msg": "prepare", "token": token, "header": header,
                              "with_storage": False, "disk_sizes": {}}
    msg.update(more)
    return json.dumps(msg).encode() + b"\n"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    state, disks = tmp_path / "state", tmp_path / "disks"
    disks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from xenlab.cli.main import main; main()", "vm", "receive",
         "--listen", "127.0.0.1:0", "--state-dir", str(state), "--disk-dir", str(disks)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.startswith("listening on 127.0.0.1:"), line + proc.stderr.read()
    host, port = line.split()[2].rsplit(":", 1)
    r = Receiver(proc, host, int(port), line.split()[-1], state, disks)
    try:
        yield r
    finally:
        alive = proc.poll() is None
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert "Traceback" not in err, err[-3000:]
        assert alive, f"the receiver ended: {err[-3000:]}"


# --- before the token -----------------------------------------------------------------------


def test_a_lone_surrogate_does_not_end_the_receiver(receiver: Receiver) -> None:
    """Item 1: a JSON string holding a lone surrogate crashed the receiver (traceback, 1)."""
    said = receiver.ask(b'{"msg": "prepare", "token": "\\ud800"}\n')
    assert said["msg"] == "error" and "token is not text (a lone surrogate)" in str(
        said["error"]), said
    said = receiver.ask(b'{"msg": "prepare", "token": "x", "header": {"\\udfff": 1}}\n')
    assert said["msg"] == "error" and "not text" in str(said["error"])
    receiver.still_serves()


def test_junk_non_utf8_and_deep_json_are_refused(receiver: Receiver) -> None:
    for line, why in [
        (b"hello\n", "is not a control message"),
        (b"\xff\xfe\x00junk\n", "not UTF-8 (byte 0"),
        (b"[1, 2, 3]\n", "is not a control message"),
        (b'{"msg": 5}\n', "is not a control message"),
        (b'{"msg": "hello"}\n', "sent 'hello', expected 'prepare'"),
        (b'{"msg": "prepare", "token": ' + b"[" * 200000 + b"]" * 200000 + b"}\n",
         "is not a control message"),
        (b'{"msg": "prepare", "token": ' + b"{\"a\":" * 100000 + b"\n",
         "is not a control message"),
        (b'{"msg": "prepare", "token": 1' + b"0" * 5000 + b"}\n", "is not a control message"),
    ]:
        said = receiver.ask(line)
        assert said["msg"] == "error" and why in str(said["error"]), (line[:40], said)
    receiver.still_serves()


def test_wrong_types_before_the_token(receiver: Receiver) -> None:
    for token in ("5", "null", "[]", "{}", '""', "true", "1e999"):
        said = receiver.ask(b'{"msg": "prepare", "token": ' + token.encode() + b"}\n")
        assert said["msg"] == "error" and "no migration token" in str(said["error"]), token
    receiver.still_serves()


def test_wrong_types_with_the_token(receiver: Receiver) -> None:
    """Every field of a "prepare" of the wrong type or out of bounds: refused, nothing made."""
    text = config_text("g1", receiver.disks / "g1.qcow2")
    good = json.loads(_prepare(receiver.token, text))
    cases: list[tuple[dict[str, object], str]] = [
        ({"header": "x"}, "expected an object"),
        ({"header": []}, "expected an object"),
        ({"header": None}, "expected an object"),
        ({"header": {**good["header"], "version": "3"}}, "header.version"),
        ({"header": {**good["header"], "created": None}}, "header.created"),
        ({"header": {**good["header"], "disk_paths": []}}, "header.disk_paths"),
        ({"with_storage": "yes"}, "with_storage is a str"),
        ({"with_storage": 1}, "with_storage is a int"),
        ({"disk_sizes": []}, "disk_sizes is a list"),
        ({"disk_sizes": {"xvda": "1"}}, "expected a positive number of bytes"),
        ({"disk_sizes": {"xvda": -1}}, "expected a positive number of bytes"),
        ({"disk_sizes": {"xvda": True}}, "expected a positive number of bytes"),
        ({"disk_sizes": {"xvda": 1e30}}, "expected a positive number of bytes"),
        ({"disk_sizes": {"xvda": 1 << 70}}, "expected a positive number of bytes"),
        ({"disk_sizes": {f"xvd{i}": 1 for i in range(300)}}, "of 300 entries"),
        ({"header": {**good["header"], "uuid": "not-a-uuid"}}, "is not a UUID"),
        ({"header": {**good["header"], "config_path": "a\nb"}}, "is not a path"),
        ({"header": {**good["header"], "config_text": "name = \n"}}, "config of g1"),
    ]
    for name in ("../x", "a/b", "a\nb", "", "-rf", "..", "1234"):
        cases.append(({"header": {**good["header"], "name": name}}, "domain name"))
        cases.append(({"header": {**good["header"], "config_text": text.replace(
            'name = "g1"', f"name = {json.dumps(name)}")}}, "domain name"))
    for change, why in cases:
        said = receiver.ask(json.dumps({**good, **change}).encode() + b"\n")
        assert said["msg"] == "error" and why in str(said["error"]), (change, said)
    assert list(receiver.disks.iterdir()) == []
    receiver.still_serves()


def test_oversize_lines_are_cut_before_they_are_parsed(receiver: Receiver) -> None:
    """A line over 1 MiB is refused when the MiB is passed; 80 at once stay bounded."""
    said = receiver.ask(b"a" * (LINE_MAX + 10) + b"\n")
    assert said["msg"] == "error" and "longer than 1048576 bytes" in str(said["error"])
    base = receiver.status()
    socks = []
    for _ in range(80):
        s = receiver.connect()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # what fits is enough
            s.send(b"[" * (2 * LINE_MAX))
        socks.append(s)
    time.sleep(2)
    for s in socks:
        s.close()
    peak = receiver.status()
    # 32 connections waiting at most, each holding a little over one line.
    assert peak["VmHWM"] - base["VmRSS"] < 80 << 10, (base, peak)
    receiver.still_serves()


def test_idle_and_slow_peers_do_not_hold_a_source_up(receiver: Receiver) -> None:
    """Item 2: three idle connections held a real source's greeting for 90 s."""
    idle = [receiver.connect() for _ in range(3)]
    slow = receiver.connect()
    stop = threading.Event()

    def slowloris() -> None:
        while not stop.is_set():
            try:
                slow.send(b"{")
            except OSError:
                return
            time.sleep(0.5)

    t = threading.Thread(target=slowloris, daemon=True)
    t.start()
    t0 = time.monotonic()
    receiver.still_serves()  # at once, not after the idle ones
    assert time.monotonic() - t0 < 2
    # Each of them is told why and closed once its time is up, in time.
    for s in [*idle, slow]:
        f = s.makefile("rb")
        assert json.loads(f.readline()) == HELLO
        said = json.loads(f.readline())
        assert said["msg"] == "error" and f"within {AUTH:g}s" in said["error"], said
        assert f.readline() == b""
    assert time.monotonic() - t0 < AUTH + 2
    stop.set()
    t.join()
    for s in [*idle, slow]:
        s.close()
    receiver.still_serves()


def test_thousands_of_connections(receiver: Receiver) -> None:
    socks = [receiver.connect() for _ in range(2000)]
    t0 = time.monotonic()
    receiver.still_serves()
    assert time.monotonic() - t0 < 3
    status = receiver.status()
    # At most 32 are kept waiting; the others were told and closed.
    assert status["fds"] < 32 + 20, status
    closed = 0
    for s in socks[:-32]:
        s.settimeout(5)
        data = s.makefile("rb").read()
        closed += data.endswith(b"}\n") or not data
        s.close()
    assert closed == len(socks) - 32
    for s in socks[-32:]:
        s.close()
    receiver.still_serves()


def test_half_closed_and_reset_connections(receiver: Receiver) -> None:
    s = receiver.connect()
    s.shutdown(socket.SHUT_WR)  # says nothing, ever
    t0 = time.monotonic()
    data = s.makefile("rb").read()
    assert data == json.dumps(HELLO).encode() + b"\n" and time.monotonic() - t0 < 2
    s.close()
    # Reset in the middle of a line.
    s = receiver.connect()
    s.recv(100)
    s.send(b'{"msg": "prepare", "tok')
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    # Reset before the greeting is read.
    s = receiver.connect()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    receiver.still_serves()


# --- with the token: what a peer may ask for -------------------------------------------------


def _refused(receiver: Receiver, line: bytes, *whys: str) -> str:
    said = receiver.ask(line)
    error = str(said["error"])
    assert said["msg"] == "error", said
    for why in whys:
        assert why in error, error
    receiver.still_serves()
    return error


def test_a_peer_names_no_host_file(receiver: Receiver, tmp_path: Path) -> None:
    """Item 3: /etc/passwd as a disk, kernel=/etc/shadow, a symlink out, '..', file: serials."""
    passwd = os.stat("/etc/passwd")
    disks = receiver.disks
    for target, why in [
        ("/etc/passwd", f"resolves to /etc/passwd, outside --disk-dir {disks}"),
        (f"{disks}/../outside.qcow2", "a path with '..'"),
        ("g1.qcow2", "not an absolute path"),
    ]:
        text = config_text("g1", target)
        _refused(receiver, _prepare(receiver.token, text, with_storage=True,
                                    disk_sizes={"xvda": 1 << 20}),
                 f"disk xvda target {target!r} ({why})", "--trust-peer-config")
    outside = tmp_path / "outside.qcow2"
    (disks / "link.qcow2").symlink_to(outside)
    _refused(receiver, _prepare(receiver.token, config_text("g1", disks / "link.qcow2"),
                                with_storage=True, disk_sizes={"xvda": 1 << 20}),
             f"resolves to {outside}, outside --disk-dir")
    ok_disk = disks / "g1.qcow2"
    text = config_text("g1", ok_disk, tail='kernel = "/etc/shadow"\nramdisk = "/boot/x"\n')
    _refused(receiver, _prepare(receiver.token, text),
             "kernel='/etc/shadow' (resolves to /etc/shadow", "ramdisk='/boot/x'")
    serial = tmp_path / "serial.out"
    for value in (f"file:{serial}", "unix:/tmp/x.sock,server", "/dev/ttyS0", "tcp::4555"):
        _refused(receiver, _prepare(receiver.token, config_text(
            "g1", ok_disk, tail=f"serial = {json.dumps(value)}\n")),
            f"serial={value!r} (a host device, file or socket)")
    for tail, why in [
        ('vnclisten = "0.0.0.0"\nvnc = 1\n', "vnclisten (a host address"),
        ("vncdisplay = 3\nvnc = 1\n", "vncdisplay (a host port"),
        ('p9 = [ "tag=x,path=/etc" ]\n', "p9 (a host directory"),
        ('vtpm = [ "backend=0" ]\n', "vtpm ("),
        ('channel = [ "name=x,connection=socket,path=/tmp/s" ]\n', "channel ("),
        ('usbdevice = [ "host:1234:5678" ]\n', "usbdevice='host:1234:5678'"),
        ('bios_path_override = "/etc/shadow"\n', "bios_path_override (a host file"),
        ('firmware = "/etc/shadow"\n', "firmware (a host file"),
        ('device_model_override = "/bin/sh"\n', "device_model_override (a program"),
        ('vif = [ "bridge=br-mgmt" ]\n', "vif bridge= (a host bridge"),
        ('vif = [ "ip=10.0.0.1,gatewaydev=eth0" ]\n', "vif gatewaydev= ("),
        ('made_up_key = "x"\n', "made_up_key (not known to be safe)"),
    ]:
        _refused(receiver, _prepare(receiver.token, config_text("g1", ok_disk, tail=tail)), why)
    assert not serial.exists() and not outside.exists()
    assert sorted(p.name for p in disks.iterdir()) == ["link.qcow2"]
    after = os.stat("/etc/passwd")
    assert (after.st_mtime_ns, after.st_size) == (passwd.st_mtime_ns, passwd.st_size)


def test_the_header_names_no_host_file_either(receiver: Receiver) -> None:
    text = config_text("g1", receiver.disks / "g1.qcow2")
    header = json.loads(_prepare(receiver.token, text))["header"]
    for key in ("disk_paths", "overlays"):
        moved = {**header, key: {"xvda": {"file": "/etc/passwd", "format": "raw"}}}
        _refused(receiver, _prepare(receiver.token, text, header=moved),
                 "disk xvda target '/etc/passwd' (resolves to /etc/passwd, outside")


def test_disk_sizes_are_bounded_by_free_space(receiver: Receiver) -> None:
    free = os.statvfs(receiver.disks).f_bavail * os.statvfs(receiver.disks).f_frsize
    text = config_text("g1", receiver.disks / "g1.qcow2")
    _refused(receiver, _prepare(receiver.token, text, with_storage=True,
                                disk_sizes={"xvda": (1 << 60)}),
             "the source's disk is 1152921504606846976 bytes", "bytes free", "nothing was made")
    assert free > 0 and list(receiver.disks.iterdir()) == []


def _qcow2_header(backing: str) -> bytes:
    """The 104 bytes of a qcow2 v3 header naming ``backing`` (raw), as a guest could write
    them into its raw disk; by hand, per docs/interop/qcow2.txt."""
    name = backing.encode()
    ext = struct.pack(">II", 0xE2792ACA, 3) + b"raw" + b"\0" * 5  # backing format: raw
    end = struct.pack(">II", 0, 0)
    hdr = struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649FB, 3, 0, 0, 16, 1 << 28, 0, 1,
                      0x30000, 0x10000, 1, 0, 0, 0, 0, 0, 4, 104)
    at = len(hdr) + len(ext) + len(end)
    hdr = hdr[:8] + struct.pack(">QI", at, len(name)) + hdr[20:]
    return hdr + ext + end + name


def test_a_guest_written_qcow2_header_opens_no_host_file(receiver: Receiver,
                                                         tmp_path: Path) -> None:
    """Item 5: a raw disk whose content is a qcow2 header naming a host file as backing.

    The peer calls it qcow2: the receiver reads it as qcow2 (never probes),
    sees the backing file outside --disk-dir and refuses, without opening it
    (a FIFO: an open would block, and a writer's O_NONBLOCK open would find a reader).
    """
    fifo = tmp_path / "host-secret"
    os.mkfifo(fifo)
    disk = receiver.disks / "guest.raw"
    disk.write_bytes(_qcow2_header(str(fifo)).ljust(1 << 20, b"\0"))
    text = config_text("g1", disk, fmt="qcow2")
    _refused(receiver, _prepare(receiver.token, text),
             f"disk xvda target '{disk}' (as qcow2 it makes QEMU open {fifo}, outside "
             f"--disk-dir {receiver.disks})")
    with pytest.raises(OSError):  # ENXIO: nobody has the FIFO open for reading
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


RISKY = """\
device_model_args_hvm = [ "-monitor", "unix:/tmp/evil,server=on,wait=off" ]
vif = [ "bridge=xenbr0,script=/tmp/evil-script" ]
vga_rom = "/etc/shadow"
"""


def test_risky_settings_are_refused_and_the_receiver_waits_on(receiver: Receiver) -> None:
    text = config_text("g1", receiver.disks / "g1.qcow2", tail=RISKY)
    error = _refused(receiver, _prepare(receiver.token, text, with_storage=True,
                                        disk_sizes={"xvda": 32 << 20}),
                     "device_model_args_hvm (QEMU arguments, passed as they are)",
                     "vif script= (an executable run here)",
                     "vga_rom (a host file read into the guest)", "--trust-peer-config")
    assert "vif bridge= (a host bridge the guest joins)" in error
    assert list(receiver.disks.iterdir()) == []


def _ask_check(text: str, overrides: tuple[str, ...] = (), disk_dir: Path | None = None,
               trust: bool = False, **more: object) -> list[str]:
    prep = json.loads(_prepare("t", text, **more))
    try:
        check_request(prep, peer="peer", overrides=overrides, disk_dir=disk_dir, trust=trust)
    except PeerRefusedError as err:
        return [r.split(" (")[0] for r in err.reasons]
    return []


def test_the_receivers_overrides_and_trust_may_set_what_the_wire_may_not(
        tmp_path: Path) -> None:
    disk = tmp_path / "g1.qcow2"
    text = config_text("g1", disk, tail=RISKY)
    assert _ask_check(text, disk_dir=tmp_path) == [
        "device_model_args_hvm", "vif script=", "vif bridge=", "vga_rom"]
    mine = ('device_model_args_hvm = [ "-no-hpet" ]', 'vga_rom = "/srv/roms/vga.bin"',
            'vif = [ "bridge=xenbr0,script=vif-bridge" ]')
    assert _ask_check(text, mine, disk_dir=tmp_path) == []
    # vif += keeps the peer's entries, and with them the peer's script.
    assert _ask_check(text, (*mine[:2], 'vif += [ "bridge=xenbr1" ]'),
                      disk_dir=tmp_path) == ["vif script=", "vif bridge="]
    assert _ask_check(text, trust=True) == []
    # Without --disk-dir a peer names no disk; the receiver's override may.
    plain = config_text("g1", disk)
    assert _ask_check(plain) == ["disk xvda target '" + str(disk) + "'"]
    assert _ask_check(plain, (f'disk = [ "format=raw,vdev=xvda,target={disk}" ]',)) == []
    # A moved disk is the peer's too, unless the receiver's override names the disk.
    header = json.loads(_prepare("t", plain))["header"]
    moved = {**header, "disk_paths": {"xvda": {"file": "/etc/passwd", "format": "raw"}}}
    assert _ask_check(plain, disk_dir=tmp_path, header=moved) == [
        "disk xvda target '/etc/passwd'"]
    assert _ask_check(plain, (f'disk = [ "format=raw,vdev=xvda,target={disk}" ]',),
                      disk_dir=tmp_path, header=moved) == []
    # The name rules hold even for a trusted peer.
    with pytest.raises(XenlabError, match="domain name"):
        _ask_check(plain.replace('name = "g1"', 'name = "a/b"'), trust=True)


# --- a real source under attack (QEMU) ---------------------------------------------------------


@pytest.mark.integration
def test_a_real_source_migrates_in_while_the_receiver_is_attacked(
        tmp_path: Path, guest_image: object) -> None:
    src, dst = Toolstack(tmp_path / "host-a"), Toolstack(tmp_path / "host-b")
    token = mig.new_token()
    got: list[DomainRecord | BaseException] = []
    port: list[int] = []
    ready = threading.Event()

    def listening(_host: str, bound: int) -> None:
        port.append(bound)
        ready.set()

    def serve() -> None:
        try:
            # Its own toolstack: SQLite objects stay in the thread that made them.
            got.append(sync(mig.serve_receive(
                Toolstack(tmp_path / "host-b"), "127.0.0.1:0", token=token,
                disk_dir=tmp_path, accept_timeout=120, timeout=120, on_listen=listening)))
        except BaseException as err:  # handed to the test
            got.append(err)
            ready.set()

    try:
        boot(src, tmp_path, "g1")
        sh(src, "g1", "echo A > /mnt/disk/marker && sync")
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        assert ready.wait(30) and port, got
        addr = ("127.0.0.1", port[0])
        flood = [socket.create_connection(addr) for _ in range(300)]
        idle = [socket.create_connection(addr) for _ in range(3)]  # among the newest 32
        bad = socket.create_connection(addr)
        bad.sendall(b'{"msg":"prepare","token":"\\ud800"}\n')
        t0 = time.monotonic()
        res = sync(mig.migrate(src, "g1", f"127.0.0.1:{port[0]}", token=token))
        took = time.monotonic() - t0
        server.join(60)
        (rec,) = got
        assert isinstance(rec, DomainRecord), rec
        assert rec.state == "running" and is_alive(rec) and src.store.list() == []
        assert res.ram_transferred > 0
        # The source's greeting came at once: not after the idle ones' 5 s each.
        assert took < 25, took
        assert sh(dst, "g1", "cat /mnt/disk/marker") == "A\n"
        # The peers still waiting were told, once the source was taken; the port is shut.
        for s in idle:
            s.settimeout(10)
            lines = s.makefile("rb").read().splitlines()
            assert json.loads(lines[0]) == HELLO
            said = json.loads(lines[1])
            assert said["msg"] == "error" and (
                "another source is migrating here" in said["error"]
                or "within 5s" in said["error"]), said
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(addr, timeout=5)
        for s in [*idle, *flood, bad]:
            s.close()
    finally:
        for t in (src, dst):
            clear(t)
