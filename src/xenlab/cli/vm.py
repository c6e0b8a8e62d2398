"""``xenlab vm`` (an xl-like toolstack on QEMU) and ``xenlab image`` (the guest image)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click
from rich.table import Table

from xenlab.cli.loop import command_loop, go
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
@click.pass_context
def vm(ctx: click.Context) -> None:
    """Run guests from xl domain configs, with QEMU as hypervisor and device model."""
    # One event loop for the whole command, however many backend calls it makes.
    ctx.with_resource(command_loop())


@vm.command("create")
@click.argument("cfg", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused after creating it.")
@click.option("-c", "console", is_flag=True, help="Attach to the console after creating it.")
@click.option("--create-disks", metavar="SIZE",
              help="Create missing disk files of this size (e.g. 64M) with qemu-img.")
@click.option("--wait", "wait", type=float, metavar="SECONDS",
              help="Wait until the guest agent answers (the guest is up).")
@click.option("-n", "--dry-run", "dry_run", is_flag=True,
              help="Print the QEMU command line and the host actions; start nothing (xl -n).")
@click.option("--json", "as_json", is_flag=True, help="With -n: the plan as JSON.")
@_STATE
def create_cmd(cfg: Path, overrides: Sequence[str], paused: bool, console: bool,
               create_disks: str | None, wait: float | None, dry_run: bool, as_json: bool,
               state_dir: Path | None) -> None:
    """Create a domain from CFG; OVERRIDES are key=value lines, as with xl create."""
    for o in overrides:
        if "=" not in o:
            raise click.UsageError(f"override {o!r} is not key=value")
    ts = _ts(state_dir)
    if dry_run:
        from xenlab.vm.dryrun import plan_create

        plan = go(plan_create(ts, cfg, overrides, paused=paused, create_disks=create_disks))
        if as_json:
            emit_json(plan.to_json())
            return
        kept = " (a kept domain, started again)" if plan.kept else ""
        click.echo(f"# domain {printable(plan.name)}, id {plan.domid}{kept}: not started")
        for line in plan.actions():
            click.echo(f"# {printable(line)}")
        # qemu_argv refuses control characters, so a newline is only a separator.
        for line in plan.shell().split("\n"):
            click.echo(printable(line))
        return
    if as_json:
        raise click.UsageError("--json goes with -n")
    t0 = time.perf_counter()
    rec = go(ts.create(cfg, overrides, paused=paused, create_disks=create_disks))
    stdout.print(f"created domain {printable(rec.name)} (id {rec.domid}), {rec.state}")
    if wait is not None and not paused:
        go(ts.wait_ready(rec.name, timeout=wait))
        stdout.print(f"{printable(rec.name)}: guest up after {time.perf_counter() - t0:.1f} s")
    if console:
        from xenlab.vm.console import attach

        attach(ts.open_console(rec.name))


@vm.command("list")
@click.option("-l", "--long", "as_json", is_flag=True, help="JSON, one object per domain.")
@_STATE
def list_cmd(as_json: bool, state_dir: Path | None) -> None:
    """List domains, live and stale."""
    rows = go(_ts(state_dir).list())
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
    rec = go(_ts(state_dir).destroy(domain))
    stdout.print(f"destroyed {printable(rec.name)} (id {rec.domid})")


@vm.command("define")
@click.argument("cfg", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@_STATE
def define_cmd(cfg: Path, overrides: Sequence[str], state_dir: Path | None) -> None:
    """Record CFG's domain as shut off without starting it (it stays after shutdowns)."""
    rec = go(_ts(state_dir).define(cfg, overrides))
    stdout.print(f"defined {printable(rec.name)} (id {rec.domid}), shut off")


@vm.command("undefine")
@click.argument("domain")
@_STATE
def undefine_cmd(domain: str, state_dir: Path | None) -> None:
    """Forget a shut-off DOMAIN and its snapshot records (its disk files stay)."""
    rec = go(_ts(state_dir).undefine(domain))
    stdout.print(f"forgot {printable(rec.name)} (id {rec.domid})")


@vm.command("shutdown")
@click.argument("domain")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait.")
@click.option("-F", "--force", is_flag=True, help="Destroy the domain if it does not stop.")
@_STATE
def shutdown_cmd(domain: str, timeout: float, force: bool, state_dir: Path | None) -> None:
    """Press DOMAIN's ACPI power button and wait for it to stop."""
    how = go(_ts(state_dir).shutdown(domain, timeout=timeout, force=force))
    stdout.print(f"{domain}: {how}")


@vm.command("reboot")
@click.argument("domain")
@click.option("-F", "--force", is_flag=True, help="Reset at once instead of asking the guest.")
@_STATE
def reboot_cmd(domain: str, force: bool, state_dir: Path | None) -> None:
    """Reboot DOMAIN: through its guest agent, else a reset."""
    how = go(_ts(state_dir).reboot(domain, force=force))
    stdout.print(f"{domain}: {how}")


@vm.command("pause")
@click.argument("domain")
@_STATE
def pause_cmd(domain: str, state_dir: Path | None) -> None:
    """Pause DOMAIN's vCPUs."""
    go(_ts(state_dir).pause(domain))


@vm.command("unpause")
@click.argument("domain")
@_STATE
def unpause_cmd(domain: str, state_dir: Path | None) -> None:
    """Resume DOMAIN's vCPUs."""
    go(_ts(state_dir).unpause(domain))


@vm.command("console")
@click.argument("domain")
@click.option("--timeout", type=float, help="Detach after this many seconds.")
@_STATE
def console_cmd(domain: str, timeout: float | None, state_dir: Path | None) -> None:
    """Attach to DOMAIN's serial console (Ctrl-] detaches)."""
    from xenlab.vm.console import attach

    ts = _ts(state_dir)
    attach(ts.open_console(domain), timeout=timeout)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("domain")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", default=60.0, show_default=True)
@_STATE
def exec_cmd(domain: str, argv: Sequence[str], timeout: float, state_dir: Path | None) -> None:
    """Run a command in DOMAIN through its guest agent: xenlab vm exec DOM -- CMD ARGS."""
    code, out, err = go(_ts(state_dir).exec(domain, list(argv), timeout=timeout))
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

    emit_json(go(info(_ts(state_dir), domain)))


@vm.command("mem-set")
@click.argument("domain")
@click.argument("mib", type=int)
@click.option("--timeout", default=30.0, show_default=True)
@_STATE
def mem_set_cmd(domain: str, mib: int, timeout: float, state_dir: Path | None) -> None:
    """Balloon DOMAIN to MIB MiB and show what the guest reports back."""
    from xenlab.vm.resources import mem_set

    r = go(mem_set(_ts(state_dir), domain, mib, timeout=timeout))
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

    stdout.print(f"{domain}: maxmem {go(mem_max(_ts(state_dir), domain, mib))} MiB")


@vm.command("vcpu-set")
@click.argument("domain")
@click.argument("count", type=int)
@_STATE
def vcpu_set_cmd(domain: str, count: int, state_dir: Path | None) -> None:
    """Set the number of DOMAIN's online vCPUs (1..maxvcpus)."""
    from xenlab.vm.resources import vcpu_set

    r = go(vcpu_set(_ts(state_dir), domain, count))
    stdout.print(f"{domain}: {r.vcpus} vCPU(s); the guest has {r.guest_online} online "
                 f"({r.guest_cpus})")


@vm.command("vcpu-list")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True)
@_STATE
def vcpu_list_cmd(domain: str, as_json: bool, state_dir: Path | None) -> None:
    """DOMAIN's vCPUs: host CPU, state, time and affinity, as xl vcpu-list shows them."""
    from xenlab.vm.resources import format_vcpu_list, vcpu_list

    rows = go(vcpu_list(_ts(state_dir), domain))
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
    for v, c in sorted(go(vcpu_pin(_ts(state_dir), domain, arg, cpus)).items()):
        stdout.print(f"vcpu {v}: {','.join(str(x) for x in sorted(c))}")


@vm.command("rename")
@click.argument("domain")
@click.argument("new_name")
@_STATE
def rename_cmd(domain: str, new_name: str, state_dir: Path | None) -> None:
    """Rename DOMAIN."""
    from xenlab.vm.resources import rename

    rec = go(rename(_ts(state_dir), domain, new_name))
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


def _size(text: str) -> int:
    """``64M``, ``1G``, ``4096`` (bytes) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    mult = units.get(t[-1:], 1)
    try:
        return int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError as err:
        raise click.BadParameter(f"{text!r} is not a size like 64M") from err


@vm.command("save")
@click.argument("domain")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-c", "--keep-running", is_flag=True, help="Leave the domain running after.")
@click.option("--snapshot", is_flag=True,
              help="Snapshot the (qcow2) disks with the memory; restore reverts them.")
@_STATE
def save_cmd(domain: str, file: Path, keep_running: bool, snapshot: bool,
             state_dir: Path | None) -> None:
    """Save DOMAIN's memory and config to FILE (xl save); the domain stops unless -c.

    The image carries XXH64 checksums of its header and of every MiB of the
    state, so restore refuses a damaged or cut image.
    """
    from xenlab.vm.migration.saverestore import save

    h = go(save(_ts(state_dir), domain, file, keep_running=keep_running, snapshot=snapshot))
    stdout.print(f"saved {printable(domain)} to {printable(str(file))}"
                 + (f" (disk snapshot {printable(h.disk_snapshots[0].name)})"
                    if h.disk_snapshots else ""))


@vm.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("-p", "paused", is_flag=True, help="Leave the restored domain paused.")
@_STATE
def restore_cmd(file: Path, overrides: Sequence[str], paused: bool,
                state_dir: Path | None) -> None:
    """Restore a domain from FILE made by `xenlab vm save` (xl restore).

    The whole image is checked first: a damaged or cut one is refused,
    naming the offset, before any QEMU starts.  Images from before
    checksums are restored with a warning.
    """
    from xenlab.vm.migration.saverestore import restore

    rec = go(restore(_ts(state_dir), file, paused=paused, overrides=overrides))
    stdout.print(f"restored {printable(rec.name)} (id {rec.domid}), {rec.state}")


def _print_progress(p: object) -> None:
    from xenlab.vm.backend import MigrationProgress

    assert isinstance(p, MigrationProgress)
    if p.total:
        pct = 100 * (p.total - p.remaining) / p.total
        click.echo(f"\r{p.phase}: {pct:5.1f}% of {p.total >> 20} MiB", nl=False, err=True)


def _print_mirror(p: object) -> None:
    from xenlab.vm.mirror import MirrorProgress

    assert isinstance(p, MirrorProgress)
    if p.total:
        click.echo(f"\r{p.vdev}: {100 * p.done / p.total:5.1f}% of {p.total >> 20} MiB"
                   + (" (ready)" if p.ready else ""), nl=False, err=True)


@vm.command("mirror")
@click.argument("domain")
@click.argument("vdev")
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-pivot", is_flag=True, help="Only copy: the guest keeps its disk.")
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2",
              show_default=True, help="The target image's format.")
@click.option("--bandwidth", metavar="SIZE", help="Limit the copy, per second (e.g. 64M).")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@_STATE
def mirror_cmd(domain: str, vdev: str, target: Path, no_pivot: bool, fmt: str,
               bandwidth: str | None, timeout: float, state_dir: Path | None) -> None:
    """Copy DOMAIN's disk VDEV to a new image TARGET, then switch the guest to it."""
    from xenlab.vm.mirror import mirror

    r = go(mirror(_ts(state_dir), domain, vdev, target, format=fmt, pivot=not no_pivot,
               bandwidth=_size(bandwidth) if bandwidth else None, timeout=timeout,
               progress=_print_mirror if sys.stderr.isatty() else None))
    click.echo("", err=True)
    done = f"now runs on {printable(r.target)}" if r.pivoted else \
        f"copied to {printable(r.target)}"
    stdout.print(f"{printable(domain)} {vdev}: {done} ({r.bytes >> 20} MiB in "
                 f"{r.seconds:.2f} s)")


@vm.command("migrate")
@click.argument("domain")
@click.argument("dest")
@click.option("--with-storage", is_flag=True, help="Mirror the disks to the destination first.")
@click.option("--offline", is_flag=True, help="Pause the guest during the migration.")
@click.option("-p", "paused", is_flag=True, help="Leave the domain paused at the destination.")
@click.option("--max-bandwidth", metavar="SIZE", help="Limit the stream, per second (e.g. 64M).")
@click.option("--dest-state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Migrate to a second toolstack on this host (DEST is then its host name).")
@click.option("--token", metavar="TOKEN",
              help="The token `xenlab vm receive` printed (others on this host can see it "
                   "in ps: --token-file is safer).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="A file holding the receiver's token.")
@_STATE
def migrate_cmd(domain: str, dest: str, with_storage: bool, offline: bool, paused: bool,
                max_bandwidth: str | None, dest_state_dir: Path | None, token: str | None,
                token_file: Path | None, state_dir: Path | None) -> None:
    """Live-migrate DOMAIN to DEST (HOST:PORT where `xenlab vm receive --listen` waits,
    with the token it printed)."""
    from xenlab.vm.migration.channel import read_token
    from xenlab.vm.migration.sender import migrate

    if token is not None and token_file is not None:
        raise click.UsageError("give --token or --token-file, not both")
    target: Toolstack | str = Toolstack(dest_state_dir) if dest_state_dir else dest
    r = go(migrate(_ts(state_dir), domain, target, live=not offline, with_storage=with_storage,
                paused=paused, max_bandwidth=_size(max_bandwidth) if max_bandwidth else None,
                progress=_print_progress if sys.stderr.isatty() else None,
                token=read_token(token_file) if token_file is not None else token))
    click.echo("", err=True)
    stdout.print(f"migrated {printable(domain)} in {r.seconds:.2f} s (downtime "
                 f"{r.downtime_ms} ms, {r.ram_transferred >> 20} MiB of RAM)")


@vm.command("receive")
@click.option("--listen", "listen", required=True, metavar="HOST:PORT",
              help="Where to wait for `xenlab vm migrate` (port 0: any free port).")
@click.argument("overrides", nargs=-1)
@click.option("-p", "paused", is_flag=True, help="Leave the received domain paused.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the stream.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Take the token from this file instead of making a new one.")
@click.option("--disk-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The directory the source may name disks (and kernel/ramdisk) in; "
                   "without it only OVERRIDES name files here.")
@click.option("--trust-peer-config", is_flag=True,
              help="Take the whole config from the source, files and settings that run "
                   "programs or hand host resources to the guest included.")
@_STATE
def receive_cmd(listen: str, overrides: Sequence[str], paused: bool, timeout: float,
                token_file: Path | None, disk_dir: Path | None, trust_peer_config: bool,
                state_dir: Path | None) -> None:
    """Receive one domain migrated here (xl migrate-receive); OVERRIDES are key=value
    lines appended to its config (e.g. disk paths on this host).

    Prints the address and a new one-time token (unless --token-file gives
    it): only a `xenlab vm migrate ... --token TOKEN` that has it is heard.
    From the source's config only keys known to be safe are taken; disk
    paths only inside --disk-dir.  Refused requests are reported and the
    wait goes on.  The token travels in clear, and the ports QEMU opens for
    the stream and the disks take any connection while the migration runs
    (xl migrates over ssh): listen on a private network (a management VLAN,
    a VPN), never on an address strangers reach.
    """
    from xenlab.vm.migration.channel import new_token, read_token
    from xenlab.vm.migration.receiver import serve_receive

    for o in overrides:
        if "=" not in o:
            raise click.UsageError(f"override {o!r} is not key=value")
    token = read_token(token_file) if token_file is not None else new_token()

    def listening(host: str, port: int) -> None:
        shown = f"(token from {token_file})" if token_file is not None else f"token {token}"
        click.echo(f"listening on {host}:{port} {shown}")
        sys.stdout.flush()

    rec = go(serve_receive(_ts(state_dir), listen, token=token,
                        trust_peer_config=trust_peer_config, disk_dir=disk_dir,
                        overrides=overrides, paused=paused, timeout=timeout,
                        on_listen=listening))
    stdout.print(f"received {printable(rec.name)} (id {rec.domid}), {rec.state}")


vm.add_command(receive_cmd, "migrate-receive")


@vm.command("snapshot-create")
@click.argument("domain")
@click.argument("name")
@click.option("--disk-only", is_flag=True, help="Disks only, no memory.")
@click.option("--memory", is_flag=True, help="With memory (the default for internal ones).")
@click.option("--external", is_flag=True, help="qcow2 overlays instead of internal snapshots.")
@click.option("--live", is_flag=True, help="External with memory, without pausing first.")
@click.option("--description", default="")
@_STATE
def snapshot_create_cmd(domain: str, name: str, disk_only: bool, memory: bool, external: bool,
                        live: bool, description: str, state_dir: Path | None) -> None:
    """Take snapshot NAME of DOMAIN (running, paused or shut off)."""
    from xenlab.vm.snapshot import create_snapshot

    t0 = time.perf_counter()
    s = go(create_snapshot(_ts(state_dir), domain, name, disk_only=disk_only, memory=memory,
                        external=external, live=live, description=description))
    stdout.print(f"snapshot {printable(s.name)} of {printable(domain)} ({s.kind.value}) "
                 f"in {time.perf_counter() - t0:.2f} s")


@vm.command("snapshot-list")
@click.argument("domain")
@click.option("--tree", is_flag=True, help="As a tree (the default prints one per line).")
@click.option("--json", "as_json", is_flag=True)
@_STATE
def snapshot_list_cmd(domain: str, tree: bool, as_json: bool, state_dir: Path | None) -> None:
    """DOMAIN's snapshots; * marks the current one."""
    from xenlab.vm.snapshot import list_snapshots

    st = list_snapshots(_ts(state_dir), domain)
    if as_json:
        emit_json(st.to_json())
    elif tree:
        for line in st.lines():
            click.echo(printable(line))
    else:
        t = Table(box=None)
        for col in ("Name", "Kind", "State", "Created", "Parent", "Description"):
            t.add_column(col)

        def walk(nodes: Sequence[object], parent: str) -> None:
            from xenlab.vm.store import SnapshotNode

            for n in nodes:
                assert isinstance(n, SnapshotNode)
                s = n.snapshot
                mark = "*" if s.name == st.current else ""
                t.add_row(printable(s.name) + mark, s.kind.value, s.state.value,
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)),
                          printable(parent), printable(s.description))
                walk(n.children, s.name)

        walk(st.roots, "-")
        stdout.print(t)


@vm.command("snapshot-revert")
@click.argument("domain")
@click.argument("name")
@click.option("--running/--paused", default=None, help="State after the revert.")
@_STATE
def snapshot_revert_cmd(domain: str, name: str, running: bool | None,
                        state_dir: Path | None) -> None:
    """Revert DOMAIN to snapshot NAME (internal or external; a running domain is
    restarted when the snapshot holds memory it cannot load in place)."""
    from xenlab.vm.snapshot import revert_snapshot

    t0 = time.perf_counter()
    rec = go(revert_snapshot(_ts(state_dir), domain, name, running=running))
    stdout.print(f"{printable(domain)} reverted to {printable(name)} ({rec.state}) in "
                 f"{time.perf_counter() - t0:.2f} s")


@vm.command("snapshot-delete")
@click.argument("domain")
@click.argument("name")
@click.option("--children", is_flag=True, help="Delete its descendants too.")
@_STATE
def snapshot_delete_cmd(domain: str, name: str, children: bool, state_dir: Path | None) -> None:
    """Delete DOMAIN's snapshot NAME."""
    from xenlab.vm.snapshot import delete_snapshot

    gone = go(delete_snapshot(_ts(state_dir), domain, name, children=children))
    stdout.print("deleted " + ", ".join(printable(s.name) for s in gone))


@vm.command("snapshot-info")
@click.argument("domain")
@click.argument("name")
@_STATE
def snapshot_info_cmd(domain: str, name: str, state_dir: Path | None) -> None:
    """One snapshot of DOMAIN, as JSON."""
    from xenlab.vm.snapshot import snapshot_info

    i = go(snapshot_info(_ts(state_dir), domain, name))
    s = i.record
    emit_json({
        "name": s.name, "kind": s.kind.value, "state": s.state.value, "created": s.created,
        "description": s.description, "parent": i.parent, "children": list(i.children),
        "current": i.current, "memory": i.has_memory, "vm_state_bytes": i.vm_state_bytes,
        "disks": [dict(d) for d in s.disks], "memory_path": s.memory_path,
    })


@vm.command("network-attach")
@click.argument("domain")
@click.argument("items", nargs=-1)
@_STATE
def network_attach_cmd(domain: str, items: Sequence[str], state_dir: Path | None) -> None:
    """Plug a NIC into running DOMAIN; ITEMS make one xl vif spec (bridge=xlbr0 mac=...)."""
    from xenlab.vm.network import network_attach

    i = go(network_attach(_ts(state_dir), domain, list(items)))
    where = f"tap {i.tap} ({i.mode}" + (f" on {i.bridge})" if i.bridge else ")") if i.tap \
        else "user network"
    stdout.print(f"{printable(domain)}: vif {i.devid} attached, {i.mac}, {where}")


@vm.command("network-detach")
@click.argument("domain")
@click.argument("which", metavar="DEVID|MAC")
@click.option("--timeout", default=30.0, show_default=True,
              help="Seconds to wait for the guest to release the NIC.")
@_STATE
def network_detach_cmd(domain: str, which: str, timeout: float, state_dir: Path | None) -> None:
    """Unplug NIC DEVID (or the one with MAC) from running DOMAIN and remove its tap."""
    from xenlab.vm.network import network_detach

    i = go(network_detach(_ts(state_dir), domain, which, timeout=timeout))
    stdout.print(f"{printable(domain)}: vif {i.devid} ({i.mac}) detached")


@vm.command("network-list")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True)
@_STATE
def network_list_cmd(domain: str, as_json: bool, state_dir: Path | None) -> None:
    """DOMAIN's NICs: devid, MAC, model, how it reaches the host (user, bridge, script), tap."""
    from xenlab.vm.network import network_list

    rows = network_list(_ts(state_dir), domain)
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    t = Table(box=None)
    for col in ("Idx", "MAC", "Model", "Mode", "Bridge", "Tap", "MTU"):
        t.add_column(col, justify="right" if col in ("Idx", "MTU") else "left")
    for r in rows:
        t.add_row(str(r.devid), r.mac, r.model, r.mode, r.bridge or "-", r.tap or "-",
                  str(r.mtu or "-"))
    stdout.print(t)


@vm.command("block-attach")
@click.argument("domain")
@click.argument("spec")
@click.option("--create-disks", "create_size", metavar="SIZE",
              help="Create the target (qemu-img) when it does not exist.")
@_STATE
def block_attach_cmd(domain: str, spec: str, create_size: str | None,
                     state_dir: Path | None) -> None:
    """Plug the disk xl disk SPEC describes into running DOMAIN (virtio, xvda-xvdh)."""
    from xenlab.vm.disks import block_attach

    d = go(block_attach(_ts(state_dir), domain, spec, create_size=create_size))
    stdout.print(f"{printable(domain)}: {d.vdev} attached ({printable(d.file or '-')}, "
                 f"{d.format}, {d.mode}, PCI slot {d.slot:#x})")


@vm.command("block-detach")
@click.argument("domain")
@click.argument("vdev")
@click.option("--timeout", default=30.0, show_default=True,
              help="Seconds to wait for the guest to release the disk.")
@_STATE
def block_detach_cmd(domain: str, vdev: str, timeout: float, state_dir: Path | None) -> None:
    """Unplug disk VDEV from running DOMAIN (the image file stays)."""
    from xenlab.vm.disks import block_detach

    d = go(block_detach(_ts(state_dir), domain, vdev, timeout=timeout))
    stdout.print(f"{printable(domain)}: {d.vdev} detached ({printable(d.file or '-')} kept)")


@vm.command("block-list")
@click.argument("domain")
@click.option("--json", "as_json", is_flag=True)
@_STATE
def block_list_cmd(domain: str, as_json: bool, state_dir: Path | None) -> None:
    """DOMAIN's disks: vdev, device, the file in use now, format, mode, PCI slot."""
    from xenlab.vm.disks import block_list

    rows = block_list(_ts(state_dir), domain)
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    t = Table(box=None)
    for col in ("Vdev", "Device", "File", "Format", "Mode", "Slot"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.vdev, r.device, printable(r.file or "-"), r.format, r.mode,
                  f"{r.slot:#x}" if r.slot is not None else "-")
    stdout.print(t)


@vm.command("cd-insert")
@click.argument("domain")
@click.argument("vdev")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="raw", show_default=True,
              type=click.Choice(["raw", "qcow2"]), help="The image's format.")
@_STATE
def cd_insert_cmd(domain: str, vdev: str, target: Path, fmt: str,
                  state_dir: Path | None) -> None:
    """Put TARGET (an ISO) in running DOMAIN's cdrom drive VDEV (xl cd-insert)."""
    from xenlab.vm.disks import cd_insert

    d = go(cd_insert(_ts(state_dir), domain, vdev, str(target), fmt=fmt))
    stdout.print(f"{printable(domain)}: {d.vdev} holds {printable(d.file or '-')}")


@vm.command("cd-eject")
@click.argument("domain")
@click.argument("vdev")
@_STATE
def cd_eject_cmd(domain: str, vdev: str, state_dir: Path | None) -> None:
    """Take the medium out of running DOMAIN's cdrom drive VDEV (xl cd-eject)."""
    from xenlab.vm.disks import cd_eject

    d = go(cd_eject(_ts(state_dir), domain, vdev))
    stdout.print(f"{printable(domain)}: {d.vdev} is empty")
