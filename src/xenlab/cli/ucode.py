"""``xenlab ucode``: scan, select, extract and build early microcode, advise on Xen's ucode=.

What a scan skipped (a member over a limit, a name over PATH_MAX, the rest
of a decompression bomb) is printed on stderr, one ``skipped:`` line each,
after the output; JSON objects carry it as a ``skipped`` list, and ``scan``
exits 1 when anything was skipped, as when a broken part stopped it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TimeRemainingColumn
from rich.table import Table

from xenlab.atomic import atomic_write_bytes
from xenlab.cli.output import emit_json, printable, stderr, stdout
from xenlab.errors import XenlabError
from xenlab.ucode.cmdline import advice_to_json, advise
from xenlab.ucode.cpu import CpuId, Vendor, parse_cpu_spec, this_cpu
from xenlab.ucode.early import build_early
from xenlab.ucode.extract import (
    amd_bundle,
    firmware_files,
    intel_bundle,
    newest_only,
    write_tree,
)
from xenlab.ucode.load import apply_load, plan_load
from xenlab.ucode.scan import ScanResult, map_input, scan_buffer, scan_file, skipped_to_json
from xenlab.ucode.select import Selection, select
from xenlab.ucode.update import Update, location_to_json, update_to_json

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
# Inputs may be directories, as with iucode_tool: their regular files, sorted.
_INPUT = click.Path(exists=True, path_type=Path)
_PROGRESS_MIN = 64 << 20  # show a bar for files at least this big


@contextmanager
def _progress(total: int) -> Iterator[Progress | None]:
    if total < _PROGRESS_MIN or not stderr.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TimeRemainingColumn(), console=stderr, transient=True,
    ) as bar:
        yield bar


def _esc(text: str) -> str:
    """Untrusted text (file and member names, messages quoting them) for rich output."""
    return escape(printable(text))


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a directory stands for its regular files (not recursive), sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if c.is_file()))
        else:
            out.append(p)
    return out


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise XenlabError(f"{path}: cannot write: {err.strerror or err}") from err


def _scan_all(files: Sequence[Path], *, early_only: bool = False) -> list[ScanResult]:
    results = []
    for path in _expand(files):
        size = path.stat().st_size
        with _progress(size) as bar:
            if bar is None:
                results.append(scan_file(path, early_only=early_only))
                continue
            task = bar.add_task(f"scan {path.name}", total=size)

            def advance(done: int, total: int, _bar: Progress = bar, _task: TaskID = task) -> None:
                _bar.update(_task, completed=done)

            results.append(scan_file(path, early_only=early_only, progress=advance))
    return results


def _warn(results: Sequence[ScanResult]) -> None:
    for r in results:
        for f in r.findings:
            stderr.print(f"[yellow]warning[/]: {_esc(str(f))}", soft_wrap=True)
        for item in r.skipped:
            stderr.print(f"[yellow]skipped[/]: {_esc(str(item))}", soft_wrap=True)


def _skipped_json(results: Sequence[ScanResult]) -> list[dict[str, object]]:
    return [skipped_to_json(item) for r in results for item in r.skipped]


def _sigs(u: Update) -> str:
    if u.platforms:
        # An extended table often repeats the primary pair: show each pair once.
        return "\n".join(f"{s:#07x}/{m:#04x}" for s, m in dict.fromkeys(u.platforms))
    return "\n".join(f"{s:#07x}" for s in u.signatures) or "-"


def _table(updates: Sequence[Update], title: str | None = None) -> Table:
    t = Table(title=title, show_lines=False)
    for col in ("vendor", "signature/pf", "revision", "date", "size", "ok"):
        t.add_column(col, justify="right" if col in ("size",) else "left", no_wrap=True)
    t.add_column("where", overflow="fold")
    for u in updates:
        ok = "[green]yes[/]" if u.checksum_ok else "[red]NO[/]"
        early = " [cyan](early)[/]" if u.source.early else ""
        where = str(u.source).removeprefix(u.source.file)
        t.add_row(u.vendor.value, _sigs(u), f"{u.unsigned_revision:#x}", u.date, str(u.size),
                  ok, _esc(Path(u.source.file).name + where) + early)
    return t


def _cpu_option(cpu: str | None, this: bool) -> CpuId:
    if (cpu is None) == (not this):
        raise click.UsageError("give exactly one of --cpu SIG[,PF] and --this-cpu")
    return this_cpu() if this else parse_cpu_spec(cpu or "")


def _filter_vendor(updates: Sequence[Update], vendor: str | None) -> list[Update]:
    return [u for u in updates if vendor is None or u.vendor.value == vendor]


_VENDOR = click.option("--vendor", type=click.Choice(["intel", "amd"]), help="Only this vendor.")
_CPU = click.option("--cpu", "cpu_spec", metavar="SIG[,PF]",
                    help="CPU signature, e.g. 0x906a4,0x80, 06-9a-04, amd:0x800f12.")
_THIS = click.option("--this-cpu", "this", is_flag=True, help="Use this machine's CPU.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


@click.group()
def ucode() -> None:
    """CPU microcode: scan initrds and bundles, select, extract, build early cpios."""


@ucode.command("scan")
@click.argument("files", nargs=-1, required=True, type=_INPUT)
@click.option("--early-only", is_flag=True,
              help="Stop at the first compressed part, as the early loaders do.")
@_VENDOR
@_JSON
def scan_cmd(files: Sequence[Path], early_only: bool, vendor: str | None, as_json: bool) -> None:
    """List every microcode update in FILES (initrds, cpio, .bin/.dat bundles, any data)."""
    results = _scan_all(files, early_only=early_only)
    updates = _filter_vendor([u for r in results for u in r.updates], vendor)
    if as_json:
        # The contract is a list of updates; what was skipped goes to stderr
        # (and the exit status), as warnings do.
        emit_json([update_to_json(u) for u in updates])
        _warn(results)
        if not all(r.complete for r in results):
            raise click.exceptions.Exit(1)
        return
    for r in results:
        parts = ", ".join(
            f"{p.kind}{'/' + p.compression if p.compression else ''}@{p.offset:#x}"
            + (f" ({p.members} members)" if p.members else "")
            for p in r.parts
        )
        stdout.print(f"[bold]{_esc(r.file)}[/] ({r.size} bytes): "
                     + _esc(parts or "nothing recognised"))
    stdout.print(_table(updates))
    bad = sum(1 for u in updates if not u.checksum_ok)
    skipped = sum(len(r.skipped) for r in results)
    stdout.print(f"{len(updates)} update(s), {bad} failing checks"
                 + (f", {skipped} thing(s) skipped (see stderr)" if skipped else ""))
    _warn(results)
    if not all(r.complete for r in results):
        raise click.exceptions.Exit(1)


def _selection_json(sel: Selection, results: Sequence[ScanResult]) -> dict[str, object]:
    return {
        "cpu": {
            "vendor": sel.cpu.vendor.value if sel.cpu.vendor else None,
            "signature": sel.cpu.signature,
            "platform_mask": sel.cpu.platform_mask,
            "microcode_revision": sel.cpu.microcode_revision,
            "source": sel.cpu.source,
        },
        "selected": update_to_json(sel.chosen) if sel.chosen else None,
        "note": sel.note,
        "considered": [
            {"revision": v.update.revision, "date": v.update.date, "fits": v.fits,
             "chosen": v.chosen, "reason": v.reason, "source": location_to_json(v.update.source)}
            for v in sel.verdicts
        ],
        "skipped": _skipped_json(results),
    }


@ucode.command("select")
@click.argument("files", nargs=-1, required=True, type=_INPUT)
@_CPU
@_THIS
@click.option("--all", "show_all", is_flag=True, help="Explain every update, not just fitting.")
@_JSON
def select_cmd(files: Sequence[Path], cpu_spec: str | None, this: bool, show_all: bool,
               as_json: bool) -> None:
    """The update a CPU would load from FILES, and why the others were not chosen."""
    cpu = _cpu_option(cpu_spec, this)
    results = _scan_all(files)
    sel = select([u for r in results for u in r.updates], cpu)
    if as_json:
        emit_json(_selection_json(sel, results))
    else:
        pf = f", platform mask {cpu.platform_mask:#x}" if cpu.platform_mask is not None else ""
        vendor = cpu.vendor.value if cpu.vendor else "any vendor"
        stdout.print(f"CPU {cpu.signature:#x} ({vendor}{pf}; from {cpu.source})")
        if sel.chosen is None:
            stdout.print("[red]no update fits this CPU[/]")
        else:
            stdout.print(_table([sel.chosen], title="selected"))
        if sel.note:
            stdout.print(f"[yellow]{sel.note}[/]")
        t = Table(title="why not the others")
        for col in ("revision", "date", "verdict", "where"):
            t.add_column(col)
        for v in sel.verdicts:
            if v.chosen or (not v.fits and not show_all):
                continue
            t.add_row(f"{v.update.unsigned_revision:#x}", v.update.date, _esc(v.reason),
                      _esc(str(v.update.source)))
        if t.row_count:
            stdout.print(t)
        hidden = sum(1 for v in sel.verdicts if not v.fits)
        if hidden and not show_all:
            stdout.print(f"({hidden} update(s) for other CPUs not shown; --all shows them)")
    _warn(results)
    if sel.chosen is None:
        raise click.exceptions.Exit(1)


def _chosen_updates(files: Sequence[Path], cpu_spec: str | None, this: bool,
                    vendor: str | None, keep_all: bool) -> tuple[list[Update], list[ScanResult]]:
    results = _scan_all(files)
    updates = _filter_vendor([u for r in results for u in r.updates if u.checksum_ok], vendor)
    if cpu_spec is not None or this:
        sel = select(updates, _cpu_option(cpu_spec, this))
        updates = [sel.chosen] if sel.chosen else []
    elif not keep_all:
        updates = newest_only(updates)
    if not updates:
        raise XenlabError("no update to write: nothing found or nothing fits the CPU")
    return updates, results


@ucode.command("extract")
@click.argument("files", nargs=-1, required=True, type=_INPUT)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write the kernel firmware layout (intel-ucode/, amd-ucode/) here.")
@click.option("--bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one bundle file instead (Intel .bin or AMD container).")
@_CPU
@_THIS
@_VENDOR
@click.option("--all-revisions", is_flag=True, help="Keep older revisions too.")
@_JSON
def extract_cmd(files: Sequence[Path], output: Path | None, bundle: Path | None,
                cpu_spec: str | None, this: bool, vendor: str | None, all_revisions: bool,
                as_json: bool) -> None:
    """Write updates from FILES as firmware files (-o DIR) or one bundle (--bundle FILE)."""
    if (output is None) == (bundle is None):
        raise click.UsageError("give exactly one of -o DIR and --bundle FILE")
    updates, results = _chosen_updates(files, cpu_spec, this, vendor, all_revisions)
    written: list[str] = []
    if bundle is not None:
        vendors = {u.vendor for u in updates}
        if len(vendors) > 1:
            raise click.UsageError("a bundle holds one vendor: add --vendor intel|amd")
        data = intel_bundle(updates) if Vendor.INTEL in vendors else amd_bundle(updates)
        _write(bundle, data)
        written.append(str(bundle))
    else:
        assert output is not None
        written = [str(p) for p in write_tree(output, firmware_files(updates))]
    if as_json:
        emit_json({"written": written, "updates": [update_to_json(u) for u in updates],
                   "skipped": _skipped_json(results)})
    else:
        for w in written:
            stdout.print(f"wrote {_esc(w)}")
        stdout.print(f"{len(updates)} update(s) in {len(written)} file(s)")
    _warn(results)


@ucode.command("build-early")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "sources", multiple=True, required=True, type=_INPUT,
              help="Where the updates come from (bundles, firmware files, initrds).")
@click.option("--append-initrd", type=_FILE, help="Put the early cpio in front of this initrd.")
@click.option("--keep-old-early", is_flag=True,
              help="Keep the initrd's own early microcode archive instead of replacing it.")
@_CPU
@_THIS
@_VENDOR
@click.option("--check", is_flag=True, help="Scan the result and check the loaders see it.")
@_JSON
def build_early_cmd(out: Path, sources: Sequence[Path], append_initrd: Path | None,
                    keep_old_early: bool, cpu_spec: str | None, this: bool,
                    vendor: str | None, check: bool, as_json: bool) -> None:
    """Build OUT: an early-microcode cpio (Xen ucode=scan and Linux read it), optionally
    followed by an existing initrd."""
    updates, results = _chosen_updates(sources, cpu_spec, this, vendor, False)
    # Mapped, not read: only the part kept is copied into the image.
    initrd = map_input(append_initrd) if append_initrd else None
    image = build_early(updates, initrd, keep_old_early=keep_old_early,
                        source=str(append_initrd))
    report: dict[str, object] = {
        "output": str(out), "size": len(image.data), "early_size": image.early_size,
        "intel": image.intel_count, "amd": image.amd_count,
        "replaced_old_early_bytes": image.replaced_early,
        "skipped": _skipped_json(results),
    }
    if check:
        # Checked in memory, before OUT is touched: a failed check leaves it as it was.
        got = scan_buffer(image.data, str(out), early_only=True)
        want = {u.raw for u in updates}
        seen = {u.raw for u in got.updates if u.source.early}
        missing = len(want - seen)
        report["check"] = {"early_updates": len(seen), "missing": missing}
        if missing:
            raise XenlabError(f"{out}: check failed: {missing} update(s) not visible to the "
                              "early loaders; nothing written")
    _write(out, image.data)
    if as_json:
        emit_json(report)
    else:
        stdout.print(f"wrote {_esc(str(out))}: {image.intel_count} Intel and {image.amd_count} AMD "
                     f"update(s) in a {image.early_size}-byte early cpio"
                     + (f", then {_esc(str(append_initrd))}" if append_initrd else ""))
        if image.replaced_early:
            stdout.print(f"replaced the initrd's old early part ({image.replaced_early} bytes)")
        if check:
            stdout.print("check: the early loaders see every update")
    _warn(results)


@ucode.command("xen-cmdline")
@click.argument("file", type=_FILE)
@click.option("--module", "module_index", type=int,
              help="The file's multiboot module index (1 = first after the dom0 kernel).")
@_CPU
@_THIS
@_JSON
def xen_cmdline_cmd(file: Path, module_index: int | None, cpu_spec: str | None, this: bool,
                    as_json: bool) -> None:
    """What to put on Xen's command line so it loads microcode from FILE."""
    cpu = _cpu_option(cpu_spec, this) if (cpu_spec or this) else None
    result = scan_file(file)
    adv = advise(result, module_index=module_index, cpu=cpu)
    if as_json:
        emit_json({**advice_to_json(adv), "skipped": _skipped_json([result])})
    else:
        if adv.option:
            stdout.print(f"Xen option: [bold]{adv.option}[/]")
            stdout.print("grub entry:")
            for line in adv.grub:
                stdout.print(f"  {_esc(line)}")
            stdout.print("xen.efi (xen.cfg): " + _esc("; ".join(adv.efi)))
        for p in adv.problems:
            stdout.print(f"[red]problem[/]: {_esc(p)}", soft_wrap=True)
        for n in adv.notes:
            stdout.print(f"- {_esc(n)}", soft_wrap=True)
    for item in result.skipped:
        stderr.print(f"[yellow]skipped[/]: {_esc(str(item))}", soft_wrap=True)
    if not adv.ok:
        raise click.exceptions.Exit(1)


@ucode.command("load")
@click.argument("files", nargs=-1, required=True, type=_INPUT)
@click.option("--apply", "do_apply", is_flag=True,
              help="Really place the firmware and trigger a late load (root).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="System root (for tests and chroots).")
def load_cmd(files: Sequence[Path], do_apply: bool, root: Path) -> None:
    """Late-load the best update in FILES on this running Linux host (dry run by default)."""
    cpu = this_cpu(root)
    results = _scan_all(files)
    _warn(results)
    sel = select([u for r in results for u in r.updates], cpu)
    plan = plan_load(sel, root)
    for line in plan.describe():
        stdout.print(("" if do_apply else "would ") + _esc(line))
    if not do_apply:
        stdout.print("dry run: nothing changed (add --apply to load)")
        return
    after = apply_load(plan)
    stdout.print(f"CPU now reports microcode revision {after.microcode_revision or 0:#x}")


@ucode.command("cpu")
@_JSON
def cpu_cmd(as_json: bool) -> None:
    """Show this machine's CPU signature as the microcode loaders see it."""
    cpu = this_cpu()
    data = {
        "vendor": cpu.vendor.value if cpu.vendor else None,
        "signature": cpu.signature,
        "family": cpu.family, "model": cpu.model, "stepping": cpu.stepping,
        "platform_mask": cpu.platform_mask,
        "microcode_revision": cpu.microcode_revision,
        "source": cpu.source,
    }
    if as_json:
        emit_json(data)
        return
    for k, v in data.items():
        shown: object = v
        if isinstance(v, int):
            # cpuinfo prints family/model/stepping in decimal, vendors in hex.
            hexed = k in ("signature", "platform_mask", "microcode_revision")
            shown = f"{v:#x}" if hexed else f"{v} ({v:#x})"
        stdout.print(f"{k:20} {shown}")
