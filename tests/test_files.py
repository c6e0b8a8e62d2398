"""xenlab.files: bounded reads of whatever a user names."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from xenlab.errors import XenlabError
from xenlab.files import InputTooLargeError, read_bounded, read_text_bounded


def test_small_file_whole(tmp_path: Path) -> None:
    p = tmp_path / "a"
    p.write_bytes(b"x" * 100)
    assert read_bounded(p, 100) == b"x" * 100


def test_one_byte_over_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "a"
    p.write_bytes(b"x" * 101)
    with pytest.raises(InputTooLargeError) as e:
        read_bounded(p, 100, what="config")
    assert e.value.path == str(p) and e.value.limit == 100
    assert str(e.value) == f"{p}: config larger than 100 bytes: not read"


def test_dev_zero_ends() -> None:
    with pytest.raises(InputTooLargeError, match="larger than 1 MiB"):
        read_bounded("/dev/zero", 1 << 20)


def test_fifo_with_endless_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    stop = threading.Event()

    def writer() -> None:
        with open(fifo, "wb") as f:
            try:
                while not stop.is_set():
                    f.write(b"y" * 65536)
            except BrokenPipeError:
                pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    with pytest.raises(InputTooLargeError):
        read_bounded(fifo, 1 << 20)
    stop.set()
    t.join(5)


def test_directory_and_missing(tmp_path: Path) -> None:
    with pytest.raises(XenlabError, match="is a directory"):
        read_bounded(tmp_path, 10)
    with pytest.raises(XenlabError, match="cannot read: No such file"):
        read_bounded(tmp_path / "nope", 10)


def test_text_keeps_undecodable_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a"
    p.write_bytes(b"name = \"\xff\"\n")
    assert read_text_bounded(p).encode("utf-8", "surrogateescape") == p.read_bytes()
