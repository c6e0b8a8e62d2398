"""Mutated bytes for property tests of the binary readers, written once: :func:`mutated`.

A mutation picks one of ``seeds`` and applies one to four edits: a flipped
bit, a cut, inserted junk, a whole field overwritten with one of ``fields``
(each of the same length as the span it replaces; the big numbers size
fields are made of), or a deleted run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hypothesis import strategies as st

OPS = ("flip", "truncate", "insert", "field", "delete")


@st.composite
def mutated(draw: st.DrawFn, seeds: Mapping[str, bytes], fields: Sequence[bytes],
            ops: Sequence[str] = OPS) -> bytes:
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(list(ops)))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "field":
            field = draw(st.sampled_from(list(fields)))
            if len(data) >= len(field):
                at = min(at, len(data) - len(field))
                data[at : at + len(field)] = field
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)
