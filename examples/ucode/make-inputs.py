"""Make inputs for the microcode demo of `./dev.sh run` in the directory given.

- intel.bin: Intel updates.  The real files of ../shared/data/microcode/intel
  when that folder exists, else three updates made with xenlab's own writer.
- amd.bin: an AMD container (real fam17h file, or one made with the writer).
- initrd.img: a zstd-compressed initramfs holding an /init script, made with
  xenlab's cpio writer: the "main" part a Debian initrd would have.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import zstandard

from xenlab.formats.amd_ucode import EquivEntry, build_container, build_patch
from xenlab.formats.cpio import CpioMember, write_newc
from xenlab.formats.intel_ucode import build_update

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "microcode"


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(7)
    intel_dir = SHARED / "intel"
    if intel_dir.is_dir():
        names = ("06-9a-04", "06-55-04", "06-97-05")
        intel = b"".join((intel_dir / n).read_bytes() for n in names)
        amd = (SHARED / "amd" / "microcode_amd_fam17h.bin").read_bytes()
    else:
        intel = b"".join(
            build_update(signature=sig, revision=rev, platform_mask=pf,
                         payload=rnd.randbytes(4000), date="2025-10-12", ext=ext)
            for sig, rev, pf, ext in [
                (0x906A3, 0x43A, 0x80, ((0x906A3, 0x80), (0x906A4, 0x80))),
                (0x906A4, 0xB, 0x40, ()),
                (0x50654, 0x2007006, 0xB7, ()),
            ]
        )
        amd = build_container(
            [EquivEntry(0x800F12, 0, 0, 0x8012)],
            [build_patch(patch_id=0x8001227, processor_rev_id=0x8012, body=rnd.randbytes(3136))],
        )
    (out / "intel.bin").write_bytes(intel)
    (out / "amd.bin").write_bytes(amd)
    main_cpio = write_newc([
        CpioMember("init", b"#!/bin/sh\necho hello from the initramfs\n", mode=0o100755),
        CpioMember("bin", mode=0o040755),
    ])
    (out / "initrd.img").write_bytes(zstandard.ZstdCompressor().compress(main_cpio))
    print(f"inputs in {out}: intel.bin ({len(intel)} bytes), amd.bin ({len(amd)} bytes), "
          "initrd.img (zstd)")


if __name__ == "__main__":
    main()
