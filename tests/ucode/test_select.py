"""ucode.select: the update a CPU loads, and the reasons for the rest."""

from __future__ import annotations

from pathlib import Path

from tests.oracle import iucode
from tests.ucode import builders as b
from xenlab.formats.intel_ucode import build_update
from xenlab.ucode.cpu import CpuId, Vendor, parse_cpu_spec
from xenlab.ucode.scan import scan_buffer, scan_file
from xenlab.ucode.select import select

BUNDLE = b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40 + b.AMD_CONTAINER


def _sel(spec: str, blob: bytes = BUNDLE):  # type: ignore[no-untyped-def]
    return select(
        scan_buffer(blob, "b.bin").updates + scan_buffer(b.AMD_CONTAINER, "a").updates,
        parse_cpu_spec(spec),
    )


def test_highest_revision_wins_through_extended_signature() -> None:
    s = _sel("intel:0x906a4,0x80")
    assert s.chosen is not None and s.chosen.revision == 0x43A
    reasons = {v.update.revision: v.reason for v in s.verdicts}
    assert "extended signature 0x906a4" in reasons[0x43A]
    assert reasons[0x10].startswith("older revision 0x10")
    assert "platform mask 0x40 excludes" in reasons[0xB]


def test_platform_selects_the_other_update() -> None:
    s = _sel("intel:0x906a4,0x40")
    assert s.chosen is not None and s.chosen.revision == 0xB


def test_unknown_platform_matches_any() -> None:
    s = _sel("0x906a4")
    assert s.chosen is not None and s.chosen.revision == 0x43A
    assert len(s.fitting) == 3


def test_amd_equivalence() -> None:
    s = _sel("amd:0x800f82")
    assert s.chosen is not None and s.chosen.revision == 0x0800820B
    other = next(v for v in s.verdicts if v.update.revision == 0x08001227)
    assert not other.fits and "0x800f12" in other.reason


def test_no_fit() -> None:
    s = _sel("0x50654,0x1")
    assert s.chosen is None and not s.fitting


def test_revision_compared_signed_and_running_revision() -> None:
    neg = build_update(signature=0x506F1, revision=-2, platform_mask=1, payload=b.payload(2000, 9))
    pos = build_update(
        signature=0x506F1, revision=0x3E, platform_mask=1, payload=b.payload(2000, 8)
    )
    ups = scan_buffer(neg + pos, "n.bin").updates
    s = select(ups, parse_cpu_spec("0x506f1,0x1"))
    assert s.chosen is not None and s.chosen.revision == 0x3E
    cpu = CpuId(Vendor.INTEL, 0x506F1, 1, 0x3E, "test")
    s2 = select(ups, cpu)
    assert s2.note is not None and "not newer" in s2.note


def test_bad_checksum_never_chosen() -> None:
    bad = bytearray(b.INTEL_NEW)
    bad[60] ^= 1
    s = select(scan_buffer(bytes(bad) + b.INTEL_OLD, "x").updates, parse_cpu_spec("0x906a4,0x80"))
    assert s.chosen is not None and s.chosen.revision == 0x10


# -- against iucode_tool on real files --------------------------------------------------


def _signed(rev: int) -> int:
    return rev - (1 << 32) if rev & 0x80000000 else rev


def _real_intel(shared_data: Path) -> list[Path]:
    d = shared_data / "microcode" / "intel"
    return sorted(p for p in d.rglob("*") if p.is_file() and "-" in p.name and "." not in p.name)


def test_selection_equals_iucode_tool_on_real_files(shared_data: Path) -> None:
    files = _real_intel(shared_data)
    ours = [u for f in files for u in scan_file(f).updates]
    pairs = {(s, m) for u in ours for s, m in u.platforms}
    assert len(pairs) >= 20
    for sig, mask in sorted(pairs):
        for pf in [1 << i for i in range(8) if mask & (1 << i)][:2]:
            peer = iucode.select(files, sig, pf)
            # iucode_tool keeps the newest update per (signature, platform mask);
            # of those, the CPU loads the highest revision.
            want = max((e.rev for e in peer if e.sig == sig), key=_signed)
            got = select(ours, CpuId(Vendor.INTEL, sig, pf, None, "test"))
            assert got.chosen is not None
            assert got.chosen.unsigned_revision == want, (hex(sig), hex(pf), peer)


def test_selection_equals_iucode_tool_on_built_bundle(tmp_path: Path) -> None:
    f = tmp_path / "b.bin"
    f.write_bytes(b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40)
    ours = scan_file(f).updates
    for sig, pf in [(0x906A4, 0x80), (0x906A4, 0x40), (0x906A3, 0x80), (0x906A3, 0x1)]:
        peer = [e.rev for e in iucode.select([f], sig, pf) if e.sig == sig]
        got = select(ours, CpuId(Vendor.INTEL, sig, pf, None, "t")).chosen
        want = max(peer, key=_signed) if peer else None
        assert (got.unsigned_revision if got else None) == want, (hex(sig), hex(pf))


def test_scan_listing_equals_iucode_tool(tmp_path: Path) -> None:
    f = tmp_path / "b.bin"
    f.write_bytes(b.INTEL_OLD + b.INTEL_NEW + b.INTEL_PF40)
    peer = iucode.list_updates([f], all=True)
    ours = [
        (s, m, u.date, u.unsigned_revision, u.size)
        for u in scan_file(f).updates
        for s, m in u.platforms
    ]
    assert ours == [(e.sig, e.pf_mask, e.date, e.rev, e.size) for e in peer]


def test_scan_listing_equals_iucode_tool_on_real_files(shared_data: Path) -> None:
    for f in _real_intel(shared_data):
        peer = iucode.list_updates([f], all=True)
        ours = [
            (s, m, u.date, u.unsigned_revision, u.size)
            for u in scan_file(f).updates
            for s, m in u.platforms
        ]
        assert ours == [(e.sig, e.pf_mask, e.date, e.rev, e.size) for e in peer], f.name
