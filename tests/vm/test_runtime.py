"""vm.runtime: the typed run-time facts of a record, their JSON, and where a disk runs now."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from xenlab.vm.runtime import (
    DISK_NODES,
    DISK_PATHS,
    OVERLAYS,
    DiskFile,
    Overlay,
    Runtime,
    disk_now,
)

_name = st.text("abcdxyz-0123456789", min_size=1, max_size=8)
_path = st.text("/abc.-_é,=", min_size=1, max_size=20)
_count = st.none() | st.integers(0, 1 << 20)
_specs = st.none() | st.lists(st.text(max_size=30), max_size=3).map(tuple)

runtimes = st.builds(
    Runtime,
    moved=st.dictionaries(_name, st.builds(DiskFile, _path, st.sampled_from(["qcow2", "raw"]))),
    nodes=st.dictionaries(_name, _name),
    overlays=st.dictionaries(_name, st.builds(Overlay, _path, _name)),
    current_snapshot=_count,
    stale_nodes=st.dictionaries(_name, st.lists(_name, max_size=3).map(tuple)),
    vifs=st.lists(st.dictionaries(_name, _name, max_size=3), max_size=2).map(tuple),
    vif_specs=_specs, disk_specs=_specs, vcpus_plugged=_count, vcpus=_count,
    memory_mib=_count, maxmem_mib=_count, qemu_name=st.none() | _name, defined=st.booleans(),
    job=st.none() | st.dictionaries(_name, st.integers(), max_size=3),
    other=st.dictionaries(st.sampled_from(["future_key", "x"]), st.integers(), max_size=2),
)


@given(runtimes)
def test_runtime_round_trips_through_its_json(rt: Runtime) -> None:
    assert Runtime.from_extra(rt.to_extra()) == rt


def test_a_record_of_todays_release_reads_whole() -> None:
    # As the verbs of the release before vm.runtime wrote them (tests/vm/truth.py checks
    # every record the integration tests make the same way).
    extra: dict[str, Any] = {
        DISK_PATHS: {"xvda": {"file": "/v/moved.qcow2", "format": "qcow2"}},
        DISK_NODES: {"xvda": "xvda--mirror1"},
        OVERLAYS: {"xvdb": {"file": "/v/b.s1.qcow2", "node": "xvdb-s1"}},
        "current_snapshot": 3, "stale_nodes": {"xvdc": ["xvdc-fmt", "xvdc-file"]},
        "vifs": [{"devid": 0, "tap": "xltap1.0"}], "vif_specs": ["bridge=br0"],
        "disk_specs": ["format=raw,vdev=xvda,target=/v/a"], "vcpus_plugged": 2,
        "vcpus": 1, "memory_mib": 96, "maxmem_mib": 128, "qemu_name": "old",
        "defined": True, "job": {"verb": "destroy", "pid": 1},
    }
    rt = Runtime.from_extra(extra)
    assert rt.to_extra() == extra and not rt.other
    assert rt.moved == {"xvda": DiskFile("/v/moved.qcow2", "qcow2")}
    assert rt.overlays == {"xvdb": Overlay("/v/b.s1.qcow2", "xvdb-s1")}


def test_wrong_shapes_read_as_absent_and_unknown_keys_are_kept() -> None:
    rt = Runtime.from_extra({DISK_PATHS: "junk", OVERLAYS: {"xvda": 5}, "vcpus": True,
                             "memory_mib": "96", "future": [1]})
    assert rt == Runtime(other={"future": [1]})


def test_disk_now_follows_pivots_and_overlays() -> None:
    plain = disk_now(Runtime(), "xvda", "/cfg/a.raw", "raw")
    assert (plain.file, plain.format, plain.node, plain.overlay) == (
        "/cfg/a.raw", "raw", "xvda-fmt", False)
    moved = Runtime(moved={"xvda": DiskFile("/m/a.qcow2", "qcow2")},
                    nodes={"xvda": "xvda--mirror1"})
    now = disk_now(moved, "xvda", "/cfg/a.raw", "raw")
    assert (now.file, now.format, now.node, now.base) == (
        "/m/a.qcow2", "qcow2", "xvda--mirror1", DiskFile("/m/a.qcow2", "qcow2"))
    # An external snapshot after the pivot: the overlay on top, the moved file under it.
    both = Runtime(moved=moved.moved, nodes=moved.nodes,
                   overlays={"xvda": Overlay("/s/a.s1.qcow2", "xvda-s1")})
    top = disk_now(both, "xvda", "/cfg/a.raw", "raw")
    assert (top.file, top.format, top.node, top.overlay) == (
        "/s/a.s1.qcow2", "qcow2", "xvda-s1", True)
    assert top.base == DiskFile("/m/a.qcow2", "qcow2")
    # Another disk is untouched by xvda's facts.
    assert disk_now(both, "xvdb", "/cfg/b.qcow2", "qcow2").file == "/cfg/b.qcow2"
