"""The cpus mini-language of xl (``cpus=``, ``cpus_soft=``, ``xl vcpu-pin``): :func:`parse_cpus`.

A spec such as ``"all,^nodes:1,3-5"`` is a comma-separated list of terms,
applied left to right to an initially empty set:

* ``N`` or ``A-B`` adds host CPUs, ``node:N`` / ``nodes:A-B`` adds every CPU
  of those NUMA nodes, ``all`` (also spelled ``nodes:all``) adds every CPU;
* a leading ``^`` removes instead of adding (``^all`` is an error).

Nodes cannot be turned into CPUs without knowing the host, so a
:class:`CpuSet` keeps the *symbolic* terms; :meth:`CpuSet.resolve` applies
them to a topology and :func:`format_cpus` writes them back.

Design
    We follow xl's ``parse_cpurange``/``update_cpumap_range`` (xl_parse.c)
    term by term, including the corners that come from C's ``strtok`` and
    ``strtoul``: empty terms are skipped (``",3,,"`` is ``"3"``), so an empty
    spec is the empty set; a number may have leading white space and a sign,
    and a negative number wraps modulo 2**64 as strtoul does (only the result
    ``ULONG_MAX`` is refused, so ``"-1"`` is an error and ``"-2"`` names a CPU
    no host has).  Anything after the number or range is an error.

Defaults (with reasons)
    :meth:`CpuSet.resolve` drops CPUs at or above ``nr_cpus`` and nodes the
    topology does not list, because libxl's bitmaps silently ignore bits
    beyond their size.  Passing ``host=`` to :func:`parse_cpus` instead turns
    such numbers into errors: that check is ours (xl would build a smaller,
    possibly empty, affinity without a word).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from xenlab.config.clib import ULONG_MAX, strtoul
from xenlab.config.errors import ConfigError
from xenlab.errors import Problem

__all__ = [
    "CpuSet",
    "CpuTerm",
    "CpuTermKind",
    "HostTopology",
    "format_cpus",
    "parse_cpus",
]


class CpuTermKind(enum.Enum):
    """What the numbers of a term count."""

    CPUS = "cpus"
    NODES = "nodes"


@dataclass(frozen=True, slots=True)
class CpuTerm:
    """One comma-separated term: CPUs or nodes ``first..last``, or all of them.

    ``first`` and ``last`` are both None for ``all``; otherwise
    ``first <= last``.
    """

    kind: CpuTermKind
    first: int | None
    last: int | None
    exclude: bool = False

    @property
    def is_all(self) -> bool:
        """True for ``all`` / ``nodes:all``."""
        return self.first is None


@dataclass(frozen=True, slots=True)
class HostTopology:
    """The CPUs of a host and which NUMA node each belongs to.

    ``node_cpus`` maps each node number to its CPUs.
    """

    nr_cpus: int
    node_cpus: Mapping[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def uniform(cls, nr_nodes: int, cpus_per_node: int) -> HostTopology:
        """Build a host whose node ``n`` has CPUs ``n*k .. n*k+k-1``."""
        nodes = {
            n: frozenset(range(n * cpus_per_node, (n + 1) * cpus_per_node)) for n in range(nr_nodes)
        }
        return cls(nr_nodes * cpus_per_node, nodes)


@dataclass(frozen=True, slots=True)
class CpuSet:
    """A parsed cpus spec: its terms in order, still symbolic."""

    terms: tuple[CpuTerm, ...]

    def resolve(self, nr_cpus: int, node_cpus: Mapping[int, frozenset[int]]) -> frozenset[int]:
        """Apply the terms to a host with ``nr_cpus`` CPUs and the given nodes.

        CPUs at or above ``nr_cpus`` and unknown nodes are ignored, as libxl's
        bitmaps ignore bits beyond their size.
        """
        result: set[int] = set()
        for term in self.terms:
            if term.is_all:
                chosen: set[int] = set(range(nr_cpus))
            elif term.kind is CpuTermKind.CPUS:
                assert term.first is not None and term.last is not None
                # Huge ranges are legal; clip before building the set.
                chosen = set(range(term.first, min(term.last, nr_cpus - 1) + 1))
            else:
                assert term.first is not None and term.last is not None
                chosen = set()
                for node, cpus in node_cpus.items():
                    if term.first <= node <= term.last:
                        chosen.update(cpu for cpu in cpus if 0 <= cpu < nr_cpus)
            if term.exclude:
                result -= chosen
            else:
                result |= chosen
        return frozenset(result)

    def __str__(self) -> str:
        return format_cpus(self)


def _strtoul(text: str, pos: int) -> tuple[int, int] | None:
    """C's ``strtoul(text+pos, &end, 10)``: (value, end), or None when no digits."""
    value, end = strtoul(text, 10, pos)
    return None if end == pos else (value, end)


def _parse_range(text: str) -> tuple[int, int] | str:
    """xl's ``parse_range``: ``N`` or ``A-B``; a reason string when invalid."""
    got = _strtoul(text, 0)
    if got is None:
        return "expected a number"
    first, end = got
    if first == ULONG_MAX:
        return "number out of range"
    last = first
    if end < len(text) and text[end] == "-":
        got = _strtoul(text, end + 1)
        if got is None:
            return "expected a number after '-'"
        last, end = got
        if last == ULONG_MAX:
            return "number out of range"
        if last < first:
            return f"range {first}-{last} goes backwards"
    if end != len(text):
        return f"unexpected {text[end:]!r} after the number"
    return first, last


def _parse_term(text: str) -> CpuTerm | str:
    body = text
    exclude = body.startswith("^")
    if exclude:
        body = body[1:]
    kind = CpuTermKind.CPUS
    for prefix in ("node:", "nodes:"):
        if body.startswith(prefix):
            kind = CpuTermKind.NODES
            body = body[len(prefix) :]
            break
    if body == "all":
        if exclude:
            return "'^' cannot be combined with 'all'"
        return CpuTerm(kind, None, None, False)
    got = _parse_range(body)
    if isinstance(got, str):
        return got
    return CpuTerm(kind, got[0], got[1], exclude)


def _missing_on_host(term: CpuTerm, host: HostTopology) -> str | None:
    """Say what ``term`` names that ``host`` lacks, or None."""
    if term.is_all:
        return None
    assert term.first is not None and term.last is not None
    if term.kind is CpuTermKind.CPUS:
        if term.last < host.nr_cpus:
            return None
        return f"names CPU {term.last}, but the host has CPUs 0-{host.nr_cpus - 1}"
    # Check the span first: a range may be astronomically long.
    if term.last - term.first < len(host.node_cpus) and all(
        n in host.node_cpus for n in range(term.first, term.last + 1)
    ):
        return None
    nodes = ",".join(str(n) for n in sorted(host.node_cpus)) or "none"
    return f"names a NUMA node the host does not have (nodes: {nodes})"


def parse_cpus(
    spec: str,
    *,
    source: str,
    host: HostTopology | None = None,
    line: int = 1,
    col: int = 1,
) -> CpuSet:
    """Parse a cpus spec exactly as xl's ``parse_cpurange`` does.

    ``line`` and ``col`` place the spec's first character in a larger text
    (for a standalone spec keep 1, 1).  With ``host``, a CPU or node the host
    does not have is an error too (our check; xl ignores it).  Raises
    :class:`ConfigError` listing every bad term with its column.
    """
    problems: list[Problem] = []
    terms: list[CpuTerm] = []
    pos = 0
    for piece in spec.split(","):
        here = pos
        pos += len(piece) + 1
        if not piece:
            continue  # strtok skips empty tokens
        got = _parse_term(piece)
        if isinstance(got, str):
            problems.append(
                Problem(
                    source,
                    line,
                    col + here,
                    f"invalid cpus term {piece!r} ({got}); expected N, A-B, 'all',"
                    " or 'node:'/'nodes:' before one of those, optionally after '^'",
                )
            )
            continue
        missing = _missing_on_host(got, host) if host is not None else None
        if missing is not None:
            problems.append(Problem(source, line, col + here, f"cpus term {piece!r} {missing}"))
        terms.append(got)
    if problems:
        raise ConfigError(problems)
    return CpuSet(tuple(terms))


def _format_term(term: CpuTerm) -> str:
    if term.is_all:
        return "all" if term.kind is CpuTermKind.CPUS else "nodes:all"
    assert term.first is not None and term.last is not None
    numbers = str(term.first) if term.first == term.last else f"{term.first}-{term.last}"
    if term.kind is CpuTermKind.NODES:
        numbers = ("node:" if term.first == term.last else "nodes:") + numbers
    return ("^" if term.exclude else "") + numbers


def format_cpus(cpuset: CpuSet) -> str:
    """Write a CpuSet back as a spec; ``parse_cpus(format_cpus(s)) == s``."""
    return ",".join(_format_term(term) for term in cpuset.terms)
