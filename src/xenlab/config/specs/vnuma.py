"""Virtual NUMA nodes of xl's ``vnuma=`` setting: :func:`parse_vnuma`.

``vnuma = [ ["pnode=0", "size=512", "vcpus=0-1", "vdistances=10,20"], [...]
]`` gives one list of ``KEY=VALUE`` strings per virtual node, in vnode order.
The checks are xl's ``parse_vnuma_config`` (xl_parse.c), libxl's
``libxl__vnuma_config_check`` (libxl_vnuma.c, which libxl runs at domain
creation and this module runs at once) and ours, each with the reason xl or
libxl goes wrong without it; a new check needs its source or its reason.  The
list elements carry no positions, so every problem is placed at the value and
its message names the vnode.  The design (every check and where it comes from)
is in docs/config.md, section vNUMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from xenlab.config.clib import C_SPACE
from xenlab.config.errors import ConfigError
from xenlab.config.values import Value
from xenlab.errors import Problem

__all__ = ["VnumaNode", "parse_vnuma", "vnuma_to_libxl_json"]

_KEYS: Final = ("pnode", "size", "vcpus", "vdistances")
_MAX_NUMBER: Final = 2**64 - 2
# Far above Xen's limits (HVM_MAX_VCPUS is 128); only bounds our own work.
_MAX_VCPUS: Final = 2**16


@dataclass(frozen=True, slots=True)
class VnumaNode:
    """One virtual NUMA node: where it lives, its memory, vCPUs and distances."""

    pnode: int
    size_mib: int
    vcpus: tuple[int, ...]
    vdistances: tuple[int, ...]


def _number(text: str) -> int | None:
    if not text or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_NUMBER else None


def _vcpu_ranges(text: str) -> list[int] | str:
    """Parse ``0-3,5`` into vCPU numbers, or return why it is invalid."""
    result: list[int] = []
    for piece in text.split(","):
        piece = piece.strip(C_SPACE)
        if not piece:
            continue  # strtok skips empty tokens, as xl does
        first_text, dash, last_text = piece.partition("-")
        first = _number(first_text.strip(C_SPACE))
        last = _number(last_text.strip(C_SPACE)) if dash else first
        if first is None or last is None:
            return f"invalid vCPU range {piece!r}, expected N or A-B"
        if last < first:
            return f"vCPU range {piece!r} goes backwards"
        if len(result) + last - first >= _MAX_VCPUS:
            return f"vCPU list {text!r} names more vCPUs than any guest can have"
        result.extend(range(first, last + 1))
    if not result:
        return "no vCPUs given"
    return result


def parse_vnuma(
    value: Value,
    *,
    source: str,
    line: int,
    col: int = 1,
    maxmem_mib: int | None = None,
    maxvcpus: int | None = None,
    host_nodes: int | None = None,
) -> tuple[VnumaNode, ...]:
    """Parse and check a ``vnuma`` value; the checks are in docs/config.md, section vNUMA.

    ``maxmem_mib`` and ``maxvcpus`` are the explicit ``maxmem=``/``maxvcpus=``
    (None when absent: then the vnodes define them, as in xl).  With
    ``host_nodes``, a ``pnode`` must be below it.  Raises :class:`ConfigError`
    listing every problem, each placed at ``line``/``col``.

    Why one function: it follows libxlutil's ``parse_vnuma_config`` pass by pass (the
    vnodes, each vnode's keys, then the cross-checks), and the cross-checks need every
    vnode's values together.
    """
    problems: list[str] = []
    if isinstance(value, str):
        raise ConfigError(
            [Problem(source, line, col, "vnuma must be a list of vnode lists, got a string")]
        )
    count = len(value)
    nodes: list[VnumaNode] = []
    for index, spec in enumerate(value):
        where = f"vnode {index}"
        if isinstance(spec, str):
            problems.append(
                f"{where}: expected a list of KEY=VALUE strings such as"
                f' ["pnode=0", "size=512", "vcpus=0-1", "vdistances=10,20"], got a string'
            )
            continue
        seen: dict[str, str] = {}
        bad = False
        for option in spec:
            if not isinstance(option, str):
                # xl skips non-string options without a word; a lone skip
                # would then surface as a missing key, which is clearer.
                problems.append(f"{where}: expected a KEY=VALUE string, got a list")
                bad = True
                continue
            key, eq, rest = option.partition("=")
            key = key.strip(C_SPACE)
            # strtok: "size==512" is size/512, but "size=" or "=512" fail.
            rest = rest.lstrip("=").split("=", 1)[0].strip(C_SPACE)
            if not eq or not key or not rest:
                problems.append(f"{where}: option {option!r} is not KEY=VALUE")
                bad = True
                continue
            if key not in _KEYS:
                problems.append(
                    f"{where}: unknown option {key!r}, expected one of {', '.join(_KEYS)}"
                )
                bad = True
                continue
            if key in seen:
                problems.append(f"{where}: option {key!r} given twice")
                bad = True
                continue
            seen[key] = rest
        missing = [key for key in _KEYS if key not in seen]
        if missing and not bad:
            problems.append(f"{where}: missing {', '.join(missing)} (all four are mandatory)")
        if bad or missing:
            continue

        pnode = _number(seen["pnode"])
        if pnode is None:
            problems.append(f"{where}: pnode {seen['pnode']!r} is not a number")
        elif host_nodes is not None and pnode >= host_nodes:
            problems.append(f"{where}: invalid pnode {pnode}: the host has {host_nodes} node(s)")
        size = _number(seen["size"])
        if size is None:
            problems.append(f"{where}: size {seen['size']!r} is not a number of MiB")
        vcpus = _vcpu_ranges(seen["vcpus"])
        if isinstance(vcpus, str):
            problems.append(f"{where}: {vcpus}")
        distances: list[int] = []
        bad_distance = False
        for item in seen["vdistances"].split(","):
            item = item.strip(C_SPACE)
            if not item:
                continue
            number = _number(item)
            if number is None:
                problems.append(f"{where}: vdistance {item!r} is not a number")
                bad_distance = True
            else:
                distances.append(number)
        if bad_distance:
            distances = []  # reported above; the count would only repeat it
        elif len(distances) != count:
            problems.append(
                f"{where}: vdistances has {len(distances)} entries,"
                f" expected one per vnode ({count})"
            )
        elif distances and any(d < distances[index] for d in distances):
            far = min(range(count), key=lambda j: distances[j])
            problems.append(
                f"{where}: distance to vnode {far} ({distances[far]}) is smaller than the"
                f" local distance ({distances[index]})"
            )
        if pnode is None or size is None or isinstance(vcpus, str):
            continue
        nodes.append(VnumaNode(pnode, size, tuple(sorted(set(vcpus))), tuple(distances)))
        if len(set(vcpus)) != len(vcpus):
            problems.append(f"{where}: a vCPU is listed twice")

    if not problems and nodes:
        problems.extend(_check_totals(nodes, maxmem_mib, maxvcpus))
    if problems:
        raise ConfigError([Problem(source, line, col, message) for message in problems])
    return tuple(nodes)


def _check_totals(
    nodes: list[VnumaNode], maxmem_mib: int | None, maxvcpus: int | None
) -> list[str]:
    problems: list[str] = []
    total = sum(node.size_mib for node in nodes)
    if maxmem_mib is not None and maxmem_mib != total:
        problems.append(f"maxmem={maxmem_mib} does not match the vnode sizes, which sum to {total}")
    owner: dict[int, int] = {}
    named = 0
    for index, node in enumerate(nodes):
        named += len(node.vcpus)
        for vcpu in node.vcpus:
            if vcpu in owner:
                problems.append(f"vCPU {vcpu} is in both vnode {owner[vcpu]} and vnode {index}")
            else:
                owner[vcpu] = index
    if maxvcpus is not None and maxvcpus != named:
        problems.append(f"the vnodes name {named} vCPUs but maxvcpus={maxvcpus}")
    limit = maxvcpus if maxvcpus is not None else named
    for vcpu in sorted(owner):
        if vcpu >= limit:
            problems.append(
                f"vCPU {vcpu} (vnode {owner[vcpu]}) is beyond the guest's {limit} vCPUs"
            )
    unassigned = [v for v in range(limit) if v not in owner]
    if unassigned:
        shown = ", ".join(str(v) for v in unassigned[:8]) + (" ..." if len(unassigned) > 8 else "")
        problems.append(f"vCPU(s) {shown} are not in any vnode")
    return problems


def vnuma_to_libxl_json(nodes: tuple[VnumaNode, ...]) -> list[dict[str, object]]:
    """Return the vnodes as libxl's ``vnuma_nodes`` JSON (memkb, distances, pnode, vcpus)."""
    return [
        {
            "memkb": node.size_mib * 1024,
            "distances": list(node.vdistances),
            "pnode": node.pnode,
            "vcpus": list(node.vcpus),
        }
        for node in nodes
    ]
