"""What a verb is in the middle of, kept in the domain's record: :class:`Job`.

A verb that moves a domain through states that are not true at rest (a
QEMU started but not yet recorded, a snapshot half-taken, a disk added to
QEMU but not to the record) first records a job: the verb, the process that
runs it, and what it is about to do.  The job goes when the verb ends, on
success or on a handled failure.  When a xenlab process is killed in the
middle, its job stays, and the next command on the domain sees a job whose
owner is dead; that command finishes or undoes the step, reading the truth
from QEMU, and says what it did (see ``Toolstack.converge``).

An owner is identified by pid *and* the kernel's start time of that pid, so
a recycled pid is never taken for a live owner.  Jobs are plain JSON in
``DomainRecord.extra["job"]``; one job per domain, since every verb that
records one holds the domain's lock.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from xenlab.vm.runtime import JOB
from xenlab.vm.store import DomainRecord

__all__ = ["JOB", "RECOVERY", "Job", "job_of", "new_job", "orphan", "process_start"]

# DomainRecord.extra key holding the job.

# Verbs whose interrupted jobs another module finishes or undoes (its
# ``recover_job(ts, rec, job) -> DomainRecord | None``); imported only when
# such a job is found, so a `vm list` does not load the snapshot code.
RECOVERY: Final[dict[str, str]] = {
    "block-attach": "xenlab.vm.disks",
    "save": "xenlab.vm.migration.saverestore",
    "migrate": "xenlab.vm.migration.sender",
    "mirror": "xenlab.vm.mirror",
    "network-attach": "xenlab.vm.network",
    "network-detach": "xenlab.vm.network",
    "block-detach": "xenlab.vm.disks",
    "snapshot-create": "xenlab.vm.snaprecover",
    "snapshot-revert": "xenlab.vm.snaprecover",
    "snapshot-delete": "xenlab.vm.snaprecover",
}


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name; starttime is field 22.
    rest = stat.rsplit(")", 1)[-1].split()
    if len(rest) < 20 or rest[0] == "Z":
        return None
    try:
        return int(rest[19])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Job:
    """A verb in progress on a domain: ``verb``, its owner (``pid``, ``since``), ``detail``."""

    verb: str
    pid: int
    since: int
    detail: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def owner_alive(self) -> bool:
        """True while the process that recorded the job still runs."""
        return process_start(self.pid) == self.since

    def mine(self) -> bool:
        """True when this process recorded the job."""
        return self.pid == os.getpid() and self.owner_alive()

    def to_json(self) -> dict[str, Any]:
        """The job as stored in the record."""
        return {"verb": self.verb, "pid": self.pid, "since": self.since,
                "detail": dict(self.detail)}


def new_job(verb: str, **detail: Any) -> Job:
    """A job of this process."""
    pid = os.getpid()
    since = process_start(pid)
    assert since is not None  # this process runs
    return Job(verb, pid, since, detail)


def orphan(job: Job) -> Job:
    """``job`` with no owner (pid 0 never runs): the next command finishes or undoes it."""
    return Job(job.verb, 0, 0, job.detail)


def job_of(rec: DomainRecord) -> Job | None:
    """The job recorded in ``rec``, or None (also for a malformed one)."""
    raw = rec.extra.get(JOB)
    if not isinstance(raw, dict):
        return None
    try:
        detail = raw.get("detail") or {}
        return Job(str(raw["verb"]), int(raw["pid"]), int(raw["since"]),
                   dict(detail) if isinstance(detail, dict) else {})
    except (KeyError, TypeError, ValueError):
        return None
