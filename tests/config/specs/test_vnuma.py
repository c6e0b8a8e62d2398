"""Tests of xenlab.config.specs.vnuma: xl's vnuma= setting and its checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlab.config.errors import ConfigError
from xenlab.config.parser import parse
from xenlab.config.specs.vnuma import VnumaNode, parse_vnuma, vnuma_to_libxl_json
from xenlab.config.values import Value

TWO_NODES = (
    ("pnode=0", "size=512", "vcpus=0-1", "vdistances=10,20"),
    ("pnode=1", "size=1024", "vcpus=2,3", "vdistances=20,10"),
)


def nodes(*specs: tuple[str, ...]) -> Value:
    return tuple(tuple(spec) for spec in specs)


def problems(value: Value, **kw: int) -> list[str]:
    """Parse ``value`` expecting failure; return 'line:col: message' of every problem."""
    with pytest.raises(ConfigError) as info:
        parse_vnuma(value, source="g.cfg", line=12, col=9, **kw)
    assert all(p.source == "g.cfg" for p in info.value.problems)
    return [f"{p.line}:{p.col}: {p.message}" for p in info.value.problems]


def test_two_nodes() -> None:
    assert parse_vnuma(nodes(*TWO_NODES), source="g", line=1) == (
        VnumaNode(pnode=0, size_mib=512, vcpus=(0, 1), vdistances=(10, 20)),
        VnumaNode(pnode=1, size_mib=1024, vcpus=(2, 3), vdistances=(20, 10)),
    )


def test_from_a_parsed_file_with_spaces_and_matching_totals() -> None:
    cfg = parse(
        'vnuma = [ [ " pnode = 1 ", "size==256", "vcpus=0-1,,", "vdistances=10, 10" ],\n'
        '          [ "vdistances=10,10", "vcpus=2", "size=256", "pnode=0" ] ]\n',
        source="g.cfg",
    )
    setting = cfg.get("vnuma")
    assert setting is not None
    result = parse_vnuma(
        setting.value, source="g.cfg", line=setting.line, maxmem_mib=512, maxvcpus=3
    )
    assert result == (
        VnumaNode(1, 256, (0, 1), (10, 10)),
        VnumaNode(0, 256, (2,), (10, 10)),
    )
    assert vnuma_to_libxl_json(result) == [
        {"memkb": 262144, "distances": [10, 10], "pnode": 1, "vcpus": [0, 1]},
        {"memkb": 262144, "distances": [10, 10], "pnode": 0, "vcpus": [2]},
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "vnuma must be a list of vnode lists, got a string"),
        (("pnode=0",), "vnode 0: expected a list of KEY=VALUE strings"),
        (
            (("pnode=0", ("size=1",), "vcpus=0", "vdistances=10"),),
            "vnode 0: expected a KEY=VALUE string, got a list",
        ),
        ((("pnode", "size=1", "vcpus=0", "vdistances=10"),), "vnode 0: option 'pnode' is not"),
        ((("pnode=", "size=1", "vcpus=0", "vdistances=10"),), "vnode 0: option 'pnode=' is not"),
        ((("=0", "size=1", "vcpus=0", "vdistances=10"),), "vnode 0: option '=0' is not KEY=VALUE"),
        (
            (("pnodes=0", "size=1", "vcpus=0", "vdistances=10"),),
            "vnode 0: unknown option 'pnodes', expected one of pnode, size, vcpus, vdistances",
        ),
        (
            (("pnode=0", "size=1", "size=1", "vcpus=0", "vdistances=10"),),
            "vnode 0: option 'size' given twice",
        ),
        (
            (("pnode=0", "vcpus=0"),),
            "vnode 0: missing size, vdistances (all four are mandatory)",
        ),
        (
            (("pnode=zero", "size=1", "vcpus=0", "vdistances=10"),),
            "vnode 0: pnode 'zero' is not a number",
        ),
        (
            (("pnode=0", "size=1G", "vcpus=0", "vdistances=10"),),
            "vnode 0: size '1G' is not a number of MiB",
        ),
        (
            (("pnode=0", "size=-2", "vcpus=0", "vdistances=10"),),
            "vnode 0: size '-2' is not a number of MiB",
        ),
        (
            (("pnode=0", "size=1", "vcpus=x", "vdistances=10"),),
            "vnode 0: invalid vCPU range 'x', expected N or A-B",
        ),
        (
            (("pnode=0", "size=1", "vcpus=3-1", "vdistances=10"),),
            "vnode 0: vCPU range '3-1' goes backwards",
        ),
        (
            (("pnode=0", "size=1", "vcpus=0-999999", "vdistances=10"),),
            "vnode 0: vCPU list '0-999999' names more vCPUs than any guest can have",
        ),
        (
            (("pnode=0", "size=1", "vcpus=0,0", "vdistances=10"),),
            "vnode 0: a vCPU is listed twice",
        ),
        (
            (("pnode=0", "size=1", "vcpus=0", "vdistances=ten"),),
            "vnode 0: vdistance 'ten' is not a number",
        ),
    ],
)
def test_each_vnode_check_fails_at_the_value(value: Value, message: str) -> None:
    (got,) = problems(value)
    assert got.startswith(f"12:9: {message}")


def test_vdistances_must_have_one_entry_per_vnode() -> None:
    value = nodes(
        ("pnode=0", "size=1", "vcpus=0", "vdistances=10,20,30"),
        ("pnode=0", "size=1", "vcpus=1", "vdistances=10"),
    )
    assert problems(value) == [
        "12:9: vnode 0: vdistances has 3 entries, expected one per vnode (2)",
        "12:9: vnode 1: vdistances has 1 entries, expected one per vnode (2)",
    ]


def test_local_distance_must_not_exceed_a_remote_one() -> None:
    value = nodes(
        ("pnode=0", "size=1", "vcpus=0", "vdistances=10,20"),
        ("pnode=0", "size=1", "vcpus=1", "vdistances=15,30"),
    )
    assert problems(value) == [
        "12:9: vnode 1: distance to vnode 0 (15) is smaller than the local distance (30)"
    ]


def test_pnode_must_exist_on_the_host_when_known() -> None:
    value = nodes(*TWO_NODES)
    assert parse_vnuma(value, source="g", line=1, host_nodes=2)
    assert problems(value, host_nodes=1) == [
        "12:9: vnode 1: invalid pnode 1: the host has 1 node(s)"
    ]


def test_sizes_must_sum_to_maxmem() -> None:
    assert parse_vnuma(nodes(*TWO_NODES), source="g", line=1, maxmem_mib=1536)
    assert problems(nodes(*TWO_NODES), maxmem_mib=2048) == [
        "12:9: maxmem=2048 does not match the vnode sizes, which sum to 1536"
    ]


def test_vcpu_count_must_match_maxvcpus() -> None:
    assert problems(nodes(*TWO_NODES), maxvcpus=6) == [
        "12:9: the vnodes name 4 vCPUs but maxvcpus=6",
        "12:9: vCPU(s) 4, 5 are not in any vnode",
    ]


def test_every_vcpu_in_exactly_one_vnode() -> None:
    value = nodes(
        ("pnode=0", "size=1", "vcpus=0-1", "vdistances=10,20"),
        ("pnode=0", "size=1", "vcpus=1,3", "vdistances=20,10"),
    )
    assert problems(value) == [
        # xl counts vCPU 1 twice, so the guest has 4 vCPUs and vCPU 3 is fine.
        "12:9: vCPU 1 is in both vnode 0 and vnode 1",
        "12:9: vCPU(s) 2 are not in any vnode",
    ]
    gap = nodes(("pnode=0", "size=1", "vcpus=0,2", "vdistances=10"))
    assert problems(gap) == [
        "12:9: vCPU 2 (vnode 0) is beyond the guest's 2 vCPUs",
        "12:9: vCPU(s) 1 are not in any vnode",
    ]


def test_problems_of_several_vnodes_are_all_reported() -> None:
    value = nodes(
        ("pnode=x", "size=1", "vcpus=0", "vdistances=10,20"),
        ("pnode=0", "size=y", "vcpus=1", "vdistances=20,10"),
    )
    assert problems(value) == [
        "12:9: vnode 0: pnode 'x' is not a number",
        "12:9: vnode 1: size 'y' is not a number of MiB",
    ]


def test_empty_list_is_no_vnodes() -> None:
    assert parse_vnuma((), source="g", line=1) == ()


_values: st.SearchStrategy[Value] = st.recursive(
    st.text(alphabet="pnodesizvcuta=0123456789,-^ x", max_size=20),
    lambda inner: st.lists(inner, max_size=4).map(tuple),
    max_leaves=12,
)


@given(_values, st.none() | st.integers(0, 8), st.none() | st.integers(0, 4096))
def test_arbitrary_values_raise_only_config_error(
    value: Value, maxvcpus: int | None, maxmem: int | None
) -> None:
    try:
        result = parse_vnuma(value, source="g", line=1, maxvcpus=maxvcpus, maxmem_mib=maxmem)
    except ConfigError:
        return
    assert all(len(node.vdistances) == len(result) for node in result)
