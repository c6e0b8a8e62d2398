"""Output that users pipe: no path or word is broken, tables keep their natural width.

Every command runs as a real process with stdout a pipe and ``COLUMNS`` set
small, as in a script under a narrow terminal; the inputs sit under a long
directory so a soft-wrapping console would cut their paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ucode import builders as b


def xenlab(*args: str, columns: str | None = "20") -> str:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = columns
    proc = subprocess.run([str(Path(sys.executable).with_name("xenlab")), *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def deep(tmp_path: Path) -> Path:
    d = tmp_path / ("a-long-directory-name-" * 4) / "lib" / "firmware"
    d.mkdir(parents=True)
    return d


@pytest.mark.parametrize("columns", ["20", None])
def test_ucode_paths_are_never_cut(deep: Path, columns: str | None) -> None:
    fw = deep / "intel.bin"
    fw.write_bytes(b.INTEL_OLD + b.INTEL_NEW)
    root = deep / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 154\n"
        "stepping\t: 4\nmicrocode\t: 0x400\n\n")
    for args in (("ucode", "scan", str(fw)), ("ucode", "load", str(fw), "--root", str(root))):
        out = xenlab(*args, columns=columns)
        # The file's full path is on one line wherever a part of it is printed.
        lines = [ln for ln in out.splitlines() if "a-long-directory" in ln]
        assert lines, out
        for ln in lines:
            assert str(deep) in ln, (args, out)


def test_tables_keep_their_width(deep: Path) -> None:
    fw = deep / "intel.bin"
    fw.write_bytes(b.INTEL_OLD + b.INTEL_NEW)
    narrow = xenlab("ucode", "scan", str(fw), columns="20")
    wide = xenlab("ucode", "scan", str(fw), columns="400")
    assert narrow == wide
    # A table row holds a whole update: its signature and its revision.
    rows = [ln for ln in narrow.splitlines() if "0x" in ln]
    assert rows and all(len(ln.split()) > 3 for ln in rows), narrow


def test_config_show_is_whole(tmp_path: Path) -> None:
    cfg = tmp_path / ("dir-" * 20) / "guest.cfg"
    cfg.parent.mkdir()
    target = tmp_path / ("images-" * 12) / "guest-disk.qcow2"
    cfg.write_text(f'name = "g"\ntype = "hvm"\nmemory = 128\ndisk = [ "format=qcow2,vdev=xvda,'
                   f'access=rw,target={target}" ]\n')
    out = xenlab("config", "show", str(cfg), columns="20")
    assert str(cfg) in out and str(target) in out, out
