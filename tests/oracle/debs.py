"""Debian packages fetched and unpacked for the oracles, never installed: :func:`unpack_debs`.

``apt-get download`` into a cache, then ``dpkg -x`` into ``cache/root``.
Idempotent and safe from several processes at once: a file lock guards the
work and a stamp file marks it done, so the first test session pays and the
rest reuse it.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

_STAMP = ".complete"


class DebsUnavailable(Exception):
    """apt or dpkg cannot provide the packages here (not Debian, no mirror)."""


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DebsUnavailable(f"{argv[0]} failed: {err}") from err


def unpack_debs(
    packages: Sequence[str],
    cache: Path,
    *,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Download and unpack ``packages`` once under ``cache``; return the unpacked root.

    ``finish(root)`` runs once, inside the lock, after unpacking (to check or
    derive files); it may raise to refuse the result, and then nothing is
    stamped.  :class:`DebsUnavailable` says why the packages cannot be had.
    """
    root = cache / "root"
    if (cache / _STAMP).exists():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DebsUnavailable("apt-get/dpkg not found (not a Debian machine)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (cache / _STAMP).exists():
            return root
        debs = cache / "debs"
        if debs.exists():
            shutil.rmtree(debs)
        debs.mkdir()
        # One apt-get at a time across caches: two test workers fetching different
        # packages on a fresh machine would both run `apt-get update`, and the second
        # would fail on apt's own lock.
        with open(cache.parent / ".apt.lock", "w") as apt_lock:
            fcntl.flock(apt_lock, fcntl.LOCK_EX)
            proc = _run(["apt-get", "download", *packages], debs)
            if proc.returncode != 0:
                # A fresh machine has no package lists yet ("Unable to locate
                # package"), an old one may point at superseded versions (404).
                _run(["apt-get", "update"], debs)
                proc = _run(["apt-get", "download", *packages], debs)
        if proc.returncode != 0:
            raise DebsUnavailable(
                f"apt-get download {' '.join(packages)} failed (rc {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
        if root.exists():
            shutil.rmtree(root)
        root.mkdir()
        for deb in sorted(debs.glob("*.deb")):
            proc = _run(["dpkg", "-x", str(deb), str(root)], cache)
            if proc.returncode != 0:
                raise DebsUnavailable(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")
        if finish is not None:
            finish(root)
        (cache / _STAMP).write_text("ok\n")
    return root
