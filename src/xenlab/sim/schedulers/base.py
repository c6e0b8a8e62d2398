"""The scheduler interface, in the shape of Xen's ``struct scheduler``: :class:`Scheduler`.

Hook names are Xen's (xen/common/sched/private.h), so a model maps onto the C
it stands for: ``attach``, ``insert_unit``/``remove_unit``, ``wake``,
``sleep``, ``do_schedule`` (account the current vCPU, requeue it, return a
:class:`Decision`; with ``idle_forced``, idle), ``pick_resource``,
``context_saved``, ``yield_``, ``adjust`` and ``dump``.  A scheduler only ever
looks at, queues for or tickles its cpupool's pCPUs, and never chooses a vCPU
running on another pCPU.  ``check_params`` is the pure form of the checks
``insert_unit`` and ``adjust`` make (refusals are :class:`ParamError` naming
the ``key``), so checking a scenario and running it give one answer.  Times
are integer nanoseconds; :class:`SchedulerBase` gives the optional hooks as
no-ops.  The design (what each hook must do) is in docs/schedulers.md, section
Scheduler interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from xenlab.errors import SimError

if TYPE_CHECKING:
    from xenlab.sim.host import Host
    from xenlab.sim.model import Domain, Pcpu, Vcpu


@dataclass(frozen=True, slots=True)
class Decision:
    """What ``do_schedule`` chose: ``vcpu`` (None: idle) for at most ``slice_ns``."""

    vcpu: Vcpu | None
    slice_ns: int | None = None


IDLE = Decision(None, None)


class ParamError(SimError):
    """A scheduler parameter or option is refused; ``key`` names it, ``reason`` says why.

    ``related`` are the other keys the broken rule reads (a budget's period),
    so a caller can name the one its user actually wrote.  ``domain`` is set
    when the parameters are a domain's; the message then starts ``domain
    NAME:``, as the host's other errors about a domain do.
    """

    def __init__(self, key: str, reason: str, *, related: tuple[str, ...] = (),
                 domain: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.related = related
        self.domain = domain
        super().__init__(f"domain {domain}: {reason}" if domain is not None else reason)

    def for_domain(self, name: str) -> ParamError:
        """The same refusal, about domain ``name``."""
        return ParamError(self.key, self.reason, related=self.related, domain=name)

    def __reduce__(self) -> tuple[Any, ...]:
        # A sweep's worker sends errors back pickled; args alone hold only the message.
        return (_param_error, (self.key, self.reason, self.related, self.domain))


def _param_error(key: str, reason: str, related: tuple[str, ...],
                 domain: str | None) -> ParamError:
    return ParamError(key, reason, related=related, domain=domain)


class Scheduler(Protocol):
    """What the host calls; see the module notes for each hook's contract."""

    name: ClassVar[str]

    def attach(self, host: Host, *, cpus: tuple[int, ...] | None = None) -> None: ...
    def insert_unit(self, v: Vcpu) -> None: ...
    def remove_unit(self, v: Vcpu) -> None: ...
    def wake(self, v: Vcpu) -> None: ...
    def sleep(self, v: Vcpu) -> None: ...
    def do_schedule(self, pcpu: Pcpu, now: int, idle_forced: bool) -> Decision: ...
    def pick_resource(self, v: Vcpu) -> int: ...
    def context_saved(self, v: Vcpu) -> None: ...
    def yield_(self, v: Vcpu) -> None: ...
    def adjust(self, dom: Domain, params: Mapping[str, Any]) -> dict[str, Any]: ...
    def dump(self) -> dict[str, Any]: ...


class SchedulerBase:
    """Plumbing for schedulers: the host, parameter checks, no-op optional hooks.

    Subclasses set ``name`` and ``PARAMS`` (the per-domain parameters they
    read, with defaults) and implement the required hooks.
    """

    name: ClassVar[str] = "base"
    #: Per-domain parameters (xl sched-* names) and their defaults.
    PARAMS: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._host: Host | None = None

    @property
    def host(self) -> Host:
        """The host this scheduler runs (set by :meth:`attach`)."""
        if self._host is None:
            raise SimError(f"scheduler {self.name} is not attached to a host")
        return self._host

    def attach(self, host: Host, *, cpus: tuple[int, ...] | None = None) -> None:
        """Called once by the host before any vCPU is inserted.

        ``cpus`` are the pCPUs of this scheduler's cpupool (None: all of them);
        a scheduler touches no other pCPU (their ``priv`` is another's).
        """
        self._host = host
        self.pool_cpus: tuple[int, ...] = (
            tuple(range(len(host.pcpus))) if cpus is None else tuple(cpus))

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters a domain giving ``params`` runs with (defaults filled in).

        Pure: the same checks ``insert_unit`` and ``adjust`` make, without a host.
        :class:`ParamError` naming the first parameter refused.
        """
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            known = ", ".join(sorted(cls.PARAMS)) or "none"
            raise ParamError(unknown[0], f"{cls.name} has no parameter {', '.join(unknown)} "
                             f"(it takes: {known})")
        full = {**cls.PARAMS, **params}
        cls.check_values(full)
        return full

    @classmethod
    def check_values(cls, params: Mapping[str, Any]) -> None:
        """Check a full set of parameters (every key of ``PARAMS``); none to check here."""

    def params_of(self, dom: Domain) -> dict[str, Any]:
        """The domain's parameters for this scheduler: defaults, then the domain's own.

        SimError for a parameter this scheduler does not know.
        """
        unknown = sorted(set(dom.params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(sorted(self.PARAMS)) or "none"
            raise SimError(f"domain {dom.name}: {self.name} has no parameter "
                           f"{', '.join(unknown)} (it takes: {known})")
        return {**self.PARAMS, **dom.params}

    def sleep(self, v: Vcpu) -> None:
        """Required hook (see the module notes)."""
        raise NotImplementedError

    def remove_unit(self, v: Vcpu) -> None:
        """Default: sleep it (off every queue)."""
        self.sleep(v)

    def context_saved(self, v: Vcpu) -> None:
        """Optional hook: nothing to do."""

    def yield_(self, v: Vcpu) -> None:
        """Optional hook: nothing to do."""

    def pick_resource(self, v: Vcpu) -> int:
        """Default: where it ran last, if allowed, else the first allowed pCPU."""
        if v.affinity is None or v.processor in v.affinity:
            return v.processor
        return min(v.affinity)

    def adjust(self, dom: Domain, params: Mapping[str, Any]) -> dict[str, Any]:
        """Default: check and store the parameters; they apply from the next decision."""
        merged = {**dom.params, **params}
        probe = type(dom)(dom.id, dom.name, merged)
        self.params_of(probe)
        dom.params = merged
        return self.params_of(dom)

    def dump(self) -> dict[str, Any]:
        """Default: the name only."""
        return {"scheduler": self.name}
