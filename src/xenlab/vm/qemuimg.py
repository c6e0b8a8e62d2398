"""qemu-img, run from one place and always told the format: :func:`info`, :func:`create`, ...

Every call names the image's format (``-f``) from the config or the record:
qemu-img never probes a guest's disk.  A raw disk is the guest's own bytes,
so a guest can write a qcow2 header into it; probed, that header would
make qemu-img open a host file named as its backing file, or write to a
host file named as its external data file.  Repairs run only on formats
that have metadata to repair (qcow2, qed).  Reads use ``-U`` (force share):
the image may be open in a running QEMU.

Formats are given as xl names (``DiskFormat`` values: ``vhd``...) or as
QEMU driver names (``vpc``...); :func:`driver` maps one to the other.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from xenlab.config.specs.disk import DiskFormat
from xenlab.errors import BackendError, XenlabError

__all__ = [
    "FORMAT_DRIVERS",
    "CheckResult",
    "QemuImgError",
    "backing_chain",
    "backing_of",
    "check",
    "commit",
    "convert",
    "create",
    "driver",
    "info",
    "snapshot",
    "snapshot_tags",
    "virtual_size",
]

# xl's disk formats and the QEMU block driver for each.
FORMAT_DRIVERS: Final[dict[DiskFormat, str]] = {
    DiskFormat.RAW: "raw",
    DiskFormat.QCOW2: "qcow2",
    DiskFormat.QCOW: "qcow",
    DiskFormat.VHD: "vpc",
    DiskFormat.QED: "qed",
}
_DRIVERS: Final = frozenset(FORMAT_DRIVERS.values())
# Formats whose metadata `qemu-img check -r` can repair; others have none.
_REPAIRABLE: Final = frozenset({"qcow2", "qed"})
# Metadata operations are quick; copies and commits get the caller's bound.
TIMEOUT: Final = 120.0


class QemuImgError(BackendError):
    """qemu-img failed or refused; ``path`` is the image, ``detail`` its own message."""

    def __init__(self, command: str, path: str, detail: str) -> None:
        self.command = command
        self.path = path
        self.detail = detail
        super().__init__(f"qemu-img {command} {path}: {detail}")


def driver(fmt: DiskFormat | str) -> str:
    """The QEMU driver name for an xl format (``vhd`` -> ``vpc``) or a driver name.

    :raise XenlabError: a format qemu-img is not to be told (``empty``, unknown).
    """
    if isinstance(fmt, DiskFormat):
        found = FORMAT_DRIVERS.get(fmt)
    elif fmt in _DRIVERS:
        found = fmt
    else:
        try:
            found = FORMAT_DRIVERS.get(DiskFormat(fmt))
        except ValueError:
            found = None
    if found is None:
        name = fmt.value if isinstance(fmt, DiskFormat) else fmt
        raise XenlabError(f"disk format {name!r} has no image driver here")
    return found


def _run(command: str, path: str | Path, args: Sequence[str], *,
         timeout: float = TIMEOUT, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img COMMAND ARGS``; the finished process, or QemuImgError with its words."""
    try:
        proc = subprocess.run(["qemu-img", command, *args], capture_output=True, text=True,
                              errors="replace", check=False, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise QemuImgError(command, str(path), f"not done within {timeout:g}s") from err
    except OSError as err:
        raise QemuImgError(command, str(path), err.strerror or str(err)) from err
    if proc.returncode not in ok:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise QemuImgError(command, str(path), msg.removeprefix("qemu-img: "))
    return proc


def create(path: str | Path, fmt: DiskFormat | str, size: int | str | None = None, *,
           backing: str | Path | None = None, backing_fmt: DiskFormat | str | None = None
           ) -> None:
    """Make image ``path``: blank of ``size`` (bytes or qemu-img's ``64M``), or over ``backing``.

    A backing file is always recorded with its format (``-F``), so nothing
    that opens the new image probes the one below.
    """
    args = ["-q", "-f", driver(fmt)]
    if backing is not None:
        if backing_fmt is None:
            raise XenlabError(f"{path}: a backing file needs its format")
        args += ["-b", str(backing), "-F", driver(backing_fmt)]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    _run("create", path, args)


def info(path: str | Path, fmt: DiskFormat | str) -> dict[str, Any]:
    """``qemu-img info`` of image ``path`` read as ``fmt`` (its backing file is not opened)."""
    out = _run("info", path, ["-U", "-f", driver(fmt), "--output=json", str(path)]).stdout
    try:
        data = json.loads(out)
    except ValueError as err:
        raise QemuImgError("info", str(path), f"unreadable answer: {err}") from err
    if not isinstance(data, dict):
        raise QemuImgError("info", str(path), "unreadable answer: not an object")
    return data


def virtual_size(path: str | Path, fmt: DiskFormat | str) -> int:
    """The size the guest sees of image ``path``, in bytes."""
    return int(info(path, fmt).get("virtual-size", 0))


def backing_of(path: str | Path, fmt: DiskFormat | str) -> tuple[str, str | None] | None:
    """Image ``path``'s backing file (absolute, real) and its recorded format, or None."""
    data = info(path, fmt)
    b = data.get("full-backing-filename") or data.get("backing-filename")
    if not b:
        return None
    real = os.path.realpath(os.path.join(os.path.dirname(str(path)), str(b)))
    bfmt = data.get("backing-filename-format")
    return real, (str(bfmt) if bfmt else None)


def backing_chain(path: str | Path, fmt: DiskFormat | str, *, limit: int = 256) -> list[str]:
    """``path`` and every image below it, as real paths; [] when ``path`` is missing.

    Walked one image at a time, each read as the format its parent recorded
    (an image without a recorded backing format ends the walk: it would be
    probed, and is not read here).
    """
    if not Path(path).exists():
        return []
    out = [os.path.realpath(str(path))]
    cur: tuple[str, str | None] | None = backing_of(path, fmt)
    while cur is not None:
        file, bfmt = cur
        if file in out:
            raise QemuImgError("info", str(path), f"backing chain loops at {file}")
        if len(out) >= limit:
            raise QemuImgError("info", str(path), f"backing chain longer than {limit}")
        out.append(file)
        if bfmt is None or not Path(file).exists():
            break
        cur = backing_of(file, bfmt)
    return out


def snapshot_tags(path: str | Path) -> set[str]:
    """The internal snapshot names in qcow2 image ``path``."""
    return {str(s.get("name")) for s in info(path, "qcow2").get("snapshots", ())
            if isinstance(s, dict)}


def snapshot(op: str, tag: str, path: str | Path) -> None:
    """``qemu-img snapshot`` on qcow2 image ``path``: ``op`` is create, apply or delete.

    ``qemu-img snapshot`` has no ``-f``: the format is given as image
    options (``driver=qcow2``), so it is never probed here either.
    """
    flag = {"create": "-c", "apply": "-a", "delete": "-d"}[op]
    opts = f"driver=qcow2,file.driver=file,file.filename={str(path).replace(',', ',,')}"
    _run("snapshot", path, ["--image-opts", flag, tag, opts])


def commit(path: str | Path, fmt: DiskFormat | str, *, timeout: float = TIMEOUT) -> None:
    """Merge image ``path`` into its backing file (``qemu-img commit``)."""
    _run("commit", path, ["-q", "-f", driver(fmt), str(path)], timeout=timeout)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What ``qemu-img check`` said: ``ok`` when the image is consistent (now)."""

    path: str
    checked: bool  # False for formats without metadata to check (raw, vpc)
    ok: bool
    repaired: bool
    message: str
    corrupt: bool = False  # errors, not only leaked clusters (no harm to data)


def check(path: str | Path, fmt: DiskFormat | str, *, repair: bool = False,
          timeout: float = 300.0) -> CheckResult:
    """``qemu-img check`` image ``path`` of format ``fmt``; with ``repair``, fix leaked clusters.

    Formats without metadata (raw) are not checked, never "repaired".  A check
    without repair may run while QEMU uses the image (it only reads); a
    repair needs the image unused.
    """
    drv = driver(fmt)
    if drv not in _REPAIRABLE:
        return CheckResult(str(path), False, True, False, f"{drv}: nothing to check")
    # A plain check only reads (-U: QEMU may hold the image); a repair writes,
    # so it must get the image's lock.
    args = ["-f", drv, *(["-r", "leaks"] if repair else ["-U"])]
    # 0 consistent, 2 corrupted, 3 leaks (left or repaired), 63 cannot check
    proc = _run("check", path, [*args, str(path)], timeout=timeout, ok=(0, 2, 3, 63))
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 63:
        return CheckResult(str(path), False, True, False, text)
    repaired = repair and "repaired" in text.lower()
    ok = proc.returncode == 0 or (proc.returncode == 3 and repaired)
    return CheckResult(str(path), True, ok, repaired, text, corrupt=proc.returncode == 2)


# qemu-img convert -p rewrites one line: "    (12.34/100%)\r"
_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def convert(source: str | Path, source_fmt: DiskFormat | str, out: str | Path,
            out_fmt: DiskFormat | str, *, timeout: float,
            progress: Callable[[float], None] | None = None) -> None:
    """``qemu-img convert -p`` ``source`` to ``out``, calling ``progress(percent)`` as it goes."""
    deadline = time.monotonic() + timeout
    argv = ["qemu-img", "convert", "-p", "-f", driver(source_fmt), "-O", driver(out_fmt),
            str(source), str(out)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as err:
        raise QemuImgError("convert", str(source), err.strerror or str(err)) from err
    assert proc.stdout is not None and proc.stderr is not None
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        buf = b""
        while True:
            if time.monotonic() > deadline:
                raise QemuImgError("convert", str(source), f"not done within {timeout:g}s")
            try:
                chunk: bytes | None = os.read(proc.stdout.fileno(), 4096)
            except BlockingIOError:
                chunk = None
            if chunk:
                buf = (buf + chunk)[-256:]
                found = _PERCENT.findall(buf)
                if found and progress is not None:
                    progress(float(found[-1]))
                continue
            if chunk == b"" or proc.poll() is not None:
                break
            time.sleep(0.05)
        try:
            rc = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as err:
            raise QemuImgError("convert", str(source),
                               f"not done within {timeout:g}s") from err
        if rc != 0:
            err_text = proc.stderr.read().decode(errors="replace").strip()
            raise QemuImgError("convert", str(source),
                               err_text.removeprefix("qemu-img: ") or f"exit {rc}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
