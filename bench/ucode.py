"""Benchmark: microcode scan throughput, xenlab vs iucode_tool, on the same files.

Inputs (built once, cached under ~/.cache/xenlab/bench/ucode):
  * bundle: a 40 MB Intel bundle, the real Intel files of ../shared/data
    concatenated over and over (or, without ../shared, updates built with the
    project's writer).  Peer: ``iucode_tool -tb -L`` (lists every update).
  * initrd: a 200 MB initrd, an early cpio with those Intel updates followed by
    a zstd-compressed main archive (busybox, an init script and module-like
    files, compressible about 2:1).  Peer: ``iucode_tool -tr -L``, its
    recover loader, which searches the whole file for Intel updates.

xenlab is timed in-process (``ucode.scan.scan_file``: mmap, walk, checksums);
iucode_tool as a process (its start-up is a millisecond).  One more row times
the ``xenlab`` command as a process, where Python's start-up and imports
(about 0.3 s) dominate on inputs this small.  For the initrd two
xenlab figures are printed: the full scan, which also decompresses and walks
the main archive (work iucode_tool does not do), and ``--early-only``, the
loaders' view.  The headline (last line) is the initrd full scan against the
peer, the bundle ratio is printed above it.  X > 1: xenlab is faster.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from _timing import best  # noqa: E402  (bench/ is the script's directory)
from xenlab.formats.cpio import CpioMember, write_newc  # noqa: E402
from xenlab.formats.intel_ucode import build_update  # noqa: E402
from xenlab.ucode.early import build_early  # noqa: E402
from xenlab.ucode.scan import scan_buffer, scan_file  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xenlab/bench/ucode"
MB = 1 << 20


def _intel_sources() -> list[bytes]:
    shared = REPO.parent / "shared" / "data" / "microcode" / "intel"
    if shared.is_dir():
        return [p.read_bytes() for p in sorted(shared.rglob("*"))
                if p.is_file() and "." not in p.name]
    rnd = random.Random(1)
    return [build_update(signature=0x906A0 + i, revision=i + 1, platform_mask=1 << (i % 8),
                         payload=rnd.randbytes(rnd.choice([2000, 10_192, 100_304])))
            for i in range(40)]


def make_bundle(size: int) -> Path:
    path = CACHE / f"bundle-{size // MB}M.bin"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    srcs = _intel_sources()
    out = bytearray()
    while len(out) < size:
        for s in srcs:
            out += s
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(out)
    tmp.rename(path)
    return path


def make_initrd(size: int) -> Path:
    path = CACHE / f"initrd-{size // MB}M.img"
    if path.exists():
        return path
    import zstandard

    CACHE.mkdir(parents=True, exist_ok=True)
    ups = [u for s in _intel_sources() for u in scan_buffer(s, "src").updates]
    early = build_early(ups).data
    rnd = random.Random(2)
    members = [CpioMember(d, mode=0o040755) for d in ("bin", "lib", "lib/modules")]
    busybox = Path("/bin/busybox")
    if busybox.exists():
        members.append(CpioMember("bin/busybox", busybox.read_bytes(), mode=0o100755))
    members.append(CpioMember("init", b"#!/bin/sh\nexec /bin/sh\n", mode=0o100755))
    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
    packed = bytearray()
    i = 0
    # Module-like files: half random, half repeated text, so ~2:1 compression.
    while len(early) + len(packed) < size:
        batch = []
        for _ in range(64):
            n = rnd.randrange(16 << 10, 1 << 20) & ~3
            body = rnd.randbytes(n // 2) + (b"module_init\x00" * (n // 24 + 1))[: n - n // 2]
            batch.append(CpioMember(f"lib/modules/m{i:05d}.ko", body))
            i += 1
        members.extend(batch)
        packed = bytearray(cctx.compress(write_newc(members)))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(early + packed)
    tmp.rename(path)
    return path




def peer(args: list[str]) -> Callable[[], object]:
    tool = shutil.which("iucode_tool") or "/usr/sbin/iucode_tool"

    def run() -> None:
        subprocess.run([tool, *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    return run


def cli(path: Path) -> Callable[[], object]:
    """``xenlab ucode scan --json`` as a process: interpreter start-up and imports included."""
    exe = Path(sys.executable).parent / "xenlab"

    def run() -> None:
        subprocess.run([str(exe), "ucode", "scan", "--json", str(path)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bundle-mb", type=int, default=40)
    ap.add_argument("--initrd-mb", type=int, default=200)
    args = ap.parse_args()

    bundle = make_bundle(args.bundle_mb * MB)
    initrd = make_initrd(args.initrd_mb * MB)
    n_bundle = len(scan_file(bundle).updates)
    full = scan_file(initrd)
    n_initrd = len(full.updates)
    print(f"bundle: {bundle.stat().st_size / MB:.1f} MB, {n_bundle} updates; "
          f"initrd: {initrd.stat().st_size / MB:.1f} MB, {n_initrd} updates, "
          f"{sum(p.members for p in full.parts)} members; best of {args.rounds}")

    rows = [
        ("bundle", "xenlab scan", best(lambda: scan_file(bundle), args.rounds), n_bundle,
         bundle),
        ("bundle", "iucode_tool -tb -L", best(peer(["-tb", "-L", str(bundle)]), args.rounds),
         n_bundle, bundle),
        ("initrd", "xenlab scan (full)", best(lambda: scan_file(initrd), args.rounds), n_initrd,
         initrd),
        ("initrd", "xenlab scan --early-only",
         best(lambda: scan_file(initrd, early_only=True), args.rounds), n_initrd, initrd),
        ("initrd", "iucode_tool -tr -L", best(peer(["-tr", "-L", str(initrd)]), args.rounds),
         n_initrd, initrd),
        ("initrd", "xenlab CLI process (--json)", best(cli(initrd), args.rounds), n_initrd,
         initrd),
    ]
    print(f"{'input':<7} {'tool':<26} {'seconds':>8} {'MB/s':>8} {'updates/s':>10}")
    for inp, tool, secs, n, path in rows:
        mb = path.stat().st_size / MB
        print(f"{inp:<7} {tool:<26} {secs:>8.3f} {mb / secs:>8.0f} {n / secs:>10.0f}")
    t = {(r[0], r[1]): r[2] for r in rows}
    print(f"bundle: xenlab/iucode_tool speed ratio "
          f"{t[('bundle', 'iucode_tool -tb -L')] / t[('bundle', 'xenlab scan')]:.2f}")
    print(f"initrd early-only: ratio "
          f"{t[('initrd', 'iucode_tool -tr -L')] / t[('initrd', 'xenlab scan --early-only')]:.2f}")
    bundle_ratio = t[("bundle", "iucode_tool -tb -L")] / t[("bundle", "xenlab scan")]
    initrd_ratio = t[("initrd", "iucode_tool -tr -L")] / t[("initrd", "xenlab scan (full)")]
    print(f"initrd full scan: ratio {initrd_ratio:.2f}")
    print(f"ucode_scan ratio={min(bundle_ratio, initrd_ratio):.2f}")


if __name__ == "__main__":
    main()
