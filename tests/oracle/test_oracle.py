"""The oracle reports what libxlutil really holds: values, verdicts, reports."""

from __future__ import annotations

import pytest

from tests.oracle.libxlu import (
    Libxlu,
    OracleLookup,
    OracleRefuses,
    OracleSetting,
    cfg_input_aborts,
)

pytestmark = pytest.mark.integration


def test_settings_in_file_order_with_nested_lists(libxlu: Libxlu) -> None:
    res = libxlu.parse_cfg(b'a = "x"\nb = [ "1", [ "2" ] ]\n')
    assert (res.ok, res.rc, res.report) == (True, 0, "")
    assert res.settings == (
        OracleSetting("a", "=", 1, "x"),
        OracleSetting("b", "=", 2, ("1", ("2",))),
    )


def test_plus_equals_concatenates_strings(libxlu: Libxlu) -> None:
    res = libxlu.parse_cfg(b'a = "x"\na += "y"\n')
    assert res.ok
    assert res.settings == (OracleSetting("a", "=", 1, "x"), OracleSetting("a", "+=", 2, "xy"))


def test_plus_equals_moves_list_items_out_of_the_previous_setting(libxlu: Libxlu) -> None:
    res = libxlu.parse_cfg(b'a = ["x"]\na += ["y"]\n')
    assert res.settings == (OracleSetting("a", "=", 1, ()), OracleSetting("a", "+=", 2, ("x", "y")))


def test_syntax_error_reports_line_and_fails(libxlu: Libxlu) -> None:
    res = libxlu.parse_cfg(b"a = 1\nb = = 2\n")
    assert (res.ok, res.rc) == (False, 22)
    assert (
        res.report == "config:2: config parsing error near `=': syntax error,"
        " unexpected '=', expecting STRING or NUMBER or '['\n"
    )
    assert not res.likely_python
    assert res.settings == (OracleSetting("a", "=", 1, "1"),)


def test_python_looking_text_is_flagged(libxlu: Libxlu) -> None:
    res = libxlu.parse_cfg(b"a = (1)\n")
    assert not res.ok
    assert res.likely_python
    assert "config parsing error" in res.report


def test_lookups(libxlu: Libxlu) -> None:
    res = libxlu.parse_cfg(b'a = "x"\nn = 0x10\nl = [1]\n')
    assert res.get_string("a") == OracleLookup(0, "x", "")
    assert res.get_long("n") == OracleLookup(0, 16, "")
    assert res.get_string("missing").rc == 3  # ESRCH
    warn = res.get_string("l")
    assert warn.rc == 22
    assert (
        warn.report == "config:3: warning: parameter `l' is a list but should be a single value\n"
    )


def test_nul_in_quoted_string_is_refused(libxlu: Libxlu) -> None:
    assert cfg_input_aborts(b'a = "x\0"\n')
    with pytest.raises(OracleRefuses):
        libxlu.parse_cfg(b'a = "x\0"\n')
    # After a lexical error nothing more is dequoted, so this one is safe.
    assert not cfg_input_aborts(b'a = $\nb = "\0"\n')
    assert not libxlu.parse_cfg(b'a = $\nb = "\0"\n').ok


def test_disk_spec_json(libxlu: Libxlu) -> None:
    res = libxlu.parse_disk(["/dev/vg/guest-volume,,hda"])
    assert res.ok
    assert res.json == {
        "pdev_path": "/dev/vg/guest-volume",
        "vdev": "hda",
        "format": "raw",
        "readwrite": 1,
    }
    bad = libxlu.parse_disk(["format=bogus,vdev=xvda,target=/x"])
    assert (bad.ok, bad.rc) == (False, 22)
    assert bad.report == (
        "spec: config parsing error in disk specification: unknown value for format:"
        " near `bogus' in `format=bogus,vdev=xvda,target=/x'\n"
    )


def test_pci_and_vif_rate(libxlu: Libxlu) -> None:
    pci = libxlu.parse_pci("0000:01:02.3,permissive=1")
    assert pci.ok
    assert pci.json == {"func": 3, "dev": 2, "bus": 1, "vfunc_mask": 1, "permissive": True}
    rate = libxlu.parse_vif_rate("10MB/s@20ms")
    assert rate.json == {"rate_bytes_per_interval": 200000, "rate_interval_usecs": 20000}
