"""The migration protocol's messages: every kind round-trips, and what a peer may not send is
refused naming the peer, the kind and the field."""

from __future__ import annotations

import json

import pytest

from xenlab.vm.migration import wire
from xenlab.vm.migration.channel import ChannelError

MESSAGES: list[wire.Message] = [
    wire.Hello(2),
    wire.Prepare("tok", {"header": {"name": "web"}, "with_storage": True,
                         "disk_sizes": {"xvda": 1 << 30}}),
    wire.Listening(47001, None),
    wire.Listening(47001, 47002),
    wire.Loaded(),
    wire.Go(True),
    wire.Go(False),
    wire.Resumed(3, "running"),
    wire.Abort("the disk is full"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(msg: wire.Message) -> None:
    raw = json.loads(json.dumps(wire.encode(msg)))
    assert isinstance(raw["msg"], str)
    back = wire.decode(raw, "peer", type(msg))
    assert back == msg
    if isinstance(msg, wire.Prepare):
        assert isinstance(back, wire.Prepare) and back.raw["disk_sizes"] == {"xvda": 1 << 30}


def test_the_wire_names_are_the_protocols() -> None:
    assert [wire.encode(m)["msg"] for m in MESSAGES] == [
        "hello", "prepare", "listening", "listening", "loaded", "go", "go", "resumed", "abort"]
    assert wire.encode(wire.Go(True)) == {"msg": "go", "paused": True}
    assert wire.encode(wire.Listening(1, None)) == {"msg": "listening", "port": 1,
                                                    "nbd_port": None}


@pytest.mark.parametrize(("raw", "expected", "words"), [
    ({"msg": "go"}, (wire.Loaded,), "sent 'go', expected 'loaded'"),
    ({"msg": "gone"}, (wire.Go, wire.Abort), "sent 'gone', expected 'go' or 'abort'"),
    ({"msg": 5}, (wire.Hello,), "sent '5', expected 'hello'"),
    ({"msg": "listening", "port": "80"}, (wire.Listening,), "with port '80', expected int"),
    ({"msg": "listening", "port": True}, (wire.Listening,), "with port 'True', expected int"),
    ({"msg": "listening", "port": 1, "nbd_port": 2.5}, (wire.Listening,), "nbd_port '2.5'"),
    ({"msg": "resumed", "domid": 1}, (wire.Resumed,), "with state 'None', expected str"),
    ({"msg": "go", "paused": "yes"}, (wire.Go,), "with paused 'yes', expected bool"),
    ({"msg": "hello", "protocol": None}, (wire.Hello,), "with protocol 'None'"),
    ({"msg": "prepare", "token": ["x"]}, (wire.Prepare,), "with token \"['x']\""),
])
def test_what_a_peer_may_not_send(raw: dict[str, object], expected: tuple[type[wire.Message]],
                                  words: str) -> None:
    with pytest.raises(ChannelError, match=r"^10\.0\.0\.9:4000: ") as err:
        wire.decode(raw, "10.0.0.9:4000", *expected)
    assert words in str(err.value)


def test_an_abort_keeps_a_bounded_reason() -> None:
    msg = wire.decode({"msg": "abort", "error": "x" * 100000}, "peer", wire.Abort)
    assert isinstance(msg, wire.Abort) and len(msg.error) == wire.ERROR_MAX
    assert wire.decode({"msg": "abort"}, "peer", wire.Abort) == wire.Abort("no reason given")
