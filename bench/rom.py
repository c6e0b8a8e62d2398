"""Benchmark: ``xenlab rom inspect`` against a plain read of the same bytes.

Inputs (built in a temporary directory, by hand with ``struct``):
  * big: one 1 MB ROM of 16 images (x86 and EFI alternating, 64 KiB each),
    every x86 image checksummed.
  * small: 1,000 ROM files of 40 KiB (one x86 image each, like a SeaVGABIOS).

xenlab is timed in-process: ``rom.inspect.inspect_file`` opens, maps, walks
every image and sums every x86 image.  The peer is the cheapest thing that
touches the same bytes: ``Path.read_bytes()``.  Best of N after a warm-up.
X = read time / inspect time, so X is at most about 1 and tells how much
parsing costs on top of reading (X = 0.5: inspecting takes twice a read).
The headline is the smaller of the two ratios.
"""

from __future__ import annotations

import random
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from _timing import best  # noqa: E402  (bench/ is the script's directory)
from xenlab.rom.inspect import inspect_file  # noqa: E402

KIB = 1024


def image(size: int, *, efi: bool, last: bool, seed: int) -> bytes:
    img = bytearray(random.Random(seed).randbytes(size))
    units = size // 512
    pcir_at = 0x40
    if efi:
        img[0:0x1A] = (b"\x55\xaa" + struct.pack("<HIHHH", units, 0x0EF1, 11, 0x8664, 0)
                       + bytes(8) + struct.pack("<HH", 0x80, pcir_at))  # fmt: skip
    else:
        img[0:0x1C] = b"\x55\xaa" + bytes([units]) + b"\xe9\0\0" + bytes(0x12) + struct.pack(
            "<HH", pcir_at, 0)
    img[pcir_at : pcir_at + 0x1C] = b"PCIR" + struct.pack(
        "<HHHHB3sHHBBHHH", 0x1234, 0x1111, 0, 0x1C, 3, b"\0\0\3", units, 1, 3 if efi else 0,
        0x80 if last else 0, units, 0, 0)
    if not efi:
        img[6] = 0
        img[6] = (-sum(img)) & 0xFF
    return bytes(img)




def main() -> None:
    with tempfile.TemporaryDirectory(prefix="xenlab-bench-rom-") as tmp:
        root = Path(tmp)
        big = root / "big.rom"
        big.write_bytes(b"".join(image(64 * KIB, efi=i % 2 == 1, last=i == 15, seed=i)
                                 for i in range(16)))
        small = []
        for i in range(1000):
            p = root / f"small-{i:04d}.rom"
            p.write_bytes(image(40 * KIB, efi=False, last=True, seed=100 + i))
            small.append(p)
        assert len(inspect_file(big).images) == 16 and inspect_file(big).ok

        rows = [
            ("big (1 MB, 16 images)", lambda: big.read_bytes(), lambda: inspect_file(big), 20),
            ("small (1,000 x 40 KiB)", lambda: [p.read_bytes() for p in small],
             lambda: [inspect_file(p) for p in small], 5),
        ]
        ratios = []
        print(f"{'input':<26}{'read':>12}{'inspect':>12}{'ratio':>8}")
        for name, read, inspect, rounds in rows:
            t_read = best(read, rounds)
            t_inspect = best(inspect, rounds)
            ratios.append(t_read / t_inspect)
            print(f"{name:<26}{t_read * 1e3:>10.2f}ms{t_inspect * 1e3:>10.2f}ms"
                  f"{ratios[-1]:>8.2f}")
        print(f"rom_inspect ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
