"""A test oracle over the real ``iucode_tool`` (Debian iucode-tool): list_updates() and more.

xenlab reads, selects and packs Intel microcode; the tests compare it with
the tool distributions use for the same job.  Everything here runs
``/usr/sbin/iucode_tool`` (or the one on ``$PATH``) as a subprocess and parses
its text, so the answers are iucode_tool's own:

* :func:`list_updates` runs ``-l`` (the selected updates: highest revision per
  signature and platform mask, one line per signature *including* the
  extended-table ones, all with the same ``bundle/index``) or ``-L`` (every
  update; the extended signatures follow their update as continuation lines).
* :func:`select` runs ``-s sig[,pf_mask] -l``: the updates that apply to one
  CPU (the mask is a mask, as in the tool's option: any common bit matches).
* :func:`write_earlyfw` (``--write-earlyfw``) and :func:`write_firmware_dir`
  (``-K``, names like ``06-9a-04``) produce the peer outputs xenlab's writers
  are compared with.

Nothing scans the running system (no ``-S``/``--scan-system``): answers depend
only on the files given.  :func:`version` raises :class:`IucodeUnavailable`
when the tool is missing; callers turn that into a skip with the reason.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FileType = Literal["b", "r", "a", "d"]

_CANDIDATES = ("/usr/sbin/iucode_tool", "/sbin/iucode_tool")

# "  001/002: sig 0x000906a4, pf_mask 0x80, 2025-10-12, rev 0x043a, size 224256"
# and, in -L output, "           sig 0x000906a4, pf_mask 0x80, 2025-10-12, rev 0x043a"
_ENTRY = re.compile(
    r"^\s*(?:(?P<bundle>\d+)/(?P<index>\d+):)?\s*sig (?P<sig>0x[0-9a-f]+), "
    r"pf_mask (?P<pf>0x[0-9a-f]+), (?P<date>\d{4}-\d{2}-\d{2}), "
    r"rev (?P<rev>0x[0-9a-f]+)(?:, size (?P<size>\d+))?\s*$"
)
_BUNDLE = re.compile(r"^microcode bundle (?P<bundle>\d+): (?P<path>.*)$")


class IucodeUnavailable(Exception):
    """iucode_tool is not installed here; ``reason`` says what was looked for."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class IucodeFailed(Exception):
    """iucode_tool ran and failed; the message holds its exit code and stderr."""


@dataclass(frozen=True, slots=True)
class IucodeEntry:
    """One line of iucode_tool's listing: one signature of one update.

    ``bundle`` counts input files from 1 in command-line order and ``index``
    counts updates inside a bundle from 1; ``path`` is the bundle's file.  An
    update with an extended signature table yields several entries with the
    same ``bundle``/``index``/``size``.  ``extended`` is set on ``-L``'s
    continuation lines (the extended table's entries); ``-l`` does not say.
    ``rev`` is the unsigned 32-bit revision as printed.
    """

    bundle: int
    index: int
    path: str
    sig: int
    pf_mask: int
    date: str
    rev: int
    size: int
    extended: bool = False


@functools.cache
def tool() -> str:
    """The path of iucode_tool; :class:`IucodeUnavailable` if there is none."""
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("iucode_tool")
    if found is None:
        raise IucodeUnavailable(
            f"iucode_tool not found in {', '.join(_CANDIDATES)} or $PATH "
            "(Debian package iucode-tool)"
        )
    return found


@functools.cache
def version() -> str:
    """iucode_tool's version (``"2.3.1"``), from one run of ``--version``."""
    out = subprocess.run(
        [tool(), "--version"], capture_output=True, text=True, check=False, timeout=60
    )
    first = (out.stdout or out.stderr).splitlines()[:1]
    if out.returncode != 0 or not first or not first[0].startswith("iucode_tool "):
        raise IucodeUnavailable(f"{tool()} --version failed: {out.stderr.strip()!r}")
    return first[0].split()[1]


def run(args: Sequence[str | os.PathLike[str]], *, timeout: float = 300) -> str:
    """Run iucode_tool with *args*; its stdout, or :class:`IucodeFailed`."""
    argv = [tool(), *(os.fspath(a) for a in args)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if out.returncode != 0:
        raise IucodeFailed(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def parse_listing(text: str) -> list[IucodeEntry]:
    """The entries of an ``-l``/``-L`` listing, in the order printed."""
    paths: dict[int, str] = {}
    entries: list[IucodeEntry] = []
    for line in text.splitlines():
        bundle_line = _BUNDLE.match(line)
        if bundle_line is not None:
            paths[int(bundle_line["bundle"])] = bundle_line["path"]
            continue
        m = _ENTRY.match(line)
        if m is None:
            continue
        if m["bundle"] is None:
            if not entries:
                raise ValueError(f"continuation line before any update: {line!r}")
            last = entries[-1]
            bundle, index, size, extended = last.bundle, last.index, last.size, True
        else:
            bundle, index = int(m["bundle"]), int(m["index"])
            size = int(m["size"]) if m["size"] is not None else 0
            extended = False
        entries.append(
            IucodeEntry(
                bundle=bundle,
                index=index,
                path=paths.get(bundle, ""),
                sig=int(m["sig"], 16),
                pf_mask=int(m["pf"], 16),
                date=m["date"],
                rev=int(m["rev"], 16),
                size=size,
                extended=extended,
            )
        )
    return entries


def _inputs(paths: Sequence[str | os.PathLike[str]], type: FileType) -> list[str]:
    # -t applies to the files after it.
    return [f"-t{type}", *(os.fspath(p) for p in paths)]


def list_updates(
    paths: Sequence[str | os.PathLike[str]],
    type: FileType = "b",
    *,
    all: bool = False,
) -> list[IucodeEntry]:
    """iucode_tool's listing of the updates in *paths* read as *type*.

    ``type``: ``b`` binary bundles, ``r`` recover mode (search unknown data
    such as an initrd for updates), ``a`` by file name suffix, ``d`` Intel
    ``.dat`` text.  With ``all=False`` this is ``-l``, the *selected* updates
    (for each signature and platform mask the highest revision wins; sorted by
    signature); with ``all=True`` it is ``-L``, every update in file order.
    """
    return parse_listing(run([*_inputs(paths, type), "-L" if all else "-l"]))


def select(
    paths: Sequence[str | os.PathLike[str]],
    sig: int,
    pf_mask: int | None = None,
    type: FileType = "b",
) -> list[IucodeEntry]:
    """The updates iucode_tool selects for signature *sig* (and platform *pf_mask*)."""
    spec = f"{sig:#x}" if pf_mask is None else f"{sig:#x},{pf_mask:#x}"
    return parse_listing(run(["-s", spec, *_inputs(paths, type), "-l"]))


def write_earlyfw(
    paths: Sequence[str | os.PathLike[str]],
    out: Path,
    *,
    type: FileType = "b",
    sig: int | None = None,
    pf_mask: int | None = None,
    mini: bool = False,
) -> Path:
    """An early initramfs cpio (``kernel/x86/microcode/GenuineIntel.bin``) at *out*.

    All updates of *paths* are written unless *sig* selects some; ``mini``
    asks for ``--mini-earlyfw`` (no alignment padding).  *out* is replaced.
    """
    args: list[str] = []
    if sig is not None:
        args += ["-s", f"{sig:#x}" if pf_mask is None else f"{sig:#x},{pf_mask:#x}"]
    if mini:
        args.append("--mini-earlyfw")
    run([*args, "--overwrite", f"--write-earlyfw={out}", *_inputs(paths, type)])
    return out


def write_firmware_dir(
    paths: Sequence[str | os.PathLike[str]], outdir: Path, *, type: FileType = "b"
) -> list[Path]:
    """The Linux firmware-loader files (``ff-mm-ss``) of *paths* in *outdir*; sorted."""
    outdir.mkdir(parents=True, exist_ok=True)
    run(["--overwrite", f"--write-firmware={outdir}", *_inputs(paths, type)])
    return sorted(p for p in outdir.iterdir() if p.is_file())
