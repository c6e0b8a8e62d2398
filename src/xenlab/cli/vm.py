"""``xenlab vm`` (an xl-like toolstack on QEMU) and ``xenlab image`` (the guest image)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click
from rich.table import Table

from xenlab.cli.output import emit_json, printable, stdout
from xenlab.vm.domain import DomainStatus, Toolstack

_STATE = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="XENLAB_STATE_DIR",
    help="Where the toolstack keeps its state (default ~/.local/state/xenlab).",
)


def _ts(state_dir: Path | None) -> Toolstack:
    return Toolstack(state_dir)


def _status_json(s: DomainStatus) -> dict[str, object]:
    r = s.record
    return {
        "domid": r.domid, "name": r.name, "uuid": r.uuid, "state": s.state,
        "memory_mib": s.memory_mib, "vcpus": s.vcpus, "seconds": round(s.seconds, 1),
        "pid": r.pid, "config": r.config_path, "accel": r.accel,
    }


@click.group()
def vm() -> None:
    """Run guests from xl domain configs, with QEMU as hypervisor and device model."""


@vm.command("create")
@click.argument("cfg", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused after creating it.")
@click.option("-c", "console", is_flag=True, help="Attach to the console after creating it.")
@click.option("--create-disks", metavar="SIZE",
              help="Create missing disk files of this size (e.g. 64M) with qemu-img.")
@_STATE
def create_cmd(cfg: Path, overrides: Sequence[str], paused: bool, console: bool,
               create_disks: str | None, state_dir: Path | None) -> None:
    """Create a domain from CFG; OVERRIDES are key=value lines, as with xl create."""
    for o in overrides:
        if "=" not in o:
            raise click.UsageError(f"override {o!r} is not key=value")
    ts = _ts(state_dir)
    rec = ts.create(cfg, overrides, paused=paused, create_disks=create_disks)
    stdout.print(f"created domain {printable(rec.name)} (id {rec.domid}), {rec.state}")
    if console:
        from xenlab.vm.console import attach

        attach(ts.paths(rec).console)


@vm.command("list")
@click.option("-l", "--long", "as_json", is_flag=True, help="JSON, one object per domain.")
@_STATE
def list_cmd(as_json: bool, state_dir: Path | None) -> None:
    """List domains, live and stale."""
    rows = _ts(state_dir).list()
    if as_json:
        emit_json([_status_json(s) for s in rows])
        return
    t = Table(box=None)
    for col in ("Name", "ID", "Mem", "VCPUs", "State", "Time(s)"):
        t.add_column(col, justify="right" if col in ("ID", "Mem", "VCPUs", "Time(s)") else "left")
    for s in rows:
        t.add_row(printable(s.record.name), str(s.record.domid), str(s.memory_mib or "-"),
                  str(s.vcpus or "-"), s.state, f"{s.seconds:.1f}")
    stdout.print(t)


@vm.command("destroy")
@click.argument("domain")
@_STATE
def destroy_cmd(domain: str, state_dir: Path | None) -> None:
    """Kill DOMAIN's QEMU at once and forget it (clears stale state too)."""
    rec = _ts(state_dir).destroy(domain)
    stdout.print(f"destroyed {printable(rec.name)} (id {rec.domid})")


@vm.command("undefine")
@click.argument("domain")
@_STATE
def undefine_cmd(domain: str, state_dir: Path | None) -> None:
    """Forget a shut-off DOMAIN and its snapshot records (its disk files stay)."""
    rec = _ts(state_dir).undefine(domain)
    stdout.print(f"forgot {printable(rec.name)} (id {rec.domid})")


@vm.command("shutdown")
@click.argument("domain")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@click.option("-F", "--force", is_flag=True, help="Destroy the domain if it does not stop.")
@_STATE
def shutdown_cmd(domain: str, timeout: float, force: bool, state_dir: Path | None) -> None:
    """Press DOMAIN's ACPI power button and wait for it to stop."""
    how = _ts(state_dir).shutdown(domain, timeout=timeout, force=force)
    stdout.print(f"{domain}: {how}")


@vm.command("reboot")
@click.argument("domain")
@_STATE
def reboot_cmd(domain: str, state_dir: Path | None) -> None:
    """Reset DOMAIN."""
    _ts(state_dir).reboot(domain)


@vm.command("pause")
@click.argument("domain")
@_STATE
def pause_cmd(domain: str, state_dir: Path | None) -> None:
    """Pause DOMAIN's vCPUs."""
    _ts(state_dir).pause(domain)


@vm.command("unpause")
@click.argument("domain")
@_STATE
def unpause_cmd(domain: str, state_dir: Path | None) -> None:
    """Resume DOMAIN's vCPUs."""
    _ts(state_dir).unpause(domain)


@vm.command("console")
@click.argument("domain")
@click.option("--timeout", type=float, help="Detach after this many seconds.")
@_STATE
def console_cmd(domain: str, timeout: float | None, state_dir: Path | None) -> None:
    """Attach to DOMAIN's serial console (Ctrl-] detaches)."""
    from xenlab.vm.console import attach

    ts = _ts(state_dir)
    attach(ts.paths(ts.get(domain)).console, timeout=timeout)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("domain")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", default=60.0, show_default=True)
@_STATE
def exec_cmd(domain: str, argv: Sequence[str], timeout: float, state_dir: Path | None) -> None:
    """Run a command in DOMAIN through its guest agent: xenlab vm exec DOM -- CMD ARGS."""
    code, out, err = _ts(state_dir).exec(domain, list(argv), timeout=timeout)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.stderr.buffer.write(err)
    sys.stderr.flush()
    if code:
        raise click.exceptions.Exit(code)


@vm.command("info")
@click.argument("domain")
@_STATE
def info_cmd(domain: str, state_dir: Path | None) -> None:
    """DOMAIN's record, configuration sizes and live QEMU facts, as JSON."""
    from xenlab.vm.resources import info

    emit_json(info(_ts(state_dir), domain))


@vm.command("mem-set")
@click.argument("domain")
@click.argument("mib", type=int)
@click.option("--timeout", default=30.0, show_default=True)
@_STATE
def mem_set_cmd(domain: str, mib: int, timeout: float, state_dir: Path | None) -> None:
    """Balloon DOMAIN to MIB MiB and show what the guest reports back."""
    from xenlab.vm.resources import mem_set

    r = mem_set(_ts(state_dir), domain, mib, timeout=timeout)
    guest = f", guest MemTotal {r.guest_total_kib} kB" if r.guest_total_kib else ""
    stdout.print(f"{domain}: target {r.target_mib} MiB, balloon reports {r.actual_mib} MiB"
                 f"{guest}" + ("" if r.reached else " (target not reached yet)"))


@vm.command("mem-max")
@click.argument("domain")
@click.argument("mib", type=int)
@_STATE
def mem_max_cmd(domain: str, mib: int, state_dir: Path | None) -> None:
    """Set the most DOMAIN may be ballooned up to (within what it was started with)."""
    from xenlab.vm.resources import mem_max

    stdout.print(f"{domain}: maxmem {mem_max(_ts(state_dir), domain, mib)} MiB")


@vm.command("vcpu-set")
@click.argument("domain")
@click.argument("count", type=int)
@_STATE
def vcpu_set_cmd(domain: str, count: int, state_dir: Path | None) -> None:
    """Set the number of DOMAIN's online vCPUs (1..maxvcpus)."""
    from xenlab.vm.resources import vcpu_set

    r = vcpu_set(_ts(state_dir), domain, count)
    stdout.print(f"{domain}: {r.vcpus} vCPU(s); the guest has {r.guest_online} online "
                 f"({r.guest_cpus})")


@vm.command("vcpu-list")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True)
@_STATE
def vcpu_list_cmd(domain: str, as_json: bool, state_dir: Path | None) -> None:
    """DOMAIN's vCPUs: host CPU, state, time and affinity, as xl vcpu-list shows them."""
    from xenlab.vm.resources import format_vcpu_list, vcpu_list

    rows = vcpu_list(_ts(state_dir), domain)
    if as_json:
        emit_json([{"vcpu": r.vcpu, "cpu": r.cpu, "state": r.state, "time_s": r.time_s,
                    "affinity": sorted(r.affinity), "thread_id": r.thread_id} for r in rows])
    else:
        click.echo(format_vcpu_list(rows))


@vm.command("vcpu-pin")
@click.argument("domain")
@click.argument("vcpu")
@click.argument("cpus")
@_STATE
def vcpu_pin_cmd(domain: str, vcpu: str, cpus: str, state_dir: Path | None) -> None:
    """Pin DOMAIN's VCPU (a number or all) to host CPUS (xl's syntax: 0-1, ^1, all)."""
    from xenlab.vm.resources import vcpu_pin

    arg: int | str = vcpu if vcpu == "all" else int(vcpu)
    for v, c in sorted(vcpu_pin(_ts(state_dir), domain, arg, cpus).items()):
        stdout.print(f"vcpu {v}: {','.join(str(x) for x in sorted(c))}")


@vm.command("rename")
@click.argument("domain")
@click.argument("new_name")
@_STATE
def rename_cmd(domain: str, new_name: str, state_dir: Path | None) -> None:
    """Rename DOMAIN."""
    from xenlab.vm.resources import rename

    rec = rename(_ts(state_dir), domain, new_name)
    stdout.print(f"renamed {printable(domain)} to {printable(rec.name)}")


@click.group()
def image() -> None:
    """The project's guest image: a Debian kernel and a busybox initramfs with qemu-ga."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the cached image is current.")
@click.option("--json", "as_json", is_flag=True)
def image_build_cmd(force: bool, as_json: bool) -> None:
    """Build (or find in the cache) the guest image and print where it is."""
    from xenlab.vm.image import build_image

    img = build_image(force=force)
    data = {"kernel": str(img.kernel), "initrd": str(img.initrd),
            "kernel_version": img.kernel_version, "cmdline": img.cmdline, "key": img.key}
    if as_json:
        emit_json(data)
    else:
        for k, v in data.items():
            stdout.print(f"{k:15} {v}")
