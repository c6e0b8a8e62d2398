"""The control channel between the two hosts of a migration: :class:`Channel`, and the
receiver's one-time token (:func:`new_token`, :func:`read_token`).

One TCP connection; each message is one line of JSON, an object with a
``"msg"`` key (the protocol is in docs/migration.md).  What a peer sends is
read with a bound before anything believes it: a line longer than
:data:`LINE_MAX` is refused before it is parsed, and so is a line that is
not UTF-8, not JSON (too deeply nested included), not an object with a
string ``"msg"``, or that holds a string that is not text (a lone UTF-16
surrogate from a ``\\ud800`` escape, which no file name or config can hold).
Messages are sent as ASCII JSON.  Every failure is a
:class:`~xenlab.errors.BackendError` naming the peer: :class:`Lost` when the
connection ends, :class:`Refused` when the peer sent an error message.

The socket is non-blocking and read with the running loop's ``sock_recv``,
so a channel outlives the event loops of the steps between its messages
(each toolstack step runs its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from xenlab.errors import BackendError, UsageError
from xenlab.files import read_bounded

__all__ = [
    "LINE_MAX",
    "PROTOCOL",
    "Channel",
    "ChannelError",
    "Lost",
    "Refused",
    "expect",
    "new_token",
    "parse_address",
    "read_token",
    "uri_host",
]

#: The control protocol's version (the receiver's hello says it).  2: the
#: sender's "prepare" carries the receiver's token.
PROTOCOL: Final = 2
#: The longest control message: a "prepare" carries a config of a few KiB.
LINE_MAX: Final = 1 << 20
_CHUNK: Final = 1 << 16
# A token file holds one line.
_TOKEN_FILE_MAX: Final = 4096
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class ChannelError(BackendError):
    """The peer sent something that is not a control message; ``peer`` says who."""

    def __init__(self, peer: str, message: str) -> None:
        self.peer = peer
        super().__init__(f"{peer}: {message}")


class Lost(BackendError):
    """The peer closed the control connection (or it broke)."""


class Refused(BackendError):
    """The peer answered with an error message."""


def _not_text(obj: object) -> str | None:
    """The path of the first string in ``obj`` (JSON data) holding a lone surrogate, or None.

    Iterative: json.loads has already bounded the depth, this must not recurse.
    """
    stack: list[tuple[str, object]] = [("", obj)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where or "the message"
        elif isinstance(item, dict):
            for k, v in item.items():
                if _SURROGATE.search(k):
                    return f"{where}.{k!r}" if where else repr(k)
                stack.append((f"{where}.{k}" if where else k, v))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


class Channel:
    """Newline-delimited JSON messages over one TCP connection to ``peer``."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._buf = bytearray()
        self._scanned = 0
        self._eof = False

    async def send(self, msg: Mapping[str, object]) -> None:
        """Send ``msg``; :class:`Lost` when the connection is gone."""
        data = json.dumps(msg, ensure_ascii=True).encode("ascii") + b"\n"
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError as err:
            raise Lost(f"control connection to {self.peer}: cannot send "
                       f"{msg.get('msg')!r}: {err.strerror or err}") from err

    async def quiet_send(self, msg: Mapping[str, object]) -> None:
        """Send, best effort: for an error report whose peer may be gone already."""
        with contextlib.suppress(BackendError, TimeoutError):
            await asyncio.wait_for(self.send(msg), 5)

    def refuse(self, why: str, *, close: bool = True) -> None:
        """Tell the peer ``why`` in an error message if its socket takes it now, and close
        (or, without ``close``, only shut the connection down: the descriptor stays for
        whoever still has it registered in an event loop to close).

        Never waits: a peer that does not read is not worth a blocked receiver.
        """
        data = json.dumps({"msg": "error", "error": why}, ensure_ascii=True).encode() + b"\n"
        with contextlib.suppress(OSError):
            self.sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        if close:
            self.close()
        else:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(OSError):
            self.sock.close()

    async def recv(self, timeout: float, what: str) -> dict[str, Any]:
        """The next message, within ``timeout`` seconds in all; ``what`` says what is
        awaited, for the errors.

        :raise Refused: the peer sent an error message.
        :raise Lost: the connection closed or broke.
        :raise ChannelError: no message within ``timeout`` (a byte at a time
            counts for nothing), or not a message (see the module's rules).
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while (end := self._buf.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > LINE_MAX:
                raise ChannelError(self.peer, f"a control message longer than {LINE_MAX} "
                                   f"bytes (while waiting for {what})")
            if self._eof:
                raise Lost(f"{self.peer} closed the control connection "
                           f"(while waiting for {what})")
            try:
                async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
                    chunk = await loop.sock_recv(self.sock, _CHUNK)
            except TimeoutError as err:
                raise ChannelError(self.peer, f"nothing within {timeout:g}s while waiting "
                                   f"for {what}") from err
            except OSError as err:
                raise Lost(f"control connection to {self.peer} broke (while waiting for "
                           f"{what}): {err.strerror or err}") from err
            if not chunk:
                self._eof = True
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        if len(line) > LINE_MAX:
            raise ChannelError(self.peer, f"a control message longer than {LINE_MAX} bytes "
                               f"(while waiting for {what})")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ChannelError(self.peer, f"a control message that is not UTF-8 (byte "
                               f"{err.start}, while waiting for {what})") from None
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("msg"), str):
            raise ChannelError(self.peer, f"{line[:200]!r} is not a control message "
                               f"(while waiting for {what})")
        bad = _not_text(msg)
        if bad is not None:
            raise ChannelError(self.peer, f"{bad} is not text (a lone surrogate) in a "
                               f"{msg['msg'][:40]!r} message")
        if msg["msg"] == "error":
            raise Refused(f"{self.peer}: {str(msg.get('error'))[:2000]}")
        return msg

    def closed(self) -> bool:
        """True when the peer has closed the connection (looked at without waiting)."""
        if self._eof:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return not data


def expect(msg: Mapping[str, Any], kind: str, peer: str) -> None:
    """:class:`ChannelError` unless ``msg`` is a ``kind`` message."""
    if msg.get("msg") != kind:
        raise ChannelError(peer, f"sent {str(msg.get('msg'))[:40]!r}, expected {kind!r}")


def new_token() -> str:
    """A new one-time migration token for a receiver (256 random bits, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def read_token(path: Path) -> str:
    """The token in file ``path`` (its text, blanks around it dropped).

    :raise XenlabError: the file cannot be read, is larger than a token file
        can be, or holds no token.
    """
    data = read_bounded(path, _TOKEN_FILE_MAX, what="migration token file")
    token = data.decode("utf-8", "surrogateescape").strip()
    if not token:
        raise UsageError(f"{path}: empty, expected a migration token")
    return token


def parse_address(dest: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` (``[v6]:PORT`` too).

    :raise XenlabError: not of that form.
    """
    host, sep, port = dest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"migration address {dest!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def uri_host(host: str) -> str:
    """``host`` as a URI writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
