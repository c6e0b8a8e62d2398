"""Hostile inputs to ``xenlab config`` and ``xenlab sim``: endless files, FIFOs, stdin, bad text.

Whatever a user names (``/dev/zero``, a FIFO that never ends, a directory,
NUL bytes, invalid UTF-8, standard input), the command ends quickly with one
clear line naming the file (exit 1; a path that is not a file is a usage error,
exit 2, as for every xenlab command), in bounded memory, without a traceback.
And ``config fmt -w`` / ``from-xm -o`` write through a symlink to its target.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clirun import run_cli

CONFIG_COMMANDS = [("config", "check"), ("config", "show"), ("config", "json"),
                   ("config", "json", "--raw"), ("config", "fmt"), ("config", "from-xm")]
SIM_COMMANDS = [("sim", "check"), ("sim", "run"), ("sim", "compare"), ("sim", "sweep")]
ALL = CONFIG_COMMANDS + SIM_COMMANDS

GOOD_CFG = 'name = "g"\nkernel = "/boot/vmlinuz"\nmemory = 256\n'


def measured(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str, int]:
    """``xenlab ARGS`` in-process: (exit code, stdout, stderr, peak Python allocation)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        code, out, err = run_cli(capsys, *args)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 10
    return code, out, err, peak


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def limit_of(command: tuple[str, ...]) -> str:
    return "16 MiB" if command[0] == "config" else "1 MiB"


@pytest.mark.parametrize("command", ALL, ids=" ".join)
def test_dev_zero_is_refused_at_the_limit(capsys: pytest.CaptureFixture[str],
                                          command: tuple[str, ...]) -> None:
    code, out, err, peak = measured(capsys, *command, "/dev/zero")
    assert code == 1 and out == ""
    assert one_line(err).startswith("/dev/zero: ") and \
        f"larger than {limit_of(command)}: not read" in err
    # The limit plus one byte, joined once: about twice the limit at the peak.
    assert peak < 2.5 * (16 << 20), f"{peak >> 20} MiB"


@pytest.fixture
def endless_fifo(tmp_path: Path) -> Iterator[Path]:
    fifo = tmp_path / "endless.cfg"
    os.mkfifo(fifo)
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            try:
                with open(fifo, "wb") as f:
                    while not stop.is_set():
                        f.write(b"# " * 32768)
            except BrokenPipeError:
                continue  # the reader stopped at its limit; a later reader may come

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    yield fifo
    stop.set()
    with open(fifo, "rb") as f:  # unblock a writer waiting for a reader
        f.read(1)
    t.join(5)


@pytest.mark.parametrize("command", [("config", "check"), ("config", "from-xm"),
                                     ("sim", "check")], ids=" ".join)
def test_an_endless_fifo_is_refused_at_the_limit(capsys: pytest.CaptureFixture[str],
                                                 endless_fifo: Path,
                                                 command: tuple[str, ...]) -> None:
    code, _, err, _ = measured(capsys, *command, str(endless_fifo))
    assert code == 1 and one_line(err) == (
        f"{endless_fifo}: {'config' if command[0] == 'config' else 'file'} larger than "
        f"{limit_of(command)}: not read")


def test_a_fifo_with_a_config_is_read(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    fifo = tmp_path / "g.cfg"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_text(GOOD_CFG), daemon=True)
    t.start()
    code, out, err = run_cli(capsys, "config", "check", str(fifo))
    t.join(5)
    assert (code, out, err) == (0, f"{fifo}: ok\n", "")


@pytest.mark.parametrize("command", ALL, ids=" ".join)
def test_a_directory_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      command: tuple[str, ...]) -> None:
    code, out, err = run_cli(capsys, *command, str(tmp_path))
    assert code == 2 and out == "" and "is a directory" in err and "Traceback" not in err


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_nul_bytes_in_a_config_are_placed(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          command: tuple[str, ...]) -> None:
    nul = tmp_path / "nul.cfg"
    nul.write_bytes(b'name = "g"\nmem\x00ory = 256\n')
    code, _, err = run_cli(capsys, *command, str(nul))
    assert code == 1 and f"{nul}:2:4: " in err and "Traceback" not in err
    assert "\\x00" in err or "NUL" in err


def test_invalid_utf8_in_a_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # libxlutil reads bytes: a string that is not UTF-8 is a valid xl value (kept as is);
    # an xm config is Python source, which must be UTF-8.
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b'name = "g\xff"\nkernel = "/k"\n')
    code, out, err = run_cli(capsys, "config", "check", str(bad))
    assert (code, out, err) == (0, f"{bad}: ok\n", "")
    code, _, err = run_cli(capsys, "config", "from-xm", str(bad))
    assert code == 1 and one_line(err) == f"{bad}:1:10: byte 0xff is not UTF-8 text"


def test_fmt_keeps_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    # Printed as bytes: a console's escaping (\udcff) would change the value.
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b"name='g\xff'\n")
    proc = subprocess.run([str(Path(sys.executable).with_name("xenlab")), "config", "fmt",
                           str(bad)], capture_output=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b'name = "g\xff"\n', b"")
    proc = subprocess.run([str(Path(sys.executable).with_name("xenlab")), "config", "fmt",
                           "-w", str(bad)], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0 and bad.read_bytes() == b'name = "g\xff"\n'


@pytest.mark.parametrize("command", SIM_COMMANDS, ids=" ".join)
def test_nul_bytes_and_invalid_utf8_in_a_scenario(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path,
                                                  command: tuple[str, ...]) -> None:
    nul = tmp_path / "nul.toml"
    nul.write_bytes(b"[sim]\nduration_ms = 1\x00\n")
    code, _, err = run_cli(capsys, *command, str(nul))
    assert code == 1 and one_line(err).startswith(f"{nul}: not valid TOML: ") and \
        "(at line 2, column 16)" in err
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[sim]\nscheduler = "cr\xffedit"\n')
    code, _, err = run_cli(capsys, *command, str(bad))
    assert code == 1 and one_line(err) == (
        f"{bad}: not UTF-8 text (byte 0xff at offset 21)")


# -- standard input ---------------------------------------------------------------------------


def use_stdin(monkeypatch: pytest.MonkeyPatch, stream: io.BufferedIOBase) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(stream))


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_stdin_is_read_and_bounded(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch,
                                   command: tuple[str, ...]) -> None:
    use_stdin(monkeypatch, io.BytesIO(GOOD_CFG.encode()))
    code, out, err = run_cli(capsys, *command, "-")
    assert code == 0, err
    if command[1] == "check":
        assert out == "<stdin>: ok\n"
    with open("/dev/zero", "rb") as zero:
        use_stdin(monkeypatch, zero)  # type: ignore[arg-type]
        code, out, err, _ = measured(capsys, *command, "-")
    assert code == 1 and one_line(err) == "<stdin>: config larger than 16 MiB: not read"


def test_errors_from_stdin_are_placed_at_stdin(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    use_stdin(monkeypatch, io.BytesIO(b"memory = (\n"))
    code, _, err = run_cli(capsys, "config", "check", "-")
    assert code == 1 and err.startswith("<stdin>:1:10: ")


def test_fmt_cannot_rewrite_stdin(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    use_stdin(monkeypatch, io.BytesIO(GOOD_CFG.encode()))
    code, _, err = run_cli(capsys, "config", "fmt", "-w", "-")
    assert code == 2 and "cannot rewrite standard input" in err


# -- writing through symlinks -----------------------------------------------------------------


def test_fmt_w_writes_through_a_symlink(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "guest.cfg"
    target.write_text("name='g' ; memory=0x100\n")
    target.chmod(0o640)
    links = tmp_path / "links"
    links.mkdir()
    hop = links / "hop.cfg"
    hop.symlink_to(Path("..") / "real" / "guest.cfg")  # relative, resolved from its dir
    link = links / "guest.cfg"
    link.symlink_to("hop.cfg")  # a chain of two links
    code, _, err = run_cli(capsys, "config", "fmt", "-w", str(link))
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == "hop.cfg"
    assert hop.is_symlink() and os.readlink(hop) == os.path.join("..", "real", "guest.cfg")
    assert target.read_text() == 'name = "g"\nmemory = 0x100\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in real_dir.iterdir()) == ["guest.cfg"]  # no temp file left
    assert sorted(p.name for p in links.iterdir()) == ["guest.cfg", "hop.cfg"]


def test_from_xm_output_writes_through_a_symlink(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    xm = tmp_path / "old.cfg"
    xm.write_text("memory = 64 * 4\nname = 'vm'\n")
    target = tmp_path / "new.cfg"
    target.write_text("old\n")
    link = tmp_path / "link.cfg"
    link.symlink_to(target.name)
    code, _, err = run_cli(capsys, "config", "from-xm", str(xm), "-o", str(link))
    assert code == 0, err
    assert link.is_symlink() and "memory = 256" in target.read_text()


def test_an_output_that_cannot_be_written_is_one_line(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    xm = tmp_path / "old.cfg"
    xm.write_text("name = 'g'\nmemory = 256\non_crash = 'destroy'\n")
    out = tmp_path / "no-such-dir" / "new.cfg"
    code, _, err = run_cli(capsys, "config", "from-xm", str(xm), "-o", str(out))
    assert code == 1 and one_line(err) == (
        f"{out}: cannot write: No such file or directory")
