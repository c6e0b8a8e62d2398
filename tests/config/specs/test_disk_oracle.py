"""parse_disk against Debian's real libxlutil 4.17 (``xlu_disk_parse``).

For every spec list: the same verdict; for valid specs
``disk_to_libxl_json(parse_disk(s))`` equals ``libxl_device_disk_to_json``
exactly; for invalid ones the report libxlutil prints is rebuilt line for line
from our problems (libxl's message is ours up to the `` (expected ...)`` hint,
and each problem's column points at the text libxl quotes).

Intended differences (inputs the oracle refuses, so not compared here):

* ``=`` followed by a newline: libxlutil's flex scanner jams and ``exit()``s
  the process; xenlab reports "bad disk syntax" (pinned in test_disk.py).
* NUL characters: C strings cannot hold them; xenlab reports an error.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.config.specs.test_disk import CHECK_XL_DISK_PARSE, ERRORS, MAN_PAGE
from tests.oracle.libxlu import Libxlu, OracleRefuses
from xenlab.config.errors import ConfigError
from xenlab.config.specs.disk import disk_to_libxl_json, parse_disk

pytestmark = pytest.mark.integration

_PREFIX = "spec: config parsing error in disk specification: "


def compare(libxlu: Libxlu, specs: list[str]) -> None:
    """Assert that xenlab and libxlutil agree on ``specs``."""
    oracle = libxlu.parse_disk(specs)
    try:
        disk = parse_disk(specs)
    except ConfigError as err:
        assert not oracle.ok, (specs, oracle.json, str(err))
        lines = []
        for problem in err.problems:
            libxl_message = problem.message.rsplit(" (expected ", 1)[0]
            text = specs[problem.line - 1] if specs else "(null)"
            lines.append(f"{_PREFIX}{libxl_message} in `{text}'\n")
            if "near `" in libxl_message:
                quoted = libxl_message.split("near `", 1)[1][:-1]
                at = text[problem.col - 1 :]
                assert at.startswith(quoted) or at.startswith(quoted.removeprefix("block-"))
            else:
                assert problem.col == (len(text) + 1 if specs else 1)
        assert "".join(lines) == oracle.report
        return
    assert oracle.ok, (specs, oracle.report, disk)
    assert oracle.report == ""
    assert disk_to_libxl_json(disk) == oracle.json


@pytest.mark.parametrize(
    "specs", [s for s, _ in CHECK_XL_DISK_PARSE + MAN_PAGE] + [e[0] for e in ERRORS[:-2]]
)
def test_golden_cases_match_libxlutil(libxlu: Libxlu, specs: list[str]) -> None:
    compare(libxlu, specs)


def test_trusted_is_not_a_flag_in_4_17(libxlu: Libxlu) -> None:
    res = libxlu.parse_disk(["trusted", "vdev=hda", "target=/some/disk/image.raw"])
    assert not res.ok
    assert "target respecified" in res.report
    assert libxlu.parse_disk(["trusted,,hda"]).json == {
        "pdev_path": "trusted",
        "vdev": "hda",
        "format": "raw",
        "readwrite": 1,
    }


def test_refused_inputs(libxlu: Libxlu) -> None:
    with pytest.raises(OracleRefuses):
        libxlu.parse_disk(["/x,,hda,=\nrw"])
    with pytest.raises(OracleRefuses):
        libxlu.parse_disk(["/x,\0,hda"])


_PIECES = [
    # positional values
    "/dev/vg/guest", "/a b", "img.qcow2", "", " ", "raw", "qcow", "qcow2", "vhd", "qed",
    "empty", "bogus", "hda", "xvda", "hdc:cdrom", ":cdrom", "hda:disk", "x:floppy",
    "r", "ro", "rw", "w", "x",
    # keys
    "format=raw", "format=qcow2", "format=", "format=zz", "vdev=hda", "vdev=", "vdev=xvdb",
    "access=ro", "access=rw", "access=", "access=q", "devtype=cdrom", "devtype=disk",
    "devtype=", "devtype=xx", "backend=dom0", "backend=", "backendtype=phy",
    "backendtype=qdisk", "backendtype=tap", "backendtype=standalone", "backendtype=zz",
    "specification=xen", "specification=virtio", "specification=q", "script=block-x",
    "script=", "colo-host=h", "colo-port=1", "colo-port=0", "colo-port= -3x",
    "colo-port=99999999999", "colo-export=e", "active-disk=a", "hidden-disk=h",
    "target=/t", "target=/t,x,", "target=", "target= sp ace ",
    # flags
    "cdrom", "discard", "no-discard", "trusted", "untrusted", "colo", "no-colo",
    "direct-io-safe", "cdromx",
    # unknown keys, prefixes
    "foo=bar", "foo=", "x=", "Foo=1", "discard=1", "raw:", "qcow2:", "qcow:", "vhd:",
    "iscsi:", "nbd:", "enbd:", "drbd:", "tap:", "tap2:", "tapdisk:", "aio:", "ioemu:",
    "file:", "phy:", "foo:", "foo:/x", "a1:b",
    # odd characters
    "=", "==", "\t", "\n", " x ", "a\nb", "é", "\\", "'", '"', ":", "::", "\x7f", "\udcff",
]  # fmt: skip
_SEPS = [",", ",", ",", ", ", " ,", "", ",,"]


@st.composite
def spec_lists(draw: st.DrawFn) -> list[str]:
    """Spec lists built from the scanner's pieces (1-3 strings of up to 6 pieces)."""
    specs = []
    for _ in range(draw(st.integers(1, 3))):
        pieces = draw(st.lists(st.sampled_from(_PIECES), max_size=6))
        seps = draw(st.lists(st.sampled_from(_SEPS), min_size=len(pieces), max_size=len(pieces)))
        text = "".join(p + s for p, s in zip(pieces, seps, strict=True))
        if draw(st.booleans()):
            text = text.rstrip(",")
        specs.append(text)
    return specs


@settings(max_examples=1500)
@given(spec_lists())
def test_generated_specs_match_libxlutil(libxlu: Libxlu, specs: list[str]) -> None:
    assume(not any("=\n" in s for s in specs))
    compare(libxlu, specs)


@settings(max_examples=1000)
@given(st.lists(st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x7F)), max_size=2))
def test_ascii_noise_matches_libxlutil(libxlu: Libxlu, specs: list[str]) -> None:
    assume(not any("=\n" in s for s in specs))
    compare(libxlu, specs)
