"""Attach a terminal to a domain's serial console: :func:`attach`.

The console is a connected stream the backend opens (``Backend.open_console``;
QEMU: its serial port's unix socket).  Like ``xl console``,
``Ctrl-]`` detaches; the terminal is put in raw mode while attached and is
restored on every way out.  Without a terminal (a pipe), input is copied
until it ends and output until ``until`` appears or ``timeout`` passes.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import time
import tty

ESCAPE = b"\x1d"  # Ctrl-]


def attach(
    sock: socket.socket,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    until: bytes | None = None,
    timeout: float | None = None,
) -> bytes:
    """Bridge the console stream ``sock`` with a terminal or pipes; ``sock`` is closed after.

    Returns the console output seen (the last 64 KiB), which callers and
    tests can search.  Stops on Ctrl-], on ``until`` in the output, after
    ``timeout`` seconds, or when the backend closes the stream.
    """
    fd_in = sys.stdin.fileno() if stdin is None else stdin
    fd_out = sys.stdout.fileno() if stdout is None else stdout
    seen = bytearray()
    is_tty = os.isatty(fd_in)
    saved = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        saved = termios.tcgetattr(fd_in) if is_tty else None
        if is_tty:
            tty.setraw(fd_in)
        inputs = [sock, fd_in]
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait == 0.0:
                break
            ready, _, _ = select.select(inputs, [], [], wait)
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                os.write(fd_out, data)
                seen += data
                del seen[:-65536]
                if until is not None and until in seen:
                    break
            if fd_in in ready:
                data = os.read(fd_in, 4096)
                if not data:
                    inputs.remove(fd_in)  # a pipe ended; keep reading the console
                    continue
                if is_tty and ESCAPE in data:
                    data = data.split(ESCAPE, 1)[0]
                    if data:
                        sock.sendall(data)
                    break
                sock.sendall(data)
    finally:
        try:
            if saved is not None:
                termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        finally:
            sock.close()
    return bytes(seen)
