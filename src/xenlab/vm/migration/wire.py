"""The migration protocol's messages as values: :func:`encode` one, :func:`decode` what a peer sent.

Each message is one JSON object on the control channel (``vm.migration.channel``,
which bounds and checks the line) with a ``"msg"`` key naming its kind; the
order and the failure rules are in docs/migration.md.  :func:`decode` checks
the kind against what the protocol allows at that point and every field's
type, so the sender and the receiver read values, never raw dicts; a
"prepare" carries the source's domain, which ``vm.migration.peerconfig``
checks field by field (:attr:`Prepare.raw`).  Pure: no sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from xenlab.vm.migration.channel import ChannelError

__all__ = ["ERROR_MAX", "Abort", "Go", "Hello", "Listening", "Loaded", "Message", "Prepare",
           "Resumed", "decode", "encode"]

#: How much of a peer's error text is kept.
ERROR_MAX: Final = 2000


@dataclass(frozen=True, slots=True)
class Hello:
    """receiver -> sender, first: the protocol version it speaks."""

    protocol: int


@dataclass(frozen=True, slots=True)
class Prepare:
    """sender -> receiver: the token and the request: ``raw`` holds the domain (``header``:
    a save-image header as JSON), ``with_storage`` and ``disk_sizes``, which the receiver
    checks key by key (``vm.migration.peerconfig.check_request``)."""

    token: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class Listening:
    """receiver -> sender: the destination waits for the stream on ``port`` (and the disks'
    NBD exports on ``nbd_port``)."""

    port: int
    nbd_port: int | None


@dataclass(frozen=True, slots=True)
class Loaded:
    """receiver -> sender: the stream is in; the guest is held, paused."""


@dataclass(frozen=True, slots=True)
class Go:
    """sender -> receiver: start the guest (``paused``: leave it paused)."""

    paused: bool


@dataclass(frozen=True, slots=True)
class Resumed:
    """receiver -> sender: the guest runs here (domain ``domid``, in ``state``)."""

    domid: int
    state: str


@dataclass(frozen=True, slots=True)
class Abort:
    """either way: the sender gives up (before "go"), saying why."""

    error: str


Message = Hello | Prepare | Listening | Loaded | Go | Resumed | Abort

_KINDS: Final[dict[str, type[Message]]] = {
    "hello": Hello, "prepare": Prepare, "listening": Listening, "loaded": Loaded, "go": Go,
    "resumed": Resumed, "abort": Abort,
}
_NAMES: Final = {cls: kind for kind, cls in _KINDS.items()}


def encode(msg: Message) -> dict[str, Any]:
    """``msg`` as the JSON object sent on the channel."""
    if isinstance(msg, Prepare):
        return {**msg.raw, "msg": "prepare", "token": msg.token}
    return {"msg": _NAMES[type(msg)], **{f.name: getattr(msg, f.name) for f in fields(msg)}}


def _field(raw: Mapping[str, Any], name: str, kinds: tuple[type, ...], peer: str, kind: str,
           *, optional: bool = False) -> Any:
    value = raw.get(name)
    if value is None and optional:
        return None
    # bool is an int to Python; a port or a domid that is true is not a number.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ChannelError(peer, f"a {kind!r} message with {name} {str(value)[:40]!r}, "
                                 f"expected {' or '.join(k.__name__ for k in kinds)}")
    return value


def decode(raw: Mapping[str, Any], peer: str, *expected: type[Message]) -> Message:
    """The message ``peer`` sent (``raw``: a channel's object), one of ``expected``.

    :raise ChannelError: another kind, or a field of the wrong type.
    """
    kind = raw.get("msg")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None or cls not in expected:
        want = " or ".join(repr(_NAMES[e]) for e in expected)
        raise ChannelError(peer, f"sent {str(kind)[:40]!r}, expected {want}")
    k = _NAMES[cls]
    if cls is Hello:
        return Hello(_field(raw, "protocol", (int,), peer, k))
    if cls is Prepare:
        return Prepare(_field(raw, "token", (str,), peer, k), raw)
    if cls is Listening:
        return Listening(_field(raw, "port", (int,), peer, k),
                         _field(raw, "nbd_port", (int,), peer, k, optional=True))
    if cls is Go:
        return Go(bool(_field(raw, "paused", (bool,), peer, k, optional=True)))
    if cls is Resumed:
        return Resumed(_field(raw, "domid", (int,), peer, k), _field(raw, "state", (str,),
                                                                    peer, k))
    if cls is Abort:
        error = raw.get("error")
        return Abort(str(error if error is not None else "no reason given")[:ERROR_MAX])
    return Loaded()
