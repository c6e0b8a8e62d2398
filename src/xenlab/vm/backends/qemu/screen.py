"""The guest's display from QEMU: the VGA text buffer (``pmemsave``) and a PNG
``screendump``, taken with the guest stopped.

QEMU writes both into the domain's private run directory (never where a caller
names), and they are read back bounded and removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from xenlab.files import read_bounded
from xenlab.vm.backend import ScreenCapture
from xenlab.vm.backends.qemu.qmp import Qmp

__all__ = ["TEXT_BUFFER", "TEXT_SIZE", "capture_screen"]

# The PC's colour text-mode buffer: 80x25 cells of (character, attribute).
TEXT_BUFFER: Final = 0xB8000
TEXT_SIZE: Final = 80 * 25 * 2
# A PNG of the largest text or graphics mode QEMU's displays show is a few MB.
_SCREENDUMP_LIMIT: Final = 64 << 20


async def capture_screen(qmp_socket: Path, rundir: Path, *, resume: bool) -> ScreenCapture:
    """Stop the guest, take its text buffer and a screendump, run it again if ``resume``."""
    text_file, png_file = rundir / "screen.text", rundir / "screen.png"
    try:
        async with Qmp.open(qmp_socket) as qmp:
            await qmp.execute("stop")
            await qmp.execute("pmemsave", {"val": TEXT_BUFFER, "size": TEXT_SIZE,
                                           "filename": str(text_file)})
            await qmp.execute("screendump", {"filename": str(png_file), "format": "png"})
            if resume:
                await qmp.execute("cont")
        return ScreenCapture(read_bounded(text_file, TEXT_SIZE, what="VGA text buffer"),
                             read_bounded(png_file, _SCREENDUMP_LIMIT, what="screendump"))
    finally:
        text_file.unlink(missing_ok=True)
        png_file.unlink(missing_ok=True)
