"""xm (Python) to xl conversion: real xm examples, each allowed and refused construct,
the key translations, a Hypothesis round trip and hostile inputs."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.oracle.libxlu import Libxlu
from xenlab.config import ConfigError, parse
from xenlab.config.values import Value
from xenlab.config.xm import MAX_STRING_CHARS, XmConversion, convert_xm


def _convert(text: str | bytes) -> XmConversion:
    result = convert_xm(text, source="guest.xm")
    # Every conversion must give a file that parses back to its settings.
    back = parse(result.text, source="out")
    assert tuple(back.effective().items()) == result.settings
    assert len(list(back.names())) == len(result.settings)
    return result


def _values(text: str) -> dict[str, Value]:
    return dict(_convert(text).settings)


def _notes(text: str, *, whole_file: bool = False) -> list[tuple[int, str]]:
    """Notes as (line, message); line 0 notes are about the whole file."""
    return [(n.line, n.message) for n in _convert(text).notes if whole_file or n.line]


def _error(text: str | bytes) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        convert_xm(text, source="guest.xm")
    return info.value


# --- real files -------------------------------------------------------------


XM_EXAMPLES: dict[str, dict[str, Value]] = {
    "xen-project__xen__xmexample.hvm.cfg": {
        "type": "hvm",
        "memory": "128",
        "name": "ExampleHVMDomain",
        "vif": ("type=ioemu, bridge=xenbr0",),
        "disk": ("file:/var/images/min-el3-i386.img,hda,w", ",hdc:cdrom,r"),
        "sdl": "0",
        "vnc": "1",
        "vncpasswd": "",
        "serial": "pty",
        "tsc_mode": "default",
    },
    "xen-project__xen__xmexample.hvm-stubdom.cfg": {
        "type": "hvm",
        "name": "xmexample.hvm",
        "disk": ("file:/var/images/min-el3-i386.img,hda,w", "phy:/dev/cdrom,hdc:cdrom,r"),
        "device_model_stubdomain_override": "1",
        "boot": "cda",
        "opengl": "1",
        "stdvga": "0",
    },
    "xen-project__xen__xmexample.pv-grub.cfg": {
        "kernel": "pv-grub.gz",
        "extra": "(hd0,0)/boot/grub/menu.lst",
        "memory": "128",
        "name": "ExampleDomain",
        "vif": ("",),
        "disk": ("phy:hda1,hda1,w",),
    },
}


@pytest.mark.parametrize("name", sorted(XM_EXAMPLES))
def test_xm_examples_convert(shared_data: Path, name: str) -> None:
    result = _convert((shared_data / "xlcfg" / name).read_bytes())
    values = dict(result.settings)
    for key, expected in XM_EXAMPLES[name].items():
        assert values[key] == expected, key
    assert "builder" not in values
    assert "device_model" not in values
    if values.get("type") == "hvm":
        assert "kernel" not in values  # hvmloader, which xl ignores for HVM
    assert set(values) == set(XM_EXAMPLES[name]) | (
        {"memory", "vif", "sdl", "vnc", "vncpasswd", "opengl", "stdvga", "name", "type"}
        & set(values)
    )


def test_hvm_example_notes(shared_data: Path) -> None:
    text = (shared_data / "xlcfg" / "xen-project__xen__xmexample.hvm.cfg").read_text()
    notes = _notes(text, whole_file=True)
    assert [line for line, _ in notes] == [0, 11, 14, 128, 194]
    assert "xm restarted a crashed domain" in notes[0][1]
    assert notes[1][1].startswith("dropped `kernel = hvmloader`")
    assert notes[2][1].startswith("`builder = 'hvm'` became `type = \"hvm\"`")
    assert notes[3][1].startswith("dropped `device_model = 'qemu-dm'`")
    assert notes[4][1].startswith('`tsc_mode = 0` became `tsc_mode = "default"`')


def test_every_shared_config_converts_and_xl_reads_it(shared_data: Path, libxlu: Libxlu) -> None:
    # The xl files there are valid xm too (the languages overlap); the
    # converted text must be read by the real libxlutil to the same values.
    files = sorted((shared_data / "xlcfg").iterdir())
    assert len(files) >= 20
    for path in files:
        result = _convert(path.read_bytes())
        oracle = libxlu.parse_cfg(result.text.encode())
        assert oracle.ok, (path.name, oracle.report)
        assert tuple((s.name, s.value) for s in oracle.settings) == result.settings


def test_xl_example_values(shared_data: Path) -> None:
    values = _values((shared_data / "xlcfg" / "xen-project__xen__xlexample.hvm.cfg").read_text())
    assert values["type"] == "hvm"
    assert values["name"] == "example.hvm"
    assert values["memory"] == "128"
    assert values["vcpus"] == "2"
    spider = shared_data / "xlcfg" / "xen-troops__meta-xt-prod-devel-rcar-gen4__domd-spider.cfg"
    values = _values(spider.read_text())
    assert values["on_crash"] == "preserve"
    assert values["irqs"][:3] == ("854", "858", "948")  # type: ignore[index]
    assert values["iomem"][-1] == "e6078,1"  # type: ignore[index]
    assert values["dt_compatible"] == (
        "renesas,spider-breakout",
        "renesas,spider-cpu",
        "renesas,r8a779f0",
    )


# --- allowed constructs -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('name = "g"', "g"),
        ("name = 'g'", "g"),
        ('name = """g"""', "g"),
        ('name = "a" "b"', "ab"),
        ('name = "a" + "b"', "ab"),
        ('base = "/srv"\nname = base + "/x"', "/srv/x"),
        ('name = "vm%d" % 7', "vm7"),
        ('name = "%s-%02d" % ("vm", 3)', "vm-03"),
        ('name = "%s" % [1, "a"]', "[1, 'a']"),
        ('name = "%x%%" % 255', "ff%"),
        ('name = "-" * 3', "---"),
        ('name = 3 * "ab"', "ababab"),
        ("name = 12", "12"),
        ("name = 0x1f", "31"),
        ("name = 0o17", "15"),
        ("name = 2 + 3 * 4", "14"),
        ("name = (2 + 3) * 4", "20"),
        ("name = 7 // 2", "3"),
        ("name = 7 - 10", "-3"),
        ("name = -5", "-5"),
        ("name = +5", "5"),
        ("name = 7 % 3", "1"),
        ("name = 1.5", "1.5"),
        ("name = -1.5", "-1.5"),
        ("name = True", "1"),
        ("name = False", "0"),
        ("name = True + 1", "2"),
        ("name = [1, 'a', [2, (3,)]]", ("1", "a", ("2", ("3",)))),
        ("name = (1, 2)", ("1", "2")),
        ("name = []", ()),
        ("name = [1] + [2]", ("1", "2")),
        ("name = [0] * 3", ("0", "0", "0")),
        ("name = 'a'\nname += 'b'", "ab"),
        ("name = [1]\nname += [2]", ("1", "2")),
        ("name = 5\nname -= 1", "4"),
        ("a = name = 'x'", "x"),
        ('"""Docstring."""\npass\nname = "g"  # comment', "g"),
        ("name = 'é\\u00e9\\n'", "éé\n"),
        ("name = u'x'", "x"),
    ],
)
def test_allowed_constructs(source: str, expected: Value) -> None:
    assert _values(source)["name"] == expected


def test_int_division_floors_as_python2_did() -> None:
    source = "memory = 1024 / 3\nmaxmem = -7 / 2"
    assert _values(source) == {"memory": "341", "maxmem": "-4"}
    assert _notes(source)[:2] == [
        (1, "`/` on integers divides to a whole number here, as under xm's Python 2"),
        (2, "`/` on integers divides to a whole number here, as under xm's Python 2"),
    ]


def test_last_assignment_wins_at_the_first_place() -> None:
    result = _convert("name = 'a'\nmemory = 1\nname = 'b'\n")
    assert result.settings == (("name", "b"), ("memory", "1"))


def test_helper_names_and_none_are_not_written() -> None:
    source = "BASE = '/srv'\n_tmp = 1\nvmId = 2\nkernel = BASE + '/k'\nramdisk = None\n"
    assert _values(source) == {"kernel": "/srv/k"}
    notes = _notes(source)
    assert [line for line, _ in notes[:4]] == [1, 2, 3, 5]
    assert notes[0][1].startswith("`BASE` is not an xl name")
    assert notes[3][1] == "dropped `ramdisk`: it is None, which xl has no value for"


def test_output_text_is_commented_and_quoted() -> None:
    result = _convert('name = "a\\"b"\nmemory = 256\nextra = "x\\ny"\nvcpus = -1\n')
    body = result.text.split("\n\n", 1)[1]
    assert body == 'name = "a\\"b"\nmemory = 256\nextra = "x\\ny"\nvcpus = "-1"\n'
    assert result.text.startswith("# xl config converted from the xm config guest.xm")
    assert result.get("memory") == "256"
    assert result.get("nothing") is None


# --- refused constructs -----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "line", "col", "message"),
    [
        (
            "import os",
            1,
            1,
            "import statement `import os` is not allowed: xm configs are "
            "converted without running them",
        ),
        ("from os import uname", 1, 1, "import statement `from os import uname` is not allowed"),
        (
            "name = os.uname()",
            1,
            8,
            "function call `os.uname()` is not allowed: xm configs are "
            "converted without running them",
        ),
        ("xm_vars.check()", 1, 1, "function call `xm_vars.check()` is not allowed"),
        ("name = 'a'\nname = os.path", 2, 8, "attribute access `os.path` is not allowed"),
        ("if 1:\n    name = 'a'", 1, 1, "`if` statement `if 1` is not allowed"),
        ("for i in []:\n    pass", 1, 1, "`for` loop `for i in []` is not allowed"),
        ("while 0:\n    pass", 1, 1, "`while` loop `while 0` is not allowed"),
        ("def f(v):\n    return v", 1, 1, "function definition `def f(v)` is not allowed"),
        ("class C:\n    pass", 1, 1, "class definition `class C` is not allowed"),
        ("try:\n    pass\nexcept:\n    pass", 1, 1, "`try` statement `try` is not allowed"),
        ("del x", 1, 1, "`del` statement `del x` is not allowed"),
        ("x: int = 1", 1, 1, "annotated assignment `x: int = 1` is not allowed"),
        ("a = [1]\nb = a[0]", 2, 5, "subscript `a[0]` is not allowed"),
        ("b = 'abc'[1:]", 1, 5, "subscript `'abc'[1:]` is not allowed"),
        ("b = lambda: 1", 1, 5, "lambda `lambda: 1` is not allowed"),
        ("b = {'a': 1}", 1, 5, "dict `{'a': 1}` is not allowed"),
        ("b = {1}", 1, 5, "set `{1}` is not allowed"),
        ("b = [i for i in []]", 1, 5, "list comprehension `[i for i in []]` is not allowed"),
        ("b = 1 < 2", 1, 5, "comparison `1 < 2` is not allowed"),
        ("b = 1 and 2", 1, 5, "boolean operator `1 and 2` is not allowed"),
        ("b = 1 if 1 else 2", 1, 5, "conditional expression `1 if 1 else 2` is not allowed"),
        ("b = f'{1}'", 1, 5, "f-string `f'{1}'` is not allowed"),
        ("a = []\nb = [*a]", 2, 6, "starred expression `*a` is not allowed"),
        ("b = b'x'", 1, 5, "bytes literal `b'x'` is not allowed"),
        ("b = 1j", 1, 5, "complex number `1j` is not allowed"),
        ("b = ...", 1, 5, "constant `...` is not allowed"),
        ("a, b = 1, 2", 1, 1, "unpacking assignment `a, b` is not allowed"),
        ("a.b = 1", 1, 1, "assignment to attribute access `a.b` is not allowed"),
        ("a[0] = 1", 1, 1, "assignment to subscript `a[0]` is not allowed"),
        (
            "b = 2 ** 8",
            1,
            5,
            "operator `**` is not allowed: xm configs are converted without "
            "running them (allowed: + - * / // %)",
        ),
        ("b = 1 << 2", 1, 5, "operator `<<` is not allowed"),
        ("b = not 1", 1, 5, "operator `not` is not allowed"),
        ("b = ~1", 1, 5, "operator `~` is not allowed"),
        (
            "b = vmid",
            1,
            5,
            "name `vmid` is not assigned before this line (xm's command-line "
            "variables and built-ins are not supported)",
        ),
        ("b += 1", 1, 1, "name `b` is extended with `+=` before it is assigned"),
        ("b = 'a' + 1", 1, 5, "operator `+` is not allowed between str and int"),
        ("b = [1] + (2,)", 1, 5, "operator `+` is not allowed between list and tuple"),
        ("b = 1.5 * 2", 1, 5, "operator `*` is not allowed between float and int"),
        ("b = -'a'", 1, 5, "unary minus or plus needs a number, not str"),
        ("b = 1 // 0", 1, 5, "division by zero"),
        ("b = '%(a)s' % 1", 1, 5, "`%(name)` formatting needs a dict, which is not allowed"),
        ("b = '%*d' % (1, 2)", 1, 5, "`*` width in format string is not allowed"),
        ("b = '%q' % 1", 1, 5, "unsupported format character 'q' in format string"),
        ("b = '%s %s' % (1,)", 1, 5, "string formatting failed: not enough arguments"),
        ("b = 1e999", 1, 5, "number is not finite"),
        ("b = 2 * 9223372036854775807 * 2", 1, 5, "integer is out of range"),
        ("b = 18446744073709551616", 1, 5, "integer is out of range"),
        ("'doc'\n'a' + 'b'", 2, 1, "expression `'a' + 'b'` outside an assignment is not allowed"),
        ("name = 'x'\n  \tb = é(", 2, 3, "Python syntax error: unexpected indent"),
        ("b = 0755", 1, 5, "Python syntax error: leading zeros in decimal integer literals"),
        ("print 'hi'", 1, 1, "Python syntax error: Missing parentheses in call to 'print'"),
        ("b = 'é' + x", 1, 11, "name `x` is not assigned before this line"),
        ("b = '\\0'", 1, 5, "value of `b` contains a NUL character"),
        ("b = ['\\ud800']", 1, 5, "value of `b` contains an unpaired surrogate"),
        ("b = [None]", 1, 5, "`b` has None inside a list"),
    ],
)
def test_refused_constructs(source: str, line: int, col: int, message: str) -> None:
    err = _error(source)
    assert (err.source, err.line, err.col) == ("guest.xm", line, col)
    assert err.message.startswith(message), err.message
    assert str(err).startswith(f"guest.xm:{line}:{col}: ")


def test_not_utf8_nul_and_surrogates_in_the_text() -> None:
    err = _error(b"name = 'a'\nkernel = '\xff'\n")
    assert (err.line, err.col, err.message) == (2, 11, "byte 0xff is not UTF-8 text")
    err = _error("name = 'a'\n  x = 1\0")
    assert (err.line, err.col, err.message) == (2, 8, "NUL character in the file, expected text")
    err = _error("x = '\udc80'")
    assert (err.line, err.col, err.message) == (
        1,
        6,
        "unpaired surrogate in the file, expected text",
    )


# --- key translation --------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("builder = 'hvm'", {"type": "hvm"}),
        ("builder = 'linux'", {"type": "pv"}),
        ("builder = 'generic'\ntype = 'pv'", {"type": "pv"}),
        ("type = 'ioemu'\nvif = ['type=%s' % type]", {"vif": ("type=ioemu",)}),
        ("builder = 'hvm'\nkernel = '/usr/lib/xen/boot/hvmloader'", {"type": "hvm"}),
        ("kernel = '/boot/hvmloader'", {"kernel": "/boot/hvmloader"}),  # PV: kept
        ("loader = '/usr/lib/xen/boot/hvmloader'", {}),
        ("loader = '/opt/fw'", {"firmware_override": "/opt/fw"}),
        ("device_model = '/usr/lib/xen/bin/qemu-dm'", {}),
        ("device_model = '/opt/my-qemu'", {"device_model_override": "/opt/my-qemu"}),
        (
            "builder = 'hvm'\ndevice_model = 'stubdom-dm'",
            {"type": "hvm", "device_model_stubdomain_override": "1"},
        ),
        ("device_model = 'stubdom-dm'", {}),
        ("cpu_cap = 50", {"cap": "50"}),
        ("irq = 7", {"irqs": ("7",)}),
        ("irq = [5, 7]", {"irqs": ("5", "7")}),
        ("cpu = 2", {"cpus": "2"}),
        ("cpu = 2\ncpus = '4-7'", {"cpus": "2,4-7"}),
        ("cpu = 2\ncpus = ['1', '2']", {"cpus": ("1", "2")}),
        ("cpus = ['0-3,^1', 5]", {"cpus": ("0-3,^1", "5")}),
        ("vcpus = 4\nvcpu_avail = 3", {"vcpus": "2", "maxvcpus": "4"}),
        ("vcpu_avail = 1\nvcpus = 4", {"vcpus": "1", "maxvcpus": "4"}),
        ("vcpus = 2\nvcpu_avail = 3", {"vcpus": "2"}),
        ("vcpus = 4\nvcpu_avail = 5", {"vcpus": "4"}),
        (
            "restart = 'onreboot'",
            {"on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "destroy"},
        ),
        (
            "on_crash = 'preserve'\nrestart = 'always'",
            {"on_poweroff": "restart", "on_reboot": "restart", "on_crash": "restart"},
        ),
        (
            "restart = 'never'",
            {"on_poweroff": "destroy", "on_reboot": "destroy", "on_crash": "destroy"},
        ),
        ("restart = 'sometimes'", {}),
        ("on_crash = 'coredump-restart'", {"on_crash": "coredump-restart"}),
        ("tsc_mode = 3", {"tsc_mode": "native_paravirt"}),
        ("timer_mode = 1", {"timer_mode": "no_delay_for_missed_ticks"}),
        ("tsc_mode = 'native'", {"tsc_mode": "native"}),
        (
            "bootargs = \"--entry=xvda1:/boot/vmlinuz -q 'a b'\"",
            {"bootloader_args": ("--entry=xvda1:/boot/vmlinuz", "-q", "a b")},
        ),
        ("bootargs = 'x'\nbootloader_args = ['y']", {"bootloader_args": ("y",)}),
        (
            "ip = '10.0.0.2'\nnetmask = '255.0.0.0'\ngateway = '10.0.0.1'\nhostname = 'g'",
            {"extra": "ip=10.0.0.2:127.0.255.255:10.0.0.1:255.0.0.0:g:eth0:off"},
        ),
        ("extra = '4'\ndhcp = 'dhcp'", {"extra": "ip=:127.0.255.255::::eth0:dhcp 4"}),
        ("extra = 'ip=1.2.3.4'\nip = '10.0.0.2'", {"extra": "ip=1.2.3.4"}),
        (
            "nfs_server = '10.0.0.1'\nnfs_root = '/srv/root'\nextra = 'ro'",
            {"extra": "nfsroot=10.0.0.1:/srv/root ro"},
        ),
        ("interface = 'eth1'", {}),
        ("cmdline = 'quiet'\nroot = '/dev/xvda1'", {"root": "/dev/xvda1"}),
        ("cmdline = 'quiet'", {"cmdline": "quiet"}),
        ("vfb = ['type=vnc,vncunused=1', 'type=sdl']", {"vfb": ("vnc=1,vncunused=1", "sdl=1")}),
        ("netif = 1", {"driver_domain": "1"}),
        ("blkif = 0", {}),
        ("vncconsole = 1\nfda = '/f.img'\naccess_control = ['policy=x']", {}),
        (
            "boot = 'dc'\nvncunused = True\nacpi = False",
            {"boot": "dc", "vncunused": "1", "acpi": "0"},
        ),
    ],
)
def test_key_translation(source: str, expected: dict[str, Value]) -> None:
    assert _values(source) == expected


def test_translation_notes() -> None:
    notes = dict(
        _notes(
            whole_file=True,
            text="memory = 64\non_crash = 'destroy'\nbuilder = 'hvm'\nboot = 'ac'\n"
            "cpu_cap = 5\nfdb = 'x'\nbootentry = 'xvda1:/k'\n",
        )
    )
    assert notes == {
        0: "xl needs `name`; the file sets none",
        3: "`builder = 'hvm'` became `type = \"hvm\"` (xl deprecates `builder`, and rejects "
        "'linux')",
        4: "`boot` has a: xl boots only from c (disk), d (CD-ROM) and n (network)",
        5: "renamed `cpu_cap` to `cap`",
        6: "dropped `fdb`: xl cannot attach floppy disks",
        7: "dropped `bootentry`: deprecated in xm; pass the entry in `bootloader_args`",
    }
    file_notes = [m for line, m in _notes("x = 1", whole_file=True) if line == 0]
    assert file_notes == [
        "xm restarted a crashed domain by default, xl destroys it: add "
        '`on_crash = "restart"` to keep xm\'s behaviour',
        "xm gave 128 MiB when `memory` was not set, xl gives 32 MiB",
        "xl needs `name`; the file sets none",
    ]


@pytest.mark.parametrize(
    ("source", "line", "col", "message"),
    [
        (
            "builder = 'xen'",
            1,
            11,
            "builder 'xen' is unknown, expected 'hvm', 'linux' or 'generic'",
        ),
        ("type = 'pv'\nbuilder = 'hvm'", 2, 11, "builder 'hvm' contradicts type 'pv'"),
        ("on_reboot = 'reboot'", 1, 13, "`on_reboot` action 'reboot' is unknown"),
        ("tsc_mode = 7", 1, 12, "`tsc_mode` 7 is out of range, expected 0 to 3"),
        ("nfs_root = '/srv'", 1, 12, "`nfs_root` needs `nfs_server`, as in xm"),
        ('bootargs = "\'a"', 1, 12, "cannot split `bootargs` into words"),
    ],
)
def test_translation_errors(source: str, line: int, col: int, message: str) -> None:
    err = _error(source)
    assert (err.line, err.col) == (line, col)
    assert err.message.startswith(message), err.message


# --- round trip -------------------------------------------------------------

_names = st.from_regex(r"x_[a-z0-9_]{0,8}", fullmatch=True)
_texts = st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20
)
_atoms = st.one_of(
    _texts,
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
_py_values = st.recursive(
    _atoms,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple)),
    max_leaves=12,
)


def _expected(value: object) -> Value:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    assert isinstance(value, list | tuple)
    return tuple(_expected(item) for item in value)


@given(st.dictionaries(_names, _py_values, max_size=8))
def test_round_trip(config: dict[str, object]) -> None:
    source = "".join(f"{name} = {value!r}\n" for name, value in config.items())
    result = _convert(source)
    assert result.settings == tuple((name, _expected(v)) for name, v in config.items())


@given(st.lists(_texts, min_size=1, max_size=5))
def test_concatenation_round_trip(parts: list[str]) -> None:
    source = "x_a = " + " + ".join(repr(p) for p in parts) + "\nx_a += 'z'\n"
    assert _values(source) == {"x_a": "".join(parts) + "z"}


def test_converted_text_is_what_libxlutil_reads(libxlu: Libxlu) -> None:
    result = _convert(
        "name = 'a\\tb\\\\c\"d\\x07'\ncpus = ['0-3', 5]\nvcpus = -1\nx_f = 1.5e-07\n"
        "x_n = [[1, [2]], ()]\nbuilder = 'hvm'\n"
    )
    oracle = libxlu.parse_cfg(result.text.encode())
    assert oracle.ok, oracle.report
    assert tuple((s.name, s.value) for s in oracle.settings) == result.settings
    assert result.get("x_n") == (("1", ("2",)), ())


# --- hostile input ----------------------------------------------------------


def _fast_error(text: str | bytes) -> ConfigError:
    start = time.monotonic()
    err = _error(text)
    assert time.monotonic() - start < 2.0
    return err


@pytest.mark.parametrize(
    ("source", "line", "col", "message"),
    [
        ('x = "a" * 10**9', 1, 11, "operator `**` is not allowed"),
        ('x = "a" * 1000000000', 1, 5, "value is too large"),
        ("x = [0] * 1000000000", 1, 5, "value is too large"),
        ("x = 2**10**10", 1, 5, "operator `**` is not allowed"),
        ("x = '%1000d' % 1 * 1000", 1, 5, "value is too large"),
        ("x = '%99999d' % 1", 1, 5, "format width or precision is too large"),
        (
            "x = 'a' * 65537",
            1,
            5,
            f"string of 65537 characters is too long (at most {MAX_STRING_CHARS}",
        ),
        ("x = 'a' * 60000\n" + "y = x + x\n" * 100, 2, 5, "string of 120000 characters"),
        ("x = 'a' * 60000\n" + "y = x + 'b'\n" * 100, 84, 5, "the config builds too much data"),
        ("x = []\n" + "x = [x, x]\n" * 40, 17, 5, "lists are nested too deeply"),
        ("x = 1\n" + "x = x * 4294967296\n" * 3, 3, 5, "integer is out of range"),
        (
            "x = " + "[" * 10_000 + "]" * 10_000,
            1,
            205,
            "Python syntax error: too many nested parentheses",
        ),
        (
            "x = " + "(" * 10_000 + "1" + ")" * 10_000,
            1,
            205,
            "Python syntax error: too many nested parentheses",
        ),
        (
            "x = " + "-" * 10_000 + "1",
            1,
            1,
            "expression is nested too deeply for the Python parser",
        ),
        ("x = " + " + ".join(["'a'"] * 300), 1, 5, "expression is nested too deeply (at most"),
        ("x = " + " + ".join(["'a'"] * 10_000), 1, 1, "expression is nested too deeply for"),
        (
            "x = " + "a." * 10_000 + "b",
            1,
            1,
            "expression is nested too deeply for the Python parser",
        ),
        ("x = 1\n" * 200_000, 1, 1, "file is too large to convert"),
    ],
)
def test_hostile_inputs_are_refused_fast(source: str, line: int, col: int, message: str) -> None:
    err = _fast_error(source)
    assert (err.line, err.col) == (line, col)
    assert err.message.startswith(message), err.message


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_config_error(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        _convert(data)


@given(st.text(alphabet="x=[]()'\"+-*/%,.:0123456789a \n#\\", max_size=80))
def test_random_python_ish_text_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        _convert(text)
