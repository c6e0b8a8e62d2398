"""Tests of xenlab.config.specs.cpus: xl's cpus= / vcpu-pin mini-language."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.config.errors import ConfigError
from xenlab.config.specs.cpus import (
    CpuSet,
    CpuTerm,
    CpuTermKind,
    HostTopology,
    format_cpus,
    parse_cpus,
)

# tools/xl/check-xl-vcpupin-parse.data-example: "16 CPUs, 2 nodes, 8 CPUs per node".
HOST16 = HostTopology.uniform(2, 8)

# (spec, expected cpumap as xl prints it), from the data-example, in order.
GOLDEN = [
    ("all", "all"),
    ("nodes:all", "all"),
    ("all,nodes:all", "all"),
    ("all,^nodes:0,all", "all"),
    ("^0", "none"),
    ("0", "0"),
    ("9", "9"),
    ("6", "6"),
    ("all,^12", "0-11,13-15"),
    ("all,^6", "0-5,7-15"),
    ("all,^3", "0-2,4-15"),
    ("all,^7", "0-6,8-15"),
    ("13-15", "13-15"),
    ("7", "7"),
    ("3-5", "3-5"),
    ("8-11", "8-11"),
    ("nodes:1", "8-15"),
    ("nodes:0", "0-7"),
    ("all,^nodes:0", "8-15"),
    ("all,^nodes:1", "0-7"),
    ("nodes:1-1", "8-15"),
    ("nodes:0-1", "all"),
    ("nodes:0-0", "0-7"),
    ("nodes:1,^8", "9-15"),
    ("nodes:0,^6", "0-5,7"),
    ("nodes:1,^9", "8,10-15"),
    ("nodes:0,^5", "0-4,6-7"),
]


def cpumap(text: str, nr_cpus: int = 16) -> frozenset[int]:
    """Read xl's printed cpumap ('all', 'none' or ranges) as a set."""
    if text == "all":
        return frozenset(range(nr_cpus))
    if text == "none":
        return frozenset()
    result: set[int] = set()
    for piece in text.split(","):
        first, _, last = piece.partition("-")
        result.update(range(int(first), int(last or first) + 1))
    return frozenset(result)


@pytest.mark.parametrize(("spec", "expected"), GOLDEN)
def test_golden_vcpupin_cases(spec: str, expected: str) -> None:
    cpuset = parse_cpus(spec, source="vcpu-pin")
    assert cpuset.resolve(HOST16.nr_cpus, HOST16.node_cpus) == cpumap(expected)


def test_golden_wrong_configuration_is_an_error() -> None:
    # "foo*255*": xl vcpu-pin exits with 255.
    with pytest.raises(ConfigError) as info:
        parse_cpus("foo", source="vcpu-pin")
    assert str(info.value).startswith("vcpu-pin:1:1: invalid cpus term 'foo'")


# xl.cfg(5): "CPUs 0-3 belong to node 0, CPUs 4-7 to node 1, 8-11 to node 2, 12-15 to node 3".
HOST_MAN = HostTopology.uniform(4, 4)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-3,5,^1", {0, 2, 3, 5}),
        ("all,^7", set(range(16)) - {7}),
        ("nodes:0-3,^node:2", set(range(8)) | set(range(12, 16))),
        ("1,node:1,^6", {1, 4, 5, 7}),
        ("all,^node:1", set(range(16)) - {4, 5, 6, 7}),
        ("all,^5-8", set(range(16)) - {5, 6, 7, 8}),
        ("node:0,node:2,^9-11,18-20", {0, 1, 2, 3, 8}),
    ],
)
def test_man_page_examples(spec: str, expected: set[int]) -> None:
    assert parse_cpus(spec, source="m").resolve(16, HOST_MAN.node_cpus) == expected


def test_symbolic_terms_are_kept() -> None:
    assert parse_cpus("nodes:0-1,^node:1,3", source="s") == CpuSet(
        (
            CpuTerm(CpuTermKind.NODES, 0, 1),
            CpuTerm(CpuTermKind.NODES, 1, 1, exclude=True),
            CpuTerm(CpuTermKind.CPUS, 3, 3),
        )
    )
    assert parse_cpus("nodes:all", source="s").terms == (CpuTerm(CpuTermKind.NODES, None, None),)


@pytest.mark.parametrize(
    ("spec", "terms"),
    [
        ("", ()),  # strtok finds no token: the empty set
        (",,3,", (CpuTerm(CpuTermKind.CPUS, 3, 3),)),
        (" 3", (CpuTerm(CpuTermKind.CPUS, 3, 3),)),  # strtoul skips leading blanks
        ("+3", (CpuTerm(CpuTermKind.CPUS, 3, 3),)),
        ("3- 5", (CpuTerm(CpuTermKind.CPUS, 3, 5),)),
        ("^ 4", (CpuTerm(CpuTermKind.CPUS, 4, 4, exclude=True),)),
        # strtoul wraps a negative number; only ULONG_MAX itself is refused.
        ("-2", (CpuTerm(CpuTermKind.CPUS, 2**64 - 2, 2**64 - 2),)),
    ],
)
def test_c_library_corners(spec: str, terms: tuple[CpuTerm, ...]) -> None:
    assert parse_cpus(spec, source="s").terms == terms


def test_cpus_beyond_the_host_are_dropped_when_resolving() -> None:
    assert parse_cpus("-2,14-40", source="s").resolve(16, {}) == {14, 15}
    assert parse_cpus("nodes:0-18446744073709551614", source="s").resolve(
        16, HOST16.node_cpus
    ) == frozenset(range(16))


@pytest.mark.parametrize(
    ("spec", "col", "reason"),
    [
        ("foo", 1, "expected a number"),
        ("1,^all", 3, "'^' cannot be combined with 'all'"),
        ("0,^nodes:all", 3, "'^' cannot be combined with 'all'"),
        ("0-3,5-2", 5, "range 5-2 goes backwards"),
        ("1,2-x", 3, "expected a number after '-'"),
        ("3 ", 1, "unexpected ' ' after the number"),
        (" all", 1, "expected a number"),
        ("node:^1", 1, "expected a number"),
        ("^^1", 1, "expected a number"),
        ("0x3", 1, "unexpected 'x3' after the number"),
        ("-1", 1, "number out of range"),
        ("18446744073709551616", 1, "number out of range"),
        ("4,node:", 3, "expected a number"),
    ],
)
def test_errors_have_columns(spec: str, col: int, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cpus(spec, source="cfg", line=7, col=10)
    (problem,) = info.value.problems
    assert (problem.source, problem.line, problem.col) == ("cfg", 7, 9 + col)
    assert f"({reason})" in problem.message


def test_every_bad_term_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        parse_cpus("x,1,y,^all", source="s")
    assert [p.col for p in info.value.problems] == [1, 5, 7]


def test_host_check_is_optional_and_placed() -> None:
    assert parse_cpus("40", source="s").terms == (CpuTerm(CpuTermKind.CPUS, 40, 40),)
    with pytest.raises(ConfigError) as info:
        parse_cpus("1,16,nodes:1-2,node:0", source="s", host=HOST16)
    assert [(p.col, p.message) for p in info.value.problems] == [
        (3, "cpus term '16' names CPU 16, but the host has CPUs 0-15"),
        (6, "cpus term 'nodes:1-2' names a NUMA node the host does not have (nodes: 0,1)"),
    ]
    assert parse_cpus("all,15,nodes:0-1", source="s", host=HOST16).resolve(16, HOST16.node_cpus)


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("all", "all"),
        ("nodes:all", "nodes:all"),
        ("0-3,^2", "0-3,^2"),
        ("node:1", "node:1"),
        ("nodes:0-1,^node:1", "nodes:0-1,^node:1"),
        ("nodes:1-1", "node:1"),
        ("3-3,,  7", "3,7"),
        ("", ""),
    ],
)
def test_format(spec: str, text: str) -> None:
    assert format_cpus(parse_cpus(spec, source="s")) == text
    assert str(parse_cpus(spec, source="s")) == text


_numbers = st.integers(min_value=0, max_value=2**64 - 2)


@st.composite
def _terms(draw: st.DrawFn) -> CpuTerm:
    kind = draw(st.sampled_from(CpuTermKind))
    if draw(st.booleans()):
        return CpuTerm(kind, None, None)
    first = draw(_numbers)
    last = draw(st.integers(min_value=first, max_value=2**64 - 2))
    return CpuTerm(kind, first, last, draw(st.booleans()))


@given(st.lists(_terms(), max_size=6))
def test_format_round_trips(terms: list[CpuTerm]) -> None:
    cpuset = CpuSet(tuple(terms))
    assert parse_cpus(format_cpus(cpuset), source="s") == cpuset


@given(st.text(alphabet="0123456789-^,:alnodes x+\t", max_size=30) | st.text(max_size=30))
def test_arbitrary_text_raises_only_config_error(spec: str) -> None:
    try:
        cpuset = parse_cpus(spec, source="s", host=HOST16)
    except ConfigError:
        return
    assert cpuset.resolve(16, HOST16.node_cpus) <= frozenset(range(16))
