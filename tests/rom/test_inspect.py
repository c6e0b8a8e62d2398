"""rom.inspect: files through mmap (64 MB in bounded time) and the --json shape."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.rom import builders as b
from xenlab.errors import FormatError
from xenlab.rom.inspect import inspect_file, rom_to_json

MB = 1 << 20


def test_json_contract(tmp_path: Path) -> None:
    p = tmp_path / "card.rom"
    p.write_bytes(b.rom(b.multi(), header=bytes(0x11)))
    data = rom_to_json(inspect_file(p))
    assert data["header_offset"] == 0x11
    problems = data["problems"]
    assert isinstance(problems, list) and problems[0].startswith("+0x0: ")
    images = data["images"]
    assert isinstance(images, list) and len(images) == 2
    for img in images:
        for key, kind in [("offset", int), ("length", int), ("code_type", int),
                          ("vendor_id", int), ("device_id", int), ("class_code", int),
                          ("last", bool), ("checksum_ok", bool), ("problems", list)]:
            assert isinstance(img[key], kind), key
    assert [(i["offset"], i["code_type"], i["last"]) for i in images] == [
        (0x11, 0, False), (0x11 + 1024, 3, True)]
    assert images[1]["efi"]["machine_type"] == 0x8664


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.rom"
    p.write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty.rom\+0x0: signature: the file is empty"):
        inspect_file(p)


def test_64mb_rom_at_the_end(tmp_path: Path) -> None:
    # A sparse 64 MB flash dump with the ROM behind 64 MB - 4 KiB of zeros at an
    # odd offset: found by the scan, walked, the file mapped rather than read.
    p = tmp_path / "flash.bin"
    image = b.x86_image(size=2048)
    at = 64 * MB - 4096 + 7
    with open(p, "wb") as f:
        f.truncate(at)
        f.seek(at)
        f.write(image)
        f.write(b"\xff" * (4096 - 7 - len(image)))
    assert p.stat().st_size == 64 * MB
    t = time.perf_counter()
    rom = inspect_file(p)
    elapsed = time.perf_counter() - t
    assert rom.header_offset == at and rom.images[0].checksum_ok
    assert rom.trailer_fill == 0xFF
    assert elapsed < 5, elapsed


def test_64mb_padding_and_random(tmp_path: Path) -> None:
    p = tmp_path / "padded.rom"
    with open(p, "wb") as f:
        f.write(b.multi())
        f.write(b"\xff" * (64 * MB - len(b.multi())))
    t = time.perf_counter()
    rom = inspect_file(p)
    assert rom.ok and rom.trailer_fill == 0xFF and rom.trailer_length == 64 * MB - 3072
    # Random bytes: a few thousand 55 aa candidates, none a ROM.
    q = tmp_path / "random.bin"
    q.write_bytes(os.urandom(64 * MB))
    with pytest.raises(FormatError, match="no option ROM"):
        inspect_file(q)
    assert time.perf_counter() - t < 10
